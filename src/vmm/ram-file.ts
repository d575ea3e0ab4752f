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
 * A guest touching a page of a sparse RAM file on a full disk makes QEMU die of SIGBUS (seen: a
 * full data directory killed running VMs at their next request). Two protections, by size:
 *
 * - RAM files up to `COCOON_RAM_RESERVE_MAX_MIB` (2 GiB by default) have all their blocks
 *   reserved (`reserveRamFile`): whatever fills the disk, the guest's pages have their blocks.
 *   Snapshots give the unused reservation back (`releaseUnusedRam`; a compacted one at once).
 * - Bigger ones stay sparse: their disk use follows what the guest touches (a 32 GiB busybox
 *   guest touches ~700 MiB, its struct pages alone are 512 MiB), where a reservation would take
 *   32 GiB per RUNNING VM. The space ledger (space-ledger.ts) admits them only where the free
 *   space, less what other live RAM files may still claim, holds them whole; the space watch
 *   pauses them if the disk fills anyway.
 *
 * Every RAM file, reserved or not, is admitted by the ledger before it is made (`no_space` up
 * front, nothing copied). On tmpfs a reservation would cost RAM up front, so it is skipped there.
 */
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import nodePath from 'node:path';
import { promisify } from 'node:util';
import { CocoonError, isCocoonError } from '../common/errors.ts';
import { setting } from '../common/settings.ts';
import { runSparseHelper } from './native/helper.ts';
import { parseChecksumLine } from './snapshot.ts';
import { admitRam, releaseRam } from './space-ledger.ts';
import type { DataChecksum } from './types.ts';

const run = promisify(execFile);

/** Whether a RAM file of `sizeBytes` has all its blocks reserved (see the top of this file). */
export function reservesRam(sizeBytes: number): boolean {
  return sizeBytes <= setting('COCOON_RAM_RESERVE_MAX_MIB') * 1024 * 1024;
}

/** A new RAM file of `memoryMiB`, admitted by the space ledger (`no_space` up front), reserved when small. */
export async function createRamFile(path: string, memoryMiB: number): Promise<void> {
  const size = memoryMiB * 1024 * 1024;
  await admitRam(path, size, 'a new VM');
  let handle: fs.promises.FileHandle | undefined;
  try {
    handle = await fs.promises.open(path, 'wx', 0o600);
    await handle.truncate(size);
    await handle.close();
    handle = undefined;
    if (reservesRam(size)) await reserveRamFile(path);
  } catch (error) {
    await handle?.close().catch(() => undefined);
    await fs.promises.rm(path, { force: true });
    releaseRam(path);
    throw error;
  }
}

/**
 * Clones `source` into a new `target`, admitted by the space ledger and, when small, with all
 * its blocks reserved. With `checksum`, the data is
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
    // Admitted by the ledger first (the whole size: what the copy takes and what the guest may
    // still touch); then a reflink where the filesystem can, else a copy of the data extents
    // only; then, for a small one, the rest of the file is reserved.
    const size = (await fs.promises.stat(source)).size;
    await admitRam(target, size, `a VM from ${source}`);
    const reserve = reservesRam(size) ? ['reserve'] : [];
    const extra = options.checksum && options.alsoChecksum?.length ? ['--', ...options.alsoChecksum] : [];
    // `nosync`: a source written moments ago and still in the page cache (a fork point) is not
    // written back first, as a FIEMAP would need: its data is found with SEEK_DATA.
    const flags = [...reserve, ...(options.checksum ? ['sum'] : []), ...(options.nosync ? ['nosync'] : []), ...(options.into ? ['into'] : [])];
    const out = await runSparseHelper(['copy', source, target, ...flags, ...extra]);
    if (options.checksum) return out.trim().split('\n').map(parseChecksumLine);
  } catch (error) {
    if (!options.into) {
      await fs.promises.rm(target, { force: true });
      releaseRam(target);
    }
    if (isCocoonError(error, 'no_space') || isCocoonError(error, 'helper_missing')) throw error;
    throw new CocoonError('ram_clone_failed', `cannot clone guest memory ${source}: ${(error as Error).message}`, {
      cause: error,
    });
  }
}

/**
 * An empty RAM file for `cloneRamFile(..., { into: true })` to fill, admitted by the space ledger
 * for `sizeBytes` (`no_space` up front, nothing made): the VMM can be started on it (and map it)
 * while the memory is still being copied. Size 0: the VMM sizes it, or the copy.
 */
export async function createEmptyRamFile(path: string, sizeBytes: number, what: string): Promise<void> {
  await admitRam(path, sizeBytes, what);
  try {
    const handle = await fs.promises.open(path, 'wx', 0o600);
    await handle.close();
  } catch (error) {
    releaseRam(path);
    throw error;
  }
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

/** The name a RAM file has while it is removed in the background (`discardRamFile`). */
export const DISCARDED_RAM_NAME = 'mem.gone';

/**
 * Removes the RAM file of an ended VM that no snapshot took (its memory went into a diff),
 * without waiting for it: the file is renamed aside at once (`mem.gone`, beside it: a restore
 * into the same run directory makes a new RAM file) and unlinked in the background. An unlink
 * waits for the writeback the kernel may have started of the guest's dirty pages (measured: up
 * to a second on the 2-core host); nothing needs those pages any more. A leftover of a process
 * that died first is removed with the run directory's files (qemu.ts `clearRunFiles`).
 */
export async function discardRamFile(file: string): Promise<void> {
  const aside = nodePath.join(nodePath.dirname(file), DISCARDED_RAM_NAME);
  try {
    await fs.promises.rename(file, aside);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw error;
  }
  void fs.promises.rm(aside, { force: true }).catch(() => undefined);
}

/**
 * Removes the name of the RAM file of a VM whose process is still ending (a suspend that does
 * not wait for QEMU's exit: SnapshotOptions.endAfterAnswer) and answers a handle on it: the
 * blocks stay until both QEMU's mapping and the handle are gone, and closing the handle after
 * the exit does what the unlink of a whole RAM file costs (its pages dropped, a writeback the
 * kernel started waited for) in the background, not in QEMU's exit. Undefined when it is gone.
 */
export async function unlinkRamFileHeld(file: string): Promise<fs.promises.FileHandle | undefined> {
  let handle: fs.promises.FileHandle;
  try {
    handle = await fs.promises.open(file, 'r');
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw error;
  }
  try {
    await fs.promises.rm(file, { force: true });
  } catch (error) {
    await handle.close();
    throw error;
  }
  return handle;
}
