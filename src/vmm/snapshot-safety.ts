/**
 * What a snapshot needs beyond the happy path: which error a failed snapshot reports, and who
 * owns its files once committed or given back (src/host/sandbox.ts).
 */
import fs from 'node:fs';
import { CocoonError, errorMessage } from '../common/errors.ts';
import { giveToVm, keepFromVm, shareReadOnly, vmIdentity } from '../host/sandbox.ts';

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
  const identity = await vmIdentity(runDir);
  if (!identity) return;
  await keepFromVm(files.mem);
  await shareReadOnly(files.disk, identity);
}

/** After an abandoned snapshot: the VM's files are its QEMU's again. */
export async function takeBackSnapshotFiles(runDir: string, files: string[]): Promise<void> {
  const identity = await vmIdentity(runDir);
  if (!identity) return;
  for (const file of files) if (fs.existsSync(file)) await giveToVm(file, identity);
}
