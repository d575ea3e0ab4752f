/** Where QEMU's own files live inside a run directory. */
import path from 'node:path';

/** The subdirectory of a run directory that is QEMU's own (its sockets and pid file; src/host/sandbox.ts: the run directory is root's). */
export const QEMU_SUBDIR = 'qemu';

export function qemuDirOf(runDir: string): string {
  return path.join(runDir, QEMU_SUBDIR);
}

/** The sockets QEMU listens on inside its directory (QMP, the guest channel, the serial console, the exec agent). */
export function qemuSocketsOf(qemuDir: string): { qmp: string; guest: string; serial: string; agent: string } {
  return {
    qmp: path.join(qemuDir, 'qmp.sock'),
    guest: path.join(qemuDir, 'guest.sock'),
    serial: path.join(qemuDir, 'serial.sock'),
    agent: path.join(qemuDir, 'agent.sock'),
  };
}

/** What a QEMU makes in its directory: its pid file and every socket it listens on (those above, the device state's two). */
export const QEMU_OWN_NAMES: readonly string[] = ['qemu.pid', 'qmp.sock', 'guest.sock', 'serial.sock', 'agent.sock', 'incoming.sock', 'migrate.sock'];
