/**
 * Per-VM CPU, memory and process limits with Linux control groups, where the host lets us.
 *
 * Each QEMU joins its own group, made under the daemon's own group in every hierarchy (so a
 * host that confines the daemon confines its VMs too): `<daemon's group>/cocoon-vms/<vm>`.
 * The shell that starts QEMU joins the groups before it execs QEMU, so nothing QEMU does
 * escapes them. On QEMU's exit the group is removed.
 *
 * - cgroup v2 (one unified hierarchy with the cpu, memory and pids controllers): `cpu.max`,
 *   `memory.max`, `pids.max`.
 * - cgroup v1 (separate cpu, memory and pids hierarchies, as on hosts with a hybrid layout):
 *   `cpu.cfs_quota_us`, `memory.limit_in_bytes`, `pids.max`.
 *
 * The VMs' group keeps the default CPU weight. A lower one (tried: `cpu.shares` 512) did not
 * make the daemon more responsive under guests spinning every vCPU (p50 ratio 0.95 either way)
 * and slowed restores whenever anything else on the host wanted CPU (restore p50 +60 ms).
 *
 * Where neither works (no controllers mounted, no write access, cgroup v2 whose controllers
 * the daemon's group cannot delegate), VMs run without these limits and the reason is logged
 * once. `COCOON_VM_CGROUPS=0` turns them off.
 */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { errorMessage } from '../common/errors.ts';
import { log } from '../common/log.ts';
import { setting } from '../common/settings.ts';

/** Per-VM limits enforced with cgroups where the host allows (below). */
export interface VmLimits {
  /** CPU time per wall time, in cores (e.g. 1.5); default: the VM's vCPU count. */
  cpus?: number;
  /** Memory of the QEMU process (guest RAM pages in the page cache included), bytes. */
  memoryBytes?: number;
  /** Processes and threads in the group. */
  pids?: number;
}

const ROOT = '/sys/fs/cgroup';
const PARENT = 'cocoon-vms';
const PERIOD_US = 100_000;

export interface VmCgroup {
  version: 1 | 2;
  /** One directory per hierarchy. */
  dirs: string[];
  limits: Required<VmLimits>;
}

type Layout =
  | { version: 2; parent: string }
  | { version: 1; parents: { cpu: string; memory: string; pids: string } }
  | { version: 0; reason: string };

let layout: Layout | undefined;

/** The daemon's own group in each hierarchy, from /proc/self/cgroup (`id:controllers:path`). */
function ownGroups(): Map<string, string> {
  const groups = new Map<string, string>();
  for (const line of fs.readFileSync('/proc/self/cgroup', 'utf8').split('\n')) {
    const match = /^\d+:([^:]*):(.*)$/.exec(line);
    if (!match) continue;
    const [, controllers = '', where = '/'] = match;
    if (controllers === '') groups.set('', where);
    for (const controller of controllers.split(',')) if (controller) groups.set(controller, where);
  }
  return groups;
}

function write(file: string, value: string | number): void {
  fs.writeFileSync(file, String(value));
}

function detect(): Layout {
  if (!setting('COCOON_VM_CGROUPS')) return { version: 0, reason: 'COCOON_VM_CGROUPS=0' };
  try {
    const groups = ownGroups();
    const unified = path.join(ROOT, 'cgroup.controllers');
    if (fs.existsSync(unified)) {
      const controllers = fs.readFileSync(unified, 'utf8').split(/\s+/);
      if (!['cpu', 'memory', 'pids'].every((c) => controllers.includes(c))) {
        return { version: 0, reason: `cgroup v2 lacks a controller (has: ${controllers.join(' ')})` };
      }
      const own = path.join(ROOT, groups.get('') ?? '/');
      const parent = path.join(own, PARENT);
      fs.mkdirSync(parent, { recursive: true });
      // v2 lets a group hand controllers to its children only if it holds no process itself
      // (the root excepted): this works for a daemon in the root group or in a delegated one.
      write(path.join(own, 'cgroup.subtree_control'), '+cpu +memory +pids');
      write(path.join(parent, 'cgroup.subtree_control'), '+cpu +memory +pids');
      return { version: 2, parent };
    }
    const parents = { cpu: '', memory: '', pids: '' };
    for (const controller of ['cpu', 'memory', 'pids'] as const) {
      const mount = path.join(ROOT, controller);
      if (!fs.existsSync(path.join(mount, 'cgroup.procs'))) return { version: 0, reason: `no cgroup v1 ${controller} hierarchy at ${mount}` };
      const parent = path.join(mount, groups.get(controller) ?? '/', PARENT);
      fs.mkdirSync(parent, { recursive: true });
      parents[controller] = parent;
    }
    return { version: 1, parents };
  } catch (error) {
    return { version: 0, reason: errorMessage(error) };
  }
}

function currentLayout(): Layout {
  if (!layout) {
    layout = detect();
    if (layout.version === 0) log.warn({ reason: layout.reason }, 'per-VM CPU and memory limits are off: cgroups are not usable here');
    else {
      log.info({ cgroup: layout.version }, 'per-VM CPU, memory and process limits on');
      sweepVmCgroups();
    }
  }
  return layout;
}

/** Whether per-VM limits are enforced on this host, and why not. */
export function cgroupSupport(): { version: 0 | 1 | 2; reason?: string } {
  const current = currentLayout();
  return current.version === 0 ? { version: 0, reason: current.reason } : { version: current.version };
}

/**
 * The limits a VM gets unless told otherwise: its vCPU count in CPU time, its RAM plus what
 * QEMU itself needs (under TCG the translation cache may grow to 1 GiB), 256 processes.
 */
export function defaultLimits(shape: { vcpus: number; memoryMiB: number; accel: string }): Required<VmLimits> {
  const overheadMiB = 256 + (shape.accel === 'tcg' ? 1024 : 0);
  return { cpus: shape.vcpus, memoryBytes: (shape.memoryMiB + overheadMiB) * 1024 * 1024, pids: 256 };
}

/** Makes the group of one VM with its limits; undefined where the host has no usable cgroups. */
export function createVmCgroup(id: string, limits: Required<VmLimits>): VmCgroup | undefined {
  const current = currentLayout();
  if (current.version === 0) return undefined;
  const name = `${id}-${randomBytes(4).toString('hex')}`;
  const quota = Math.max(1000, Math.round(limits.cpus * PERIOD_US));
  const made: string[] = [];
  try {
    if (current.version === 2) {
      const dir = path.join(current.parent, name);
      fs.mkdirSync(dir);
      made.push(dir);
      write(path.join(dir, 'cpu.max'), `${quota} ${PERIOD_US}`);
      write(path.join(dir, 'memory.max'), limits.memoryBytes);
      write(path.join(dir, 'memory.swap.max'), 0);
      write(path.join(dir, 'pids.max'), limits.pids);
      return { version: 2, dirs: made, limits };
    }
    const { cpu, memory, pids } = current.parents;
    const cpuDir = path.join(cpu, name);
    const memoryDir = path.join(memory, name);
    const pidsDir = path.join(pids, name);
    for (const dir of [cpuDir, memoryDir, pidsDir]) {
      fs.mkdirSync(dir);
      made.push(dir);
    }
    write(path.join(cpuDir, 'cpu.cfs_period_us'), PERIOD_US);
    write(path.join(cpuDir, 'cpu.cfs_quota_us'), quota);
    write(path.join(memoryDir, 'memory.limit_in_bytes'), limits.memoryBytes);
    write(path.join(pidsDir, 'pids.max'), limits.pids);
    return { version: 1, dirs: made, limits };
  } catch (error) {
    for (const dir of made.reverse()) {
      try {
        fs.rmdirSync(dir);
      } catch {
        // left for the sweep
      }
    }
    log.warn({ vm: id, error: errorMessage(error) }, 'cannot make the VM\'s cgroup; it runs without limits');
    return undefined;
  }
}

/**
 * The shell command (for `sh -c`) that moves the shell into the VM's groups and then runs its
 * arguments: `exec "$@"` keeps the pid, so QEMU is in the groups from its first instruction.
 */
export function joinCgroupScript(group: VmCgroup | undefined): string {
  if (!group) return 'exec "$@"';
  const joins = group.dirs.map((dir) => `echo $$ > '${path.join(dir, 'cgroup.procs')}' || exit 125`);
  return [...joins, 'exec "$@"'].join('; ');
}

/** Removes a VM's groups once its processes are gone (a few tries while the kernel lets go). */
export async function removeVmCgroup(group: VmCgroup | undefined): Promise<void> {
  if (!group) return;
  for (const dir of group.dirs) {
    for (let attempt = 0; attempt < 20; attempt++) {
      try {
        fs.rmdirSync(dir);
        break;
      } catch (error) {
        const code = (error as NodeJS.ErrnoException).code;
        if (code === 'ENOENT') break;
        if (code !== 'EBUSY' || attempt === 19) {
          log.debug({ dir, error: errorMessage(error) }, 'cannot remove a VM cgroup');
          break;
        }
        await new Promise((resolve) => setTimeout(resolve, 25));
      }
    }
  }
}

/**
 * Removes the groups of VMs that are gone: empty ones (a group with a process in it cannot be
 * removed) older than a minute (a younger one may be waiting for its QEMU to join).
 */
export function sweepVmCgroups(): number {
  const current = layout;
  if (!current || current.version === 0) return 0;
  const parents = current.version === 2 ? [current.parent] : Object.values(current.parents);
  let removed = 0;
  for (const parent of parents) {
    for (const entry of fs.readdirSync(parent, { withFileTypes: true })) {
      if (!entry.isDirectory()) continue;
      const dir = path.join(parent, entry.name);
      try {
        if (Date.now() - fs.statSync(dir).mtimeMs < 60_000) continue;
        fs.rmdirSync(dir);
        removed++;
      } catch {
        // still in use
      }
    }
  }
  return removed;
}

/** Reads one of a VM group's files (tests, stats), e.g. `cpu.stat` or `memory.max_usage_in_bytes`. */
export function readVmCgroupFile(group: VmCgroup, file: string): string | undefined {
  for (const dir of group.dirs) {
    const candidate = path.join(dir, file);
    if (fs.existsSync(candidate)) return fs.readFileSync(candidate, 'utf8');
  }
  return undefined;
}
