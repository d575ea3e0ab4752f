/**
 * Guest RAM files. A VM's RAM is a file mapped MAP_SHARED, so a snapshot only has to save the
 * device state (QEMU's x-ignore-shared): the memory image is already on disk (in page cache).
 * A restore gets its own RAM file, cloned from the snapshot's:
 *
 * - by reflink (FICLONE) where the filesystem supports it (XFS, btrfs): no copy at all;
 * - else by a sparse copy of the data extents only (`cocoon-sparse copy`: FIEMAP and
 *   copy_file_range; `cp --sparse` would copy the zeros a guest once read from reserved,
 *   unwritten extents). Snapshots of images have their zero pages punched out first
 *   (`digHoles`) so that this copies only what the guest really holds.
 *
 * Copy-on-write mappings (MAP_PRIVATE) would avoid even that copy, but QEMU 7.2 then has to write
 * the whole RAM on every later suspend (measured: ~450 ms for 256 MiB against ~6 ms), so they
 * are not used.
 *
 * A running VM's RAM file has all its blocks reserved (`reserveRamFile`): a guest touching a page
 * of a sparse file on a full disk would make QEMU die of SIGBUS (seen: a full data directory
 * killed running VMs at their next request). With the blocks reserved, a full disk refuses new
 * VMs (`no_space`) and leaves running ones alone. Snapshots give the unused reservation back
 * (`releaseUnusedRam`). On tmpfs a reservation would cost RAM up front, so it is skipped there.
 */
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import { promisify } from 'node:util';
import { CocoonError, isCocoonError } from '../common/errors.ts';
import { runSparseHelper } from './native/helper.ts';
import { parseChecksumLine } from './snapshot.ts';
import type { DataChecksum } from './types.ts';

const run = promisify(execFile);

export async function createRamFile(path: string, memoryMiB: number): Promise<void> {
  const handle = await fs.promises.open(path, 'wx', 0o600);
  try {
    await handle.truncate(memoryMiB * 1024 * 1024);
  } finally {
    await handle.close();
  }
  try {
    await reserveRamFile(path);
  } catch (error) {
    await fs.promises.rm(path, { force: true });
    throw error;
  }
}

/**
 * Clones `source` into a new `target` with all its blocks reserved. With `checksum`, the data is
 * checksummed as it is copied, and so are the files of `alsoChecksum` (one helper run); the
 * checksums come back in that order (`checkDataChecksum` compares them with a manifest's).
 * With `into`, `target` exists (made by `createEmptyRamFile`, maybe mapped by a VMM that has not
 * run the guest yet) and is filled in place; on failure it stays, for the caller to remove.
 */
export async function cloneRamFile(source: string, target: string, options?: { nosync?: boolean; into?: boolean }): Promise<void>;
export async function cloneRamFile(source: string, target: string, options: { checksum: true; alsoChecksum?: string[]; into?: boolean }): Promise<DataChecksum[]>;
export async function cloneRamFile(
  source: string,
  target: string,
  options: { checksum?: boolean; alsoChecksum?: string[]; nosync?: boolean; into?: boolean } = {},
): Promise<DataChecksum[] | void> {
  try {
    // A reflink where the filesystem can, else a copy of the data extents only; then the rest
    // of the file is reserved.
    const extra = options.checksum && options.alsoChecksum?.length ? ['--', ...options.alsoChecksum] : [];
    // `nosync`: a source written moments ago and still in the page cache (a fork point) is not
    // written back first, as a FIEMAP would need: its data is found with SEEK_DATA.
    const flags = [...(options.checksum ? ['sum'] : []), ...(options.nosync ? ['nosync'] : []), ...(options.into ? ['into'] : [])];
    const out = await runSparseHelper(['copy', source, target, 'reserve', ...flags, ...extra]);
    if (options.checksum) return out.trim().split('\n').map(parseChecksumLine);
  } catch (error) {
    if (!options.into) await fs.promises.rm(target, { force: true });
    if (isCocoonError(error, 'no_space') || isCocoonError(error, 'helper_missing')) throw error;
    throw new CocoonError('ram_clone_failed', `cannot clone guest memory ${source}: ${(error as Error).message}`, {
      cause: error,
    });
  }
}

/**
 * An empty RAM file for `cloneRamFile(..., { into: true })` to fill: the VMM can be started on it
 * (and map it) while the memory is still being copied. Size 0: the VMM sizes it, or the copy.
 */
export async function createEmptyRamFile(path: string): Promise<void> {
  const handle = await fs.promises.open(path, 'wx', 0o600);
  await handle.close();
}

/** Reserves every block of a RAM file (fallocate; data stays as it is). `no_space` on a full disk. */
export async function reserveRamFile(path: string): Promise<void> {
  await runSparseHelper(['alloc', path]);
}

/** Gives back the blocks a RAM file reserved and never used (its content does not change). */
export async function releaseUnusedRam(path: string): Promise<void> {
  await runSparseHelper(['trim', path]);
}

/** Punches holes where the file holds only zeros, so that later clones copy less. */
export async function digHoles(path: string): Promise<void> {
  await run('fallocate', ['--dig-holes', path]);
}

/** Bytes really allocated to a file (its sparse size). */
export function allocatedBytes(path: string): number {
  return fs.statSync(path).blocks * 512;
}
