/**
 * QEMU processes told to end whose exit nobody waited for: a suspend answers once its snapshot
 * is committed and its QEMU has been sent SIGKILL (`SnapshotOptions.endAfterAnswer`, issue 12:
 * the exit cost every suspend ~7 ms). Until such a process is gone it still holds its files
 * open (its disk layer, now the snapshot's disk, whose image lock it keeps, though inactivated
 * by the completed migration: no longer the write lock) and the last of its ending (a handle
 * on its RAM file closed) runs after it, so what could race it waits first: a boot, a disk
 * layer rebased (qemu-img takes the image locks), a run directory cleared, and a restore with
 * `restoreTuning.overlapExits` off. A restore does not (tuning.ts: why nothing is in its way).
 * An exit takes ~100 ms on the 2-core host (its guest RAM's mapping torn down); rarely is more
 * than one under way.
 */
import { errorMessage } from '../../common/errors.ts';
import { log } from '../../common/log.ts';

const inFlight = new Set<Promise<void>>();

/** Tracks `ending` (a process's exit and what follows it) until it settles. */
export function endInBackground(vm: string, ending: Promise<void>): void {
  const tracked: Promise<void> = ending
    .catch((error: unknown) => log.warn({ vm, error: errorMessage(error) }, 'ending the process of a snapshotted VM failed'))
    .finally(() => inFlight.delete(tracked));
  inFlight.add(tracked);
}

/** Resolves once every process ended in the background is gone (at once when none is). */
export async function qemuExitsSettled(): Promise<void> {
  while (inFlight.size > 0) await Promise.all(inFlight);
}
