/**
 * Snapshot directories: `manifest.json` describes the machine shape and the files, with the
 * device state's size and SHA-256 and a checksum of the memory file and the disk over their
 * data (types.ts `DataChecksum`). A snapshot is checked before every restore, so a truncated or
 * corrupted one is refused with `snapshot_corrupt` instead of being restored into a broken VM.
 */
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { CocoonError } from '../common/errors.ts';
import { runSparseHelper } from './native/helper.ts';
import type { DataChecksum, SnapshotManifest } from './types.ts';
import { identityBeforeReading, isVerified, rememberVerified } from './verified-files.ts';

const MAX_MANIFEST_BYTES = 64 * 1024;
const FILE_NAME = /^[a-z0-9][a-z0-9._-]{0,63}$/;

function corrupt(dir: string, why: string): CocoonError {
  return new CocoonError('snapshot_corrupt', `snapshot ${dir} is unusable: ${why}`, { status: 422 });
}

export async function readSnapshotManifest(dir: string): Promise<SnapshotManifest> {
  let text: string;
  try {
    const file = path.join(dir, 'manifest.json');
    if ((await fs.promises.stat(file)).size > MAX_MANIFEST_BYTES) throw corrupt(dir, 'manifest.json is too large');
    text = await fs.promises.readFile(file, 'utf8');
  } catch (error) {
    if (error instanceof CocoonError) throw error;
    throw new CocoonError('snapshot_not_found', `no snapshot in ${dir} (manifest.json is missing)`, { status: 404, cause: error });
  }
  let manifest: SnapshotManifest;
  try {
    manifest = JSON.parse(text) as SnapshotManifest;
  } catch {
    throw corrupt(dir, 'manifest.json is not valid JSON');
  }
  if (manifest?.formatVersion !== 1) throw corrupt(dir, `unknown format version ${String(manifest?.formatVersion)}`);
  const { files, shape } = manifest;
  const names = [files?.state?.name, files?.mem?.name, files?.disk?.name];
  if (!names.every((name) => typeof name === 'string' && FILE_NAME.test(name))) {
    throw corrupt(dir, 'manifest.json names files outside the snapshot');
  }
  if (!shape || typeof shape.vcpus !== 'number' || typeof shape.memoryMiB !== 'number' || typeof manifest.cmdline !== 'string') {
    throw corrupt(dir, 'manifest.json lacks the machine shape');
  }
  return manifest;
}

/**
 * Checks that every file is there with the recorded size, and the device state's checksum (once
 * per file identity: verified-files.ts).
 */
export async function verifySnapshot(dir: string, manifest: SnapshotManifest): Promise<void> {
  const { state, mem, disk } = manifest.files;
  for (const file of [state, mem, disk]) {
    let size: number;
    try {
      size = (await fs.promises.stat(path.join(dir, file.name))).size;
    } catch {
      throw corrupt(dir, `${file.name} is missing`);
    }
    if (size !== file.sizeBytes) throw corrupt(dir, `${file.name} is ${size} bytes, expected ${file.sizeBytes}`);
  }
  const stateFile = path.join(dir, state.name);
  const key = `sha256:${state.sha256}`;
  if (await isVerified(stateFile, key)) return;
  const before = await identityBeforeReading(stateFile);
  const hash = createHash('sha256');
  for await (const chunk of fs.createReadStream(stateFile)) hash.update(chunk as Buffer);
  if (hash.digest('hex') !== state.sha256) throw corrupt(dir, `${state.name} does not match its checksum`);
  await rememberVerified(stateFile, before, key);
}

/** The key a data file's verification is remembered under (verified-files.ts). */
export function dataChecksumKey(checksum: DataChecksum | undefined): string | undefined {
  return checksum ? `${checksum.algorithm}:${checksum.value}` : undefined;
}

/**
 * Checksums of files' content over their non-zero pages, one helper run for all of them. Files
 * are paths or open file descriptors (read through /dev/fd: a rename meanwhile does not matter).
 */
export async function dataChecksums(files: Array<string | number>): Promise<DataChecksum[]> {
  const fds = files.filter((file): file is number => typeof file === 'number');
  let next = 3;
  const names = files.map((file) => (typeof file === 'number' ? `/dev/fd/${next++}` : file));
  const out = await runSparseHelper(['sum', ...names], fds);
  const lines = out.trim().split('\n');
  if (lines.length !== files.length) throw new Error(`the checksum helper answered ${lines.length} lines for ${files.length} files`);
  return lines.map(parseChecksumLine);
}

type DataFile = 'mem' | 'disk';

/** Fails unless the manifest has checksums for the memory file and the disk. */
export function assertDataChecksums(dir: string, manifest: SnapshotManifest): void {
  for (const file of [manifest.files.mem, manifest.files.disk]) {
    if (file.checksum?.algorithm !== 'xxh64-pages' || !/^[0-9a-f]{16}$/.test(file.checksum.value)) {
      throw corrupt(dir, `manifest.json has no checksum for ${file.name} (made by an older Cocoon?)`);
    }
  }
}

/** Compares a checksum taken of one of the snapshot's files with the manifest's. */
export function checkDataChecksum(dir: string, manifest: SnapshotManifest, which: DataFile, actual: DataChecksum | undefined): void {
  const file = manifest.files[which];
  if (!actual || actual.value !== file.checksum?.value) throw corrupt(dir, `${file.name} does not match its checksum`);
}

/**
 * Checks the memory file and the disk (or those named) against the checksums in the manifest:
 * their data extents are read. A snapshot without checksums is refused: it cannot be checked.
 */
export async function verifySnapshotData(dir: string, manifest: SnapshotManifest, which: DataFile[] = ['mem', 'disk']): Promise<void> {
  assertDataChecksums(dir, manifest);
  const file = (name: DataFile) => path.join(dir, manifest.files[name].name);
  const key = (name: DataFile) => dataChecksumKey(manifest.files[name].checksum)!;
  const known = await Promise.all(which.map((name) => isVerified(file(name), key(name))));
  const todo = which.filter((_, index) => !known[index]);
  if (todo.length === 0) return;
  const before = await Promise.all(todo.map((name) => identityBeforeReading(file(name))));
  let actual: DataChecksum[];
  try {
    actual = await dataChecksums(todo.map(file));
  } catch (error) {
    if (error instanceof CocoonError && error.code === 'helper_missing') throw error;
    throw corrupt(dir, `its files cannot be read: ${(error as Error).message}`);
  }
  for (const [index, name] of todo.entries()) checkDataChecksum(dir, manifest, name, actual[index]);
  await Promise.all(todo.map((name, index) => rememberVerified(file(name), before[index], key(name))));
}

/** Parses the helper's checksum line (`<hex> <pages> <size>`). */
export function parseChecksumLine(line: string): DataChecksum {
  const value = /^([0-9a-f]{16}) \d+ \d+$/.exec(line.trim())?.[1];
  if (!value) throw new Error(`the checksum helper answered ${JSON.stringify(line)}`);
  return { algorithm: 'xxh64-pages', value };
}

/**
 * Writes `manifest.json` (fsynced when durable). The memory file's and disk's checksums are
 * computed here unless the caller already has them.
 */
export async function writeSnapshotManifest(dir: string, manifest: SnapshotManifest, durable: boolean): Promise<void> {
  const { mem, disk } = manifest.files;
  if (!mem.checksum || !disk.checksum) {
    [mem.checksum, disk.checksum] = await dataChecksums([path.join(dir, mem.name), path.join(dir, disk.name)]);
  }
  const handle = await fs.promises.open(path.join(dir, 'manifest.json'), 'wx', 0o600);
  try {
    await handle.writeFile(JSON.stringify(manifest, null, 2));
    if (durable) await handle.sync();
  } finally {
    await handle.close();
  }
}

/**
 * A snapshot whose device state is saved but whose files are not all in place yet: written
 * (atomically) into the partial directory before QEMU is killed, so that a process dying in
 * between leaves enough to complete the snapshot (`QemuVm.recoverSnapshot`).
 */
export interface PendingSnapshot {
  formatVersion: 1;
  /** The VM's run directory (its QEMU, if still alive, mentions it on its command line). */
  runDir: string;
  ramPath: string;
  diskPath: string;
  /** The manifest to write; the disk's size is filled in once the disk is moved. */
  manifest: SnapshotManifest;
  /**
   * The kernel boot (`/proc/sys/kernel/random/boot_id`) the RAM file's pages are from. A RAM
   * file is not synced before the commit (a suspend keeping a memory diff never syncs it), so
   * after a reboot its pages may be old ones: such a snapshot is not completed. Absent in
   * records of older versions (completed as before).
   */
  bootId?: string;
}

let currentBootId: string | undefined;

/** This kernel boot's id (see `PendingSnapshot.bootId`); undefined where the kernel has none. */
export function kernelBootId(): string | undefined {
  if (currentBootId === undefined) {
    try {
      currentBootId = fs.readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim();
    } catch {
      return undefined;
    }
  }
  return currentBootId;
}

export async function writePendingSnapshot(dir: string, pending: PendingSnapshot, durable: boolean): Promise<void> {
  const file = path.join(dir, 'pending.json');
  const handle = await fs.promises.open(`${file}.tmp`, 'w', 0o600);
  try {
    await handle.writeFile(JSON.stringify(pending));
    if (durable) await handle.sync();
  } finally {
    await handle.close();
  }
  await fs.promises.rename(`${file}.tmp`, file);
}

/** The pending record of a partial snapshot directory, or undefined when there is none (or it is unreadable). */
export async function readPendingSnapshot(dir: string): Promise<PendingSnapshot | undefined> {
  try {
    const pending = JSON.parse(await fs.promises.readFile(path.join(dir, 'pending.json'), 'utf8')) as PendingSnapshot;
    const files = pending?.manifest?.files;
    if (pending.formatVersion !== 1 || typeof pending.runDir !== 'string' || typeof pending.ramPath !== 'string') return undefined;
    if (typeof pending.diskPath !== 'string' || !files) return undefined;
    if (![files.state?.name, files.mem?.name, files.disk?.name].every((name) => typeof name === 'string' && FILE_NAME.test(name))) return undefined;
    return pending;
  } catch {
    return undefined;
  }
}
