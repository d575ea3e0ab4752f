/**
 * Processes seen from /proc: finding a VMM's processes that belong to a directory (orphans after
 * a daemon crash), telling whether a pid is still the process we started (pids are reused), and
 * killing and waiting for processes that are not our children (adopted after a restart).
 */
import fs from 'node:fs';
import { CocoonError } from '../common/errors.ts';

/** Start time of a process in clock ticks since boot (field 22 of /proc/<pid>/stat), or undefined when gone. */
export function processStartTime(pid: number): number | undefined {
  const fields = statFields(pid);
  if (fields === undefined || fields[0] === 'Z' || fields[0] === 'X') return undefined;
  const start = Number(fields[19]);
  return Number.isFinite(start) ? start : undefined;
}

/** Fields of /proc/<pid>/stat after the command name: [state, ppid, ...]. */
function statFields(pid: number): string[] | undefined {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  } catch {
    return undefined;
  }
}

/** Whether `pid` is alive (not a zombie) and, when given, started at `startTime`. */
export function processAlive(pid: number, startTime?: number): boolean {
  if (!Number.isInteger(pid) || pid <= 0) return false;
  const start = processStartTime(pid);
  return start !== undefined && (startTime === undefined || start === startTime);
}

export function processCmdline(pid: number): string {
  try {
    return fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').replaceAll('\0', ' ');
  } catch {
    return '';
  }
}

/** The working directory of `pid` (it follows renames of the directory), or undefined when unreadable. */
export function processCwd(pid: number): string | undefined {
  try {
    return fs.readlinkSync(`/proc/${pid}/cwd`);
  } catch {
    return undefined;
  }
}

/** Whether `file` is `dir` or below it. */
function isAtOrUnder(file: string, dir: string): boolean {
  const base = dir.endsWith('/') && dir.length > 1 ? dir.slice(0, -1) : dir;
  return file === base || file.startsWith(`${base}/`);
}

/**
 * PIDs of live processes whose command line mentions both `program` and `marker` (a run
 * directory). `byCwd`: also those of `program` whose working directory is at or below `marker`
 * (a VM process started ahead with relative paths, then given its run directory by a rename:
 * src/vmm/qemu/pool.ts), except where that directory's path contains `exceptCwd`.
 */
export function findProcesses(program: string, marker: string, options: { byCwd?: boolean; exceptCwd?: string } = {}): number[] {
  const pids: number[] = [];
  for (const entry of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    const cmdline = processCmdline(Number(entry));
    if (!cmdline.includes(program)) continue;
    let matches = cmdline.includes(marker);
    if (!matches && options.byCwd) {
      const cwd = processCwd(Number(entry));
      matches = cwd !== undefined && isAtOrUnder(cwd, marker) && !(options.exceptCwd && cwd.includes(options.exceptCwd));
    }
    if (matches && processAlive(Number(entry))) pids.push(Number(entry));
  }
  return pids;
}

/** Resolves once `pid` (started at `startTime`) is gone; polls, since it need not be our child. */
export function waitForProcessExit(pid: number, startTime: number | undefined, options: { intervalMs?: number; keepAlive?: () => boolean } = {}): Promise<void> {
  const interval = options.intervalMs ?? 100;
  return new Promise((resolve) => {
    const check = () => {
      if (!processAlive(pid, startTime)) return resolve();
      const timer = setTimeout(check, interval);
      if (!(options.keepAlive?.() ?? false)) timer.unref();
    };
    check();
  });
}

/** SIGKILLs every process `findProcesses` finds (but those in `keep`) and waits until they are gone; answers their pids. */
export async function killProcesses(
  program: string,
  marker: string,
  keep?: ReadonlySet<number>,
  options: { byCwd?: boolean; exceptCwd?: string } = {},
): Promise<number[]> {
  const pids = findProcesses(program, marker, options).filter((pid) => !keep?.has(pid));
  for (const pid of pids) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // gone meanwhile
    }
  }
  await Promise.all(pids.map((pid) => waitForProcessExit(pid, undefined, { intervalMs: 10, keepAlive: () => true })));
  return pids;
}

/** CPU time and resident memory of a process, from /proc. */
export function processStats(pid: number): { pid: number; rssBytes: number; cpuMs: number } {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    const ticks = Number(fields[11]) + Number(fields[12]); // utime + stime
    const status = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
    const rssKiB = Number(/VmRSS:\s+(\d+)/.exec(status)?.[1] ?? 0);
    return { pid, rssBytes: rssKiB * 1024, cpuMs: (ticks * 1000) / 100 };
  } catch {
    throw new CocoonError('vm_gone', `process ${pid} is not running`);
  }
}
