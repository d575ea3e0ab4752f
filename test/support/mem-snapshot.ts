/**
 * Snapshot directories made by hand for the memory-diff tests that need no VM
 * (test/vmm/mem-diff.test.ts, test/vmm/snapshot-memory.test.ts): a sparse 8 MiB `mem` with chosen
 * pages written (the rest holes), a small device state and disk, and a manifest that says so.
 */
import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { writeSnapshotManifest } from '../../src/vmm/snapshot.ts';
import type { SnapshotManifest } from '../../src/vmm/types.ts';

export const PAGE = 4096;
export const MEMORY = 8 * 1024 * 1024; // 2048 pages

/** One page: random, or filled with `byte`. */
export const page = (byte?: number): Buffer => (byte === undefined ? randomBytes(PAGE) : Buffer.alloc(PAGE, byte));

/** A memory file of `size` bytes with `pages` (page index → data) written, the rest holes. */
export function memFile(file: string, pages: Map<number, Buffer>, size = MEMORY): void {
  const fd = fs.openSync(file, 'w', 0o600);
  try {
    fs.ftruncateSync(fd, size);
    for (const [index, data] of pages) fs.writeSync(fd, data, 0, PAGE, index * PAGE);
  } finally {
    fs.closeSync(fd);
  }
}

/** A snapshot directory with `mem` written at the given pages (the rest holes); answers its manifest. */
export async function snapshot(dir: string, pages: Map<number, Buffer>): Promise<SnapshotManifest> {
  fs.mkdirSync(dir, { recursive: true });
  memFile(path.join(dir, 'mem'), pages);
  const state = Buffer.from('device state');
  fs.writeFileSync(path.join(dir, 'state'), state);
  fs.writeFileSync(path.join(dir, 'disk.raw'), randomBytes(PAGE));
  const manifest: SnapshotManifest = {
    formatVersion: 1,
    createdAt: new Date().toISOString(),
    shape: { vcpus: 1, memoryMiB: MEMORY / 1024 / 1024, accel: 'tcg', guest: { kernel: '/k', initramfs: '/i' } },
    cmdline: 'console=ttyS0',
    files: {
      state: { name: 'state', sizeBytes: state.length, sha256: createHash('sha256').update(state).digest('hex') },
      mem: { name: 'mem', sizeBytes: MEMORY },
      disk: { name: 'disk.raw', format: 'raw', sizeBytes: PAGE },
    },
    guestPorts: [],
  };
  await writeSnapshotManifest(dir, manifest, false);
  return manifest;
}
