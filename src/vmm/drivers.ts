/**
 * Which VM driver this host uses. One today (QEMU); where a second arrives, the choice (a
 * setting, or what the host supports) is made here and nowhere else.
 */
import type { VmDriver } from './driver.ts';
import { qemuDriver } from './qemu/driver.ts';

export function defaultVmDriver(): VmDriver {
  return qemuDriver;
}
