/**
 * A guest whose disk write cannot be stored (the data directory's filesystem is full, so the
 * qcow2 layer cannot grow) is paused by QEMU rather than given an I/O error: `BLOCK_IO_ERROR`
 * with `nospace`, status `io-error`. Nothing is lost (QEMU keeps the failed request and
 * retries it on `cont`), but nothing would ever continue the guest either. This watches for
 * that pause and continues the guest once the filesystem has room again.
 */
import fs from 'node:fs';
import { errorMessage } from '../../common/errors.ts';
import { log } from '../../common/log.ts';
import type { SpaceWatchOptions } from '../driver.ts';
import type { QmpEvent } from './qmp.ts';
import type { QemuVm } from './qemu.ts';

export type { SpaceWatchOptions };

/** Starts watching; the returned function stops (it also stops by itself when QEMU exits). */
export function watchDiskSpace(vm: QemuVm, options: SpaceWatchOptions): () => void {
  const minFree = options.minFreeBytes ?? 64 * 1024 * 1024;
  const intervalMs = options.intervalMs ?? 2000;
  let timer: NodeJS.Timeout | undefined;
  let stopped = false;

  const check = async () => {
    timer = undefined;
    if (stopped || vm.exited) return;
    try {
      const stats = await fs.promises.statfs(options.path);
      if (stats.bavail * stats.bsize >= minFree) {
        const { status } = await vm.qmp.execute('query-status', {});
        if (status === 'io-error') await vm.qmp.execute('cont', {});
        if (status === 'io-error' || status === 'running') {
          log.info({ vm: vm.id }, 'the data directory has space again: guest continued');
          options.onContinued?.();
          return;
        }
        // Paused by someone else meanwhile (a snapshot): look again later.
      }
    } catch (error) {
      if (vm.exited) return;
      log.debug({ vm: vm.id, error: errorMessage(error) }, 'free-space check failed; trying again');
    }
    schedule();
  };
  const schedule = () => {
    if (stopped || timer) return;
    timer = setTimeout(() => void check(), intervalMs);
    timer.unref();
  };
  const onEvent = (event: QmpEvent) => {
    if (event.event !== 'BLOCK_IO_ERROR' || event.data?.nospace !== true || timer) return;
    log.warn({ vm: vm.id }, 'guest paused by QEMU: no space left for its disk on the data directory; it continues once there is room');
    options.onPaused?.();
    schedule();
  };
  const stop = () => {
    stopped = true;
    if (timer) clearTimeout(timer);
    vm.qmp.off('event', onEvent);
  };
  vm.qmp.on('event', onEvent);
  void vm.waitForExit().then(stop);
  return stop;
}
