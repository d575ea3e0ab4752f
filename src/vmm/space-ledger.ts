/**
 * The space ledger: what the RAM files of live VMs may still claim of their filesystem.
 *
 * A guest's RAM is a shared mapping of a sparse file (ram-file.ts). A page the guest writes for
 * the first time needs a block of the data directory's disk then and there; if the disk is full,
 * the kernel answers the page fault with SIGBUS and QEMU dies. Small RAM files avoid that by
 * having all their blocks reserved up front (`reservesRam`). A big one would cost its full size
 * on disk that way (32 GiB for a guest that touches 700 MiB), so it stays sparse, and the ledger
 * keeps the promise instead: every live RAM file may grow to its full size, so a launch or resume
 * is admitted only when the filesystem's free space, less what the live RAM files on it may
 * still claim (their size less their allocated blocks), holds the new RAM file whole. Otherwise
 * it is refused up front with `no_space`, before anything is copied or started.
 *
 * What the ledger cannot see (another program filling the disk, Cocoon's own disk layers, logs,
 * image builds) can still eat the space it promised: the space watch (qemu/space-watch.ts)
 * pauses a guest with a sparse RAM file when free space runs that low, and continues it once
 * there is room. Disk layers are not in the ledger: QEMU pauses a guest whose disk write finds
 * no space (never a crash), and the space watch continues it.
 *
 * The ledger lives in this process: one daemon owns a data directory. Adopted VMs (a daemon
 * restart) enter it again when they are adopted.
 */
import fs from 'node:fs';
import path from 'node:path';
import { CocoonError } from '../common/errors.ts';

/** RAM file path → its full size in bytes, for every RAM file a live (or starting) VM has here. */
const live = new Map<string, number>();

/** Bytes the file at `file` (of full size `size`) may still allocate: size less allocated blocks (0 once gone). */
function growthOf(file: string, size: number): number {
  try {
    const stats = fs.statSync(file);
    return Math.max(0, size - stats.blocks * 512);
  } catch {
    return 0; // moved into a snapshot or removed: it grows no more
  }
}

function deviceOf(dir: string): number | undefined {
  try {
    return fs.statSync(dir).dev;
  } catch {
    return undefined;
  }
}

/** What the live RAM files on the filesystem of `dir` may still claim, in bytes (`except`: one file left out). */
export function promisedBytes(dir: string, except?: string): number {
  const device = deviceOf(dir);
  let total = 0;
  for (const [file, size] of live) {
    if (file === except || deviceOf(path.dirname(file)) !== device) continue;
    total += growthOf(file, size);
  }
  return total;
}

/**
 * Refuses with `no_space` unless the free space of the filesystem of `dir` (which exists), less
 * what the live RAM files there may still claim, holds `sizeBytes`: the check a launch or
 * resume makes up front, before anything is written.
 */
export async function assertRoomForRam(dir: string, sizeBytes: number, what: string, except?: string): Promise<void> {
  const stats = await fs.promises.statfs(dir);
  const free = stats.bavail * stats.bsize;
  const promised = promisedBytes(dir, except);
  if (free - promised < sizeBytes) {
    throw new CocoonError(
      'no_space',
      `no space left on the data directory's disk for ${what}: its memory may need ${mib(sizeBytes)} MiB, ` +
        `${mib(free)} MiB are free and the memory of the VMs running there may still claim ${mib(promised)} MiB of that; free space or stop VMs`,
      { status: 507, details: { neededBytes: sizeBytes, freeBytes: free, promisedBytes: promised } },
    );
  }
}

/**
 * Admits a new RAM file of `sizeBytes` at `file` (its directory exists) as `assertRoomForRam`
 * checks; once admitted, it is a promise itself until `releaseRam`. The check and the entry
 * happen in one turn of the event loop after `statfs`, so two launches at once cannot both take
 * the same room.
 */
export async function admitRam(file: string, sizeBytes: number, what: string): Promise<void> {
  await assertRoomForRam(path.dirname(file), sizeBytes, what, file);
  live.set(file, sizeBytes);
}

/** Enters a RAM file that exists already (a VM adopted after a restart); no check. */
export function holdRam(file: string, sizeBytes: number): void {
  live.set(file, sizeBytes);
}

/** The RAM file's VM is gone (or never started): its promise ends. */
export function releaseRam(file: string): void {
  live.delete(file);
}

function mib(bytes: number): number {
  return Math.round(bytes / (1024 * 1024));
}
