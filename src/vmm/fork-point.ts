/**
 * The driver-neutral half of a fork point (a driver takes it: `Vm.forkPoint`, e.g.
 * src/vmm/qemu/fork-point.ts): the manifest written whole, and the completion of a fork point
 * taken with `deferChecksums` once its users run.
 */
import fs from 'node:fs';
import path from 'node:path';
import { fsyncDir } from '../common/fs.ts';
import { dataChecksums, readSnapshotManifest } from './snapshot.ts';
import type { SnapshotManifest } from './types.ts';

/** Writes `manifest.json` whole (a temporary file renamed over it), fsynced when durable. */
export async function writeManifestFile(dir: string, manifest: SnapshotManifest, durable: boolean): Promise<void> {
  const file = path.join(dir, 'manifest.json');
  const handle = await fs.promises.open(`${file}.tmp`, 'w', 0o600);
  try {
    await handle.writeFile(JSON.stringify(manifest, null, 2));
    if (durable) await handle.sync();
  } finally {
    await handle.close();
  }
  await fs.promises.rename(`${file}.tmp`, file);
}

/**
 * Completes a fork point taken with `deferChecksums` once its users run: the memory's and
 * disk's checksums go into the manifest of every directory in `dirs` (hard links of one fork
 * point), and with `durable` its files and the directories are fsynced.
 */
export async function completeForkPoint(dirs: string[], durable: boolean): Promise<void> {
  const [first] = dirs;
  if (!first) return;
  const manifest = await readSnapshotManifest(first);
  const { files } = manifest;
  const [mem, disk] = await dataChecksums([path.join(first, files.mem.name), path.join(first, files.disk.name)]);
  if (durable) {
    for (const name of [files.mem.name, files.disk.name, files.state.name]) {
      const handle = await fs.promises.open(path.join(first, name), 'r');
      try {
        await handle.datasync();
      } finally {
        await handle.close();
      }
    }
  }
  const complete: SnapshotManifest = { ...manifest, files: { ...files, mem: { ...files.mem, checksum: mem! }, disk: { ...files.disk, checksum: disk! } } };
  for (const dir of dirs) {
    await writeManifestFile(dir, complete, durable);
    if (durable) {
      await fsyncDir(dir);
      await fsyncDir(path.dirname(dir));
    }
  }
}
