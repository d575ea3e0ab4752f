/**
 * The snapshot commit protocol, the same for every VMM: the VM's memory and disk files are
 * moved (renamed) into a partial directory, checksummed and fsynced side by side, the manifest
 * written last, and one rename makes the directory appear whole. A failed fsync is reported
 * (`fsyncFailure`) so that the VM is never snapshotted again.
 */
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { dataChecksums, writeSnapshotManifest } from './snapshot.ts';
import type { DataChecksum, SnapshotManifest } from './types.ts';

const execFileAsync = promisify(execFile);

/**
 * The commit point of a snapshot: the manifest (the files' sizes and checksums) is written and
 * fsynced last, the pending record goes, and one rename makes the directory appear whole.
 */
export async function commitSnapshot(partial: string, targetDir: string, manifest: SnapshotManifest, durable: boolean): Promise<void> {
  await fs.promises.rm(path.join(partial, 'manifest.json'), { force: true });
  await writeSnapshotManifest(partial, manifest, durable);
  await fs.promises.rm(path.join(partial, 'pending.json'), { force: true });
  await fs.promises.rename(partial, targetDir);
}

/** The failed fsync behind an error, if that is what it is (`fsync: EIO`). */
export function fsyncFailure(error: unknown): string | undefined {
  for (let e = error, depth = 0; e && depth < 8; e = (e as { cause?: unknown }).cause, depth++) {
    const { syscall, code } = e as NodeJS.ErrnoException;
    if (syscall === 'fsync' || syscall === 'fdatasync') return `${syscall}: ${code ?? 'error'}`;
  }
  return undefined;
}

/** Checksums of the RAM file and disk (open files), and their fsyncs when durable, side by side. */
export function sealData(handles: fs.promises.FileHandle[], durable: boolean): Promise<[DataChecksum[], unknown]> {
  return Promise.all([
    dataChecksums(handles.map((handle) => handle.fd)),
    durable ? Promise.all(handles.map((handle) => handle.datasync())) : undefined,
  ]);
}

export async function moveFile(from: string, to: string): Promise<void> {
  try {
    await fs.promises.rename(from, to);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== 'EXDEV') throw error;
    await execFileAsync('cp', ['--sparse=always', '--', from, to]);
    await fs.promises.rm(from);
  }
}
