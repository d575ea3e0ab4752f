/**
 * Keeps a guest safe while the data directory's filesystem is full. Two cases:
 *
 * - Its disk: a guest whose disk write cannot be stored (the qcow2 layer cannot grow) is paused
 *   by QEMU rather than given an I/O error: `BLOCK_IO_ERROR` with `nospace`, status `io-error`.
 *   Nothing is lost (QEMU keeps the failed request and retries it on `cont`), but nothing would
 *   ever continue the guest either. This watches for that pause and continues the guest once the
 *   filesystem has room again.
 * - Its memory, when its RAM file is sparse (a big guest: ram-file.ts): a page the guest writes
 *   for the first time needs a block then and there, and a full disk would kill QEMU (SIGBUS).
 *   The space ledger admitted the VM only with room for all of its memory, but something outside
 *   the ledger (another program, disk layers, logs) may fill the disk anyway. So for such a VM
 *   free space is checked every `intervalMs` while it runs: below `minFreeBytes` the guest is
 *   stopped (QMP `stop`: vCPUs halted, memory and devices as they are, requests wait), and
 *   continued once twice that is free. Best effort: a guest that touches more new memory than
 *   `minFreeBytes` within one interval can still meet a full disk. A guest whose RAM file is
 *   reserved is never stopped for this (its blocks are its own).
 *
 * Neither stops nor continues a guest while a snapshot or fork point holds it (`pauseHeld`).
 */
import fs from 'node:fs';
import { errorMessage } from '../../common/errors.ts';
import { log } from '../../common/log.ts';
import type { SpaceWatchOptions } from '../driver.ts';
import { reservesRam } from '../ram-file.ts';
import type { QmpEvent } from './qmp.ts';
import type { QemuVm } from './qemu.ts';

export type { SpaceWatchOptions };

/**
 * Whether the VM's RAM file has blocks still to allocate: not reserved (a big guest, or tmpfs, or
 * a setting changed since), as the file itself says.
 */
function ramIsSparse(vm: QemuVm): boolean {
  try {
    const stats = fs.statSync(vm.ramPath);
    return stats.blocks * 512 < stats.size;
  } catch {
    return !reservesRam(vm.shape.memoryMiB * 1024 * 1024); // moved away meanwhile (a snapshot)
  }
}

/** Starts watching; the returned function stops (it also stops by itself when QEMU exits). */
export function watchDiskSpace(vm: QemuVm, options: SpaceWatchOptions): () => void {
  const minFree = options.minFreeBytes ?? 64 * 1024 * 1024;
  const intervalMs = options.intervalMs ?? 2000;
  const sparseRam = ramIsSparse(vm);
  let timer: NodeJS.Timeout | undefined;
  let stopped = false;
  /** QEMU paused the guest on a disk write that found no space (`io-error`). */
  let diskWaiting = false;
  /** This watch stopped the guest: too little space left for its sparse memory. */
  let stoppedForMemory = false;

  const freeBytes = async () => {
    const stats = await fs.promises.statfs(options.path);
    return stats.bavail * stats.bsize;
  };

  const checkDisk = async (free: number) => {
    if (free < minFree) return;
    const { status } = await vm.qmp.execute('query-status', {});
    if (status === 'io-error') await vm.qmp.execute('cont', {});
    if (status === 'io-error' || status === 'running') {
      diskWaiting = false;
      log.info({ vm: vm.id }, 'the data directory has space again: guest continued');
      options.onContinued?.();
    }
    // Paused by someone else meanwhile (a snapshot): look again later.
  };

  const checkMemory = async (free: number) => {
    if (vm.pauseHeld) return;
    if (!stoppedForMemory && free < minFree) {
      const { status } = await vm.qmp.execute('query-status', {});
      if (status !== 'running' || vm.pauseHeld) return;
      await vm.qmp.execute('stop', {});
      stoppedForMemory = true;
      log.warn({ vm: vm.id, freeBytes: free }, 'guest stopped: the data directory is nearly full and its memory is not reserved; it continues once there is room');
      options.onPaused?.('memory');
    } else if (stoppedForMemory && free >= 2 * minFree) {
      const { status } = await vm.qmp.execute('query-status', {});
      if (vm.pauseHeld) return;
      stoppedForMemory = false;
      if (status === 'paused') await vm.qmp.execute('cont', {});
      if (status === 'paused' || status === 'running') {
        log.info({ vm: vm.id }, 'the data directory has space again: guest continued');
        options.onContinued?.();
      }
    }
  };

  const check = async () => {
    timer = undefined;
    if (stopped || vm.exited) return;
    try {
      const free = await freeBytes();
      if (diskWaiting) await checkDisk(free);
      if (sparseRam && !stopped && !vm.exited) await checkMemory(free);
    } catch (error) {
      if (vm.exited) return;
      log.debug({ vm: vm.id, error: errorMessage(error) }, 'free-space check failed; trying again');
    }
    schedule();
  };
  const schedule = () => {
    if (stopped || timer || !(diskWaiting || sparseRam)) return;
    timer = setTimeout(() => void check(), intervalMs);
    timer.unref();
  };
  const onEvent = (event: QmpEvent) => {
    if (event.event !== 'BLOCK_IO_ERROR' || event.data?.nospace !== true || diskWaiting) return;
    diskWaiting = true;
    log.warn({ vm: vm.id }, 'guest paused by QEMU: no space left for its disk on the data directory; it continues once there is room');
    options.onPaused?.('disk');
    schedule();
  };
  const stop = () => {
    stopped = true;
    if (timer) clearTimeout(timer);
    vm.qmp.off('event', onEvent);
  };
  vm.qmp.on('event', onEvent);
  void vm.waitForExit().then(stop);
  schedule();
  return stop;
}
