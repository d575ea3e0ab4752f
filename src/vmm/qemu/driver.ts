/** QEMU as a VM driver (src/vmm/driver.ts): the QemuVm class and the QEMU tools behind one object. */
import type { VmDriver } from '../driver.ts';
import { chooseAccelerator } from './accel.ts';
import { QEMU_ARCH } from './arch.ts';
import { createDiskLayer, rebaseDisk } from './disk-layers.ts';
import { qemuExitsSettled } from './exits.ts';
import { openQemuPool } from './pool.ts';
import { QemuVm, clearRunFiles, findQemuProcesses, killQemuProcesses, startQemu } from './qemu.ts';

export const qemuDriver: VmDriver = {
  name: 'qemu',
  arch: QEMU_ARCH,
  chooseAccelerator,
  boot: (options) => QemuVm.boot(options),
  restore: (options) => QemuVm.restore(options),
  adopt: (options) => QemuVm.adopt(options),
  recoverSnapshot: (targetDir, options) => QemuVm.recoverSnapshot(targetDir, options),
  sweep: (dir, options) => killQemuProcesses(dir, options?.keep),
  processesUnder: (dir) => findQemuProcesses(dir),
  clearRunFiles,
  openPool: (dir) => openQemuPool(dir, startQemu),
  exitsSettled: qemuExitsSettled,
  createDiskLayer,
  rebaseDisk,
};
