/**
 * The host's steps of a restore into a QEMU taken from the pool (pool.ts), between its files
 * being placed and its device state being loaded, and how that state is loaded and the guest
 * started (issue 12). Two ways, by `restoreTuning.pooledInline` (tuning.ts), so that the vm
 * benchmark measures them side by side:
 *
 *   - step by step (off): the files given to the QEMU's uid through the thread pool, a QMP
 *     round trip per disk command beside the forwards', the device state streamed from its
 *     file, `cont` answered before the guest is sent its clock and RNG seed;
 *   - inline (on): the grant's few dozen file calls made at once (host/sandbox.ts `inlineFs`:
 *     through the thread pool, behind the memory copy, they took 20-80 ms), the disk's commands
 *     and the forwards written to QMP together and answered together, the device state read in
 *     one call and sent to the migration the QEMU listens for already (pool.ts), the guest's
 *     clock/RNG message written before `cont`, and the RAM file's write-back started a little
 *     after the guest's first answers rather than during them.
 *
 * What stays, either way: the guest runs only once its memory (and, when verified, memory and
 * disk) matched the snapshot's checksums and its device state loaded; the restore resolves
 * only once the guest answered that its clock is set and its RNG reseeded, as before (and
 * callers route requests to the guest only after that).
 */
import path from 'node:path';
import { fsyncFile } from '../../common/fs.ts';
import { dataChecksumKey } from '../snapshot.ts';
import { identityBeforeReading, isVerified } from '../verified-files.ts';
import type { GuestChannel } from '../guest-channel.ts';
import { grantLaunchAccess } from '../launch-sandbox.ts';
import type { PhaseClock } from '../phases.ts';
import type { DiskSpec, PortForward, SnapshotManifest } from '../types.ts';
import type { PooledQemu, PrefilledRam } from './pool.ts';
import type { QmpClient } from './qmp.ts';

/**
 * Gives the placed QEMU its files, its disk and its port forwards (`resolving`: the host ports,
 * being picked meanwhile). Marks `disk_grant` and `disk_attach` (with the forwards). `inline`:
 * `restoreTuning.pooledInline` as the restore began.
 */
export async function attachPooled(
  pooled: PooledQemu,
  files: { runDir: string; qemuDir: string; ramPath: string; disk: DiskSpec },
  resolving: Promise<Required<PortForward>[]>,
  inline: boolean,
  clock: PhaseClock,
): Promise<Required<PortForward>[]> {
  const paths = { runDir: files.runDir, processDir: files.qemuDir, ramPath: files.ramPath, disk: files.disk, openedFiles: [] };
  if (!inline) {
    // The ports and the disk side by side (QMP answers one command after the other).
    const forwarding = resolving.then(async (resolved) => {
      await pooled.forward(resolved);
      return resolved;
    });
    forwarding.catch(() => undefined);
    await grantLaunchAccess(pooled.identity, paths, { egress: pooled.key.egress });
    clock.mark('disk_grant');
    await pooled.attachDisk(files.disk);
    clock.mark('disk_attach');
    return forwarding;
  }
  await grantLaunchAccess(pooled.identity, paths, { egress: pooled.key.egress, inline: true });
  clock.mark('disk_grant');
  const forwards = await resolving;
  await pooled.attachDiskAndForward(files.disk, forwards);
  clock.mark('disk_attach');
  return forwards;
}

/**
 * Starts the vCPUs of a restored VM whose device state is loaded (`cont`) and has the guest set
 * its clock and reseed its RNG (`guest_clock_rng`). `inline`: the guest's message is written
 * before `cont`, not after its answer.
 */
export async function continueRestored(vm: { qmp: QmpClient; guest: GuestChannel }, inline: boolean, clock: PhaseClock): Promise<void> {
  if (!inline) {
    await vm.qmp.execute('cont', {});
    clock.mark('cont');
    await vm.guest.restoreFromSnapshot(5000);
    clock.mark('guest_clock_rng');
    return;
  }
  // The message waits in the guest channel's socket (or, read by QEMU while the vCPUs are still
  // stopped, in the guest's receive queue) and is there for cocoon-init when they start.
  const restored = vm.guest.restoreFromSnapshot(5000);
  restored.catch(() => undefined); // awaited below unless `cont` fails first
  await vm.qmp.execute('cont', {});
  clock.mark('cont');
  await restored;
  clock.mark('guest_clock_rng');
}

/** How a restore's device state is loaded and its guest started (qemu.ts `restore`'s `start`). */
export interface RestoreStart {
  /** The QEMU listens for its device state already (pool.ts). */
  listening: boolean;
  /** `restoreTuning.pooledInline` as the restore began: the state read in one call, the guest's message before `cont`. */
  inline: boolean;
}

/** How long after a restore its RAM file's write-back starts (`writeBackRamLater`). */
const RAM_WRITEBACK_DELAY_MS = 2000;

/**
 * Starts writing a restored VM's RAM file back to disk, so that the fsync of a later snapshot
 * only has the pages dirtied since (a fresh copy's pages are all dirty). `later`: after
 * RAM_WRITEBACK_DELAY_MS, not while the guest gives its first answers: on a small host the
 * write-back of the copy (tens of MiB, and ext4's conversion of the reserved blocks) takes CPU
 * from them. A file gone by then (the VM suspended or ended) is nothing to write back; nor is
 * one of that name whose VM has ended (`ended`): the RAM file of the next VM in the same run
 * directory (a resume right after a suspend), whose guest may be giving its first answers.
 */
export function writeBackRamLater(ramPath: string, later: boolean, ended: () => boolean = () => false): void {
  if (!later) {
    fsyncFile(ramPath).catch(() => undefined);
    return;
  }
  setTimeout(() => {
    if (!ended()) fsyncFile(ramPath).catch(() => undefined);
  }, RAM_WRITEBACK_DELAY_MS).unref();
}

/**
 * Whether a pooled QEMU's RAM file, copied ahead from `prefilled.file` (pool.ts), holds the
 * verified memory of this restore: the snapshot's memory file is that same file, unchanged
 * since (its identity), and it and the snapshot's disk are remembered as verified against the
 * manifest's checksums in the identities they have now (verified-files.ts). Then the restore
 * copies nothing; otherwise it copies (and checks) as without the pool's copy.
 */
export async function prefilledWith(prefilled: PrefilledRam, memFile: string, manifest: SnapshotManifest): Promise<boolean> {
  const { mem, disk } = manifest.files;
  if (mem.sizeBytes !== prefilled.sizeBytes || (await identityBeforeReading(memFile)) !== prefilled.identity) return false;
  const diskFile = path.join(path.dirname(memFile), disk.name);
  return (await isVerified(memFile, dataChecksumKey(mem.checksum))) && (await isVerified(diskFile, dataChecksumKey(disk.checksum)));
}
