/** Where QEMU's own files live inside a run directory. */
import path from 'node:path';

/** The subdirectory of a run directory that is QEMU's own (its sockets and pid file; src/host/sandbox.ts: the run directory is root's). */
export const QEMU_SUBDIR = 'qemu';

export function qemuDirOf(runDir: string): string {
  return path.join(runDir, QEMU_SUBDIR);
}
