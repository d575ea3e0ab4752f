/**
 * Guest RAM files. A VM's RAM is a file mapped MAP_SHARED, so a snapshot only has to save the
 * device state (QEMU's x-ignore-shared): the memory image is already on disk (in page cache).
 * A restore gets its own RAM file, cloned from the snapshot's:
 *
 * - by reflink (FICLONE) where the filesystem supports it (XFS, btrfs): no copy at all;
 * - else by a sparse copy of the allocated extents only (`cp --sparse=always`, which uses
 *   SEEK_DATA/copy_file_range). Snapshots of images have their zero pages punched out first
 *   (`digHoles`) so that this copies only what the guest really holds.
 *
 * Copy-on-write mappings (MAP_PRIVATE) would avoid even that copy, but QEMU 7.2 then has to write
 * the whole RAM on every later suspend (measured: ~450 ms for 256 MiB against ~6 ms), so they
 * are not used.
 */
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import { promisify } from 'node:util';
import { CocoonError } from '../common/errors.ts';

const run = promisify(execFile);

export async function createRamFile(path: string, memoryMiB: number): Promise<void> {
  const handle = await fs.promises.open(path, 'wx', 0o600);
  try {
    await handle.truncate(memoryMiB * 1024 * 1024);
  } finally {
    await handle.close();
  }
}

export async function cloneRamFile(source: string, target: string): Promise<void> {
  try {
    // --reflink=auto: a clone where the filesystem can, else a copy of the data extents only.
    await run('cp', ['--reflink=auto', '--sparse=always', '--', source, target]);
    await fs.promises.chmod(target, 0o600);
  } catch (error) {
    await fs.promises.rm(target, { force: true });
    throw new CocoonError('ram_clone_failed', `cannot clone guest memory ${source}: ${(error as Error).message}`, {
      cause: error,
    });
  }
}

/** Punches holes where the file holds only zeros, so that later clones copy less. */
export async function digHoles(path: string): Promise<void> {
  await run('fallocate', ['--dig-holes', path]);
}

/** Bytes really allocated to a file (its sparse size). */
export function allocatedBytes(path: string): number {
  return fs.statSync(path).blocks * 512;
}
