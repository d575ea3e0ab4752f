/**
 * What a snapshot and a launch need beyond the happy path: which error a failed snapshot
 * reports, and who owns the files QEMU uses (src/host/sandbox.ts).
 */
import fs from 'node:fs';
import path from 'node:path';
import { CocoonError, errorMessage } from '../common/errors.ts';
import type { DiskSpec, GuestKernel } from './types.ts';
import { type QemuIdentity, assertReadable, backingChain, giveToQemu, grantSearch, keepFromQemu, qemuIdentity, shareReadOnly } from '../host/sandbox.ts';

/** Whether an error (or one it wraps) says the disk is full. */
export function isNoSpace(error: unknown): boolean {
  for (let e = error, depth = 0; e && depth < 8; e = (e as { cause?: unknown }).cause, depth++) {
    if (e instanceof CocoonError && e.code === 'no_space') return true;
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOSPC' || code === 'EDQUOT') return true;
    if (/ENOSPC|no space left/i.test(errorMessage(e))) return true;
  }
  return false;
}

function isFsyncError(error: unknown): boolean {
  for (let e = error, depth = 0; e && depth < 8; e = (e as { cause?: unknown }).cause, depth++) {
    const { syscall } = e as NodeJS.ErrnoException;
    if (syscall === 'fsync' || syscall === 'fdatasync') return true;
  }
  return false;
}

/**
 * The error a failed snapshot reports. `details.vmRunning`: the VM runs on as before (the
 * snapshot was abandoned before QEMU was ended); `details.vmAlive`: its QEMU still exists
 * (running, or paused as it was before the call, e.g. after a guest disk error).
 */
export function snapshotFailure(error: unknown, vmId: string, vmGone: boolean, vm: { running: boolean; alive: boolean }): CocoonError {
  const details = { vmRunning: vm.running, vmAlive: vm.alive };
  const after = vm.running ? 'the VM runs on as before' : vm.alive ? 'the VM is paused as it was' : 'the VM is stopped';
  if (isNoSpace(error) && !isFsyncError(error)) {
    return new CocoonError(
      'no_space',
      `no space left on the data directory's disk for the snapshot of ${vmId}; nothing was written, ${after}: ${errorMessage(error)}`,
      { status: 507, cause: error, details },
    );
  }
  if (vmGone) {
    return new CocoonError('vm_gone', `QEMU of ${vmId} exited during its snapshot; no snapshot was made and earlier ones are untouched`, {
      status: 409,
      cause: error,
      details,
    });
  }
  if (error instanceof CocoonError && error.code !== 'qmp_error' && error.code !== 'vm_connect_failed') {
    return new CocoonError(error.code, error.message, { status: error.status, cause: error, details: { ...error.details, ...details } });
  }
  return new CocoonError(
    'snapshot_failed',
    `the snapshot of ${vmId} was abandoned (${errorMessage(error)}); nothing was committed, ${after}`,
    { cause: error, details },
  );
}

/**
 * A committed snapshot's files are root's: the memory file private (only the daemon copies it),
 * the disk readable by QEMU (later VMs use it as their backing file) but by no one writable.
 */
export async function sealSnapshotFiles(runDir: string, files: { mem: string; disk: string }): Promise<void> {
  const identity = await qemuIdentity(runDir);
  if (!identity) return;
  await keepFromQemu(files.mem);
  await shareReadOnly(files.disk, identity);
}

/** After an abandoned snapshot: the VM's files are its QEMU's again. */
export async function takeBackSnapshotFiles(runDir: string, files: string[]): Promise<void> {
  const identity = await qemuIdentity(runDir);
  if (!identity) return;
  for (const file of files) if (fs.existsSync(file)) await giveToQemu(file, identity);
}

/**
 * Before QEMU starts: the run directory is root's (0710, QEMU's group may enter), `qemu/` in it
 * is QEMU's own (sockets, pid file), and so are the RAM file and the disk it writes; its backing
 * files and the guest kernel must be readable by it.
 */
export async function grantQemuAccess(
  identity: QemuIdentity,
  paths: { runDir: string; qemuDir: string; ramPath: string; disk: DiskSpec; guest: GuestKernel },
): Promise<void> {
  await fs.promises.chown(paths.runDir, 0, identity.gid);
  await fs.promises.chmod(paths.runDir, 0o710);
  await grantSearch(paths.runDir, identity);
  await fs.promises.chown(paths.qemuDir, identity.uid, identity.gid);
  await fs.promises.chmod(paths.qemuDir, 0o700);
  await giveToQemu(paths.ramPath, identity);
  // A missing disk is QEMU's to report (vm_start_failed, in its own words).
  if (!fs.existsSync(paths.disk.path)) return;
  if (paths.disk.readOnly) await shareReadOnly(paths.disk.path, identity);
  else {
    await giveToQemu(paths.disk.path, identity);
    await grantSearch(paths.disk.path, identity);
  }
  for (const backing of await backingChain(paths.disk.path)) {
    const st = await fs.promises.stat(backing);
    // Snapshot disks are sealed 0640 root:cocoon-qemu; older ones (or a caller's base) are made so.
    if (st.uid !== 0 || st.gid !== identity.gid || (st.mode & 0o040) === 0 || (st.mode & 0o022) !== 0) {
      if (st.uid === 0) await shareReadOnly(backing, identity);
    }
    await grantSearch(backing, identity);
    await assertReadable(backing, identity);
  }
  // The kernel and initramfs reach QEMU as open files (/dev/fd/3, /dev/fd/4: startQemu), so
  // only the files' own permissions matter, not their directories'.
  for (const file of [paths.guest.kernel, paths.guest.initramfs]) {
    if ((fs.statSync(file).mode & 0o004) === 0) {
      throw new CocoonError('qemu_no_access', `QEMU runs as an unprivileged user and cannot read ${file}: make it readable by all (chmod a+r)`);
    }
  }
}

export const QEMU_SUBDIR = 'qemu';

/** Where QEMU's sockets and pid file live inside a run directory. */
export function qemuDirOf(runDir: string): string {
  return path.join(runDir, QEMU_SUBDIR);
}
