/**
 * What every VM driver does around the start of a VM's process, whatever the VMM: the same
 * host plumbing for QEMU today and for a second driver (Firecracker, say) later.
 *
 *   1. `launchIdentity`    who the process runs as (its own uid: src/host/sandbox.ts), and the
 *                          egress guard for that uid in place (src/net/egress-guard.ts)
 *   2. (the driver makes the VM's files: RAM file, disk layer)
 *   3. `grantLaunchAccess` those files given to that uid; where a layout keeps them out of its
 *                          reach, the process runs as root (unless that is refused)
 *   4. `startSandboxed`    the VM's cgroup made with its limits (src/host/cgroups.ts) and the
 *                          command started in it as that uid, in its own process group; the
 *                          cgroup goes when the process does
 *
 * The driver adds only what is its own: its command line, its sockets, which files it hands
 * over as open descriptors.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { isCocoonError } from '../common/errors.ts';
import { log } from '../common/log.ts';
import { setting } from '../common/settings.ts';
import { type VmCgroup, type VmLimits, createVmCgroup, defaultLimits, joinCgroupScript, removeVmCgroup } from '../host/cgroups.ts';
import { type VmIdentity, asyncFs, dropPrivilegesArgv, grantVmAccess, inlineFs, vmIdentity } from '../host/sandbox.ts';
import { ensureEgressGuard } from '../net/egress-guard.ts';

export type { VmCgroup, VmIdentity };

/**
 * Who the process of the VM in `runDir` (which must exist) runs as: undefined when it keeps the
 * daemon's user. The egress guard is put in place for it: required for a VM with egress
 * (`egress_unguarded` where it cannot be), tried in the background for one without (it also
 * keeps a process that escaped its guest from the host's services).
 */
export async function launchIdentity(runDir: string, egress: boolean): Promise<VmIdentity | undefined> {
  const identity = await vmIdentity(runDir);
  if (egress) await ensureEgressGuard(identity);
  else await ensureEgressGuard(identity, { bestEffort: true });
  return identity;
}

/**
 * Gives the VM's files to `identity` (host/sandbox.ts `grantVmAccess`) and answers who the
 * process runs as then: `identity`, or undefined where the files are out of the uid's reach (a
 * data directory under a private home) and falling back to root is allowed: not with
 * `COCOON_QEMU_USER_REQUIRED`, not for a VM with egress (the guard needs the uid).
 */
export async function grantLaunchAccess(
  identity: VmIdentity | undefined,
  paths: Parameters<typeof grantVmAccess>[1],
  /** `inline`: each file call made at once, not through the thread pool (host/sandbox.ts `inlineFs`): a restore's. */
  options: { egress: boolean; inline?: boolean },
): Promise<VmIdentity | undefined> {
  if (!identity) return undefined;
  try {
    await grantVmAccess(identity, paths, options.inline ? inlineFs : asyncFs);
    return identity;
  } catch (error) {
    if (!isCocoonError(error, 'qemu_no_access') || setting('COCOON_QEMU_USER_REQUIRED') || options.egress) throw error;
    warnRootFallback(error.message);
    return undefined;
  }
}

/** The limits a VM's cgroup gets: the shape's defaults, overridden by the caller's. */
export function launchLimits(shape: { vcpus: number; memoryMiB: number; accel: string }, limits: VmLimits | undefined): Required<VmLimits> {
  return { ...defaultLimits(shape), ...limits };
}

export interface SandboxedProcess {
  child: ChildProcess;
  /** Resolves once the process has exited and its cgroup is removed. */
  exit: Promise<void>;
  /** The VM's cgroup (undefined where the host has none usable): an adopter removes it once the process is gone. */
  cgroup: VmCgroup | undefined;
}

/**
 * Starts `argv` for VM `id` through `sh`, which joins the VM's cgroup, then `setpriv`, which
 * drops root (host/sandbox.ts); both exec, so the pid is the command's. It runs in its own
 * process group (a Ctrl-C to the daemon does not end guests) and outlives this process.
 * `stdio`: stdout and stderr both to `logFd`; `fds` become descriptors 3, 4, … in the child.
 */
export function startSandboxed(options: {
  id: string;
  argv: string[];
  identity: VmIdentity | undefined;
  limits: Required<VmLimits>;
  logFd: number;
  fds?: number[];
  /** Its working directory (a process started ahead names its files relative to it: vmm/qemu/pool.ts). */
  cwd?: string;
  /** Added to the daemon's environment for the command (e.g. LD_PRELOAD). */
  env?: Record<string, string>;
}): SandboxedProcess {
  const cgroup = createVmCgroup(options.id, options.limits);
  const [command, ...args] = options.argv;
  const child = spawn('/bin/sh', ['-c', joinCgroupScript(cgroup), 'cocoon-vm-start', ...dropPrivilegesArgv(options.identity, command as string, args)], {
    stdio: ['ignore', options.logFd, options.logFd, ...(options.fds ?? [])],
    detached: true,
    ...(options.cwd ? { cwd: options.cwd } : {}),
    ...(options.env ? { env: { ...process.env, ...options.env } } : {}),
  });
  child.unref();
  const exit = new Promise<void>((resolve) => {
    child.once('exit', () => resolve());
    child.once('error', () => resolve());
  }).then(() => removeVmCgroup(cgroup));
  return { child, exit, cgroup };
}

/** Removes the cgroup of an adopted VM's process once it has exited. */
export { removeVmCgroup };

const rootFallbackWarned = new Set<string>();

function warnRootFallback(why: string): void {
  if (rootFallbackWarned.has(why)) return;
  rootFallbackWarned.add(why);
  log.warn({ why }, 'QEMU runs as root for this VM: its files are out of reach of an unprivileged user (COCOON_QEMU_USER_REQUIRED=1 refuses instead)');
}
