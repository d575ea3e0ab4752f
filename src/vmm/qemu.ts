/**
 * The QEMU driver: boot, snapshot, restore, kill and stats of one microVM.
 *
 * Every VM owns a run directory (sockets, RAM file, disk layer, logs). QEMU runs in its own
 * process group, writes its stderr to `qemu.log` there, and survives this process (so that a
 * restarted daemon can adopt it). Every failure path kills what it started and removes what it
 * made: a caller never has to clean up after a failed boot or restore.
 */
import { type ChildProcess, execFile, spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { CocoonError, errorMessage, isCocoonError } from '../common/errors.ts';
import { log } from '../common/log.ts';
import { GuestChannel } from './guest-channel.ts';
import { loadDeviceState, saveDeviceState } from './migration.ts';
import { type QemuLaunch, hostTscKhz, kernelCmdline, qemuArgs } from './qemu-args.ts';
import { QmpClient } from './qmp.ts';
import { assertPortFree, freeLoopbackPort } from './ports.ts';
import { cloneRamFile, createRamFile, digHoles } from './ram-file.ts';
import { SerialLog, tailSerialLog } from './serial-log.ts';
import { readSnapshotManifest, verifySnapshot, writeSnapshotManifest } from './snapshot.ts';
import {
  type BootOptions,
  type CommonVmOptions,
  type DiskSpec,
  LIMITS,
  type MachineShape,
  type PortForward,
  type RestoreOptions,
  type SnapshotManifest,
  type VmStats,
} from './types.ts';

const execFileAsync = promisify(execFile);
const QEMU_BINARY = process.env.COCOON_QEMU ?? 'qemu-system-x86_64';
const ID_PATTERN = /^[a-z0-9][a-z0-9-]{0,62}$/;
/** Unix socket paths are limited to 108 bytes by the kernel. */
const MAX_SOCKET_PATH = 107;

export const DEFAULT_BOOT_TIMEOUT_MS = 120_000;

export interface SnapshotOptions {
  /** Punch out zero pages of the RAM file, so that restores copy less (worth it for images). */
  compact?: boolean;
  /** fsync RAM, disk and state before the snapshot counts as taken (default true). */
  durable?: boolean;
}

export class QemuVm {
  readonly id: string;
  readonly runDir: string;
  readonly shape: MachineShape;
  readonly cmdline: string;
  readonly disk: DiskSpec;
  readonly ramPath: string;
  /** Guest port → host port on 127.0.0.1. */
  readonly hostPorts: ReadonlyMap<number, number>;
  readonly qmp: QmpClient;
  readonly guest: GuestChannel;
  readonly serialLogPath: string;
  private readonly child: ChildProcess;
  private readonly serial: SerialLog;
  private readonly exitPromise: Promise<void>;
  private gone = false;

  private constructor(parts: {
    launch: QemuLaunch;
    options: CommonVmOptions;
    child: ChildProcess;
    exit: Promise<void>;
    qmp: QmpClient;
    guest: GuestChannel;
    serial: SerialLog;
  }) {
    this.id = parts.options.id;
    this.runDir = parts.options.runDir;
    this.shape = parts.launch.shape;
    this.cmdline = parts.launch.cmdline;
    this.disk = parts.launch.disk;
    this.ramPath = parts.launch.ram.path;
    this.hostPorts = new Map(parts.launch.forwards.map((f) => [f.guestPort, f.hostPort]));
    this.child = parts.child;
    this.exitPromise = parts.exit.then(() => {
      this.gone = true;
    });
    this.qmp = parts.qmp;
    this.guest = parts.guest;
    this.serial = parts.serial;
    this.serialLogPath = parts.serial.path;
  }

  get pid(): number {
    return this.child.pid ?? -1;
  }

  get exited(): boolean {
    return this.gone;
  }

  /** Resolves when the QEMU process has exited (guest power-off, crash or kill). */
  waitForExit(): Promise<void> {
    return this.exitPromise;
  }

  hostPort(guestPort: number): number {
    const port = this.hostPorts.get(guestPort);
    if (port === undefined) throw new CocoonError('port_not_forwarded', `guest port ${guestPort} is not forwarded`);
    return port;
  }

  /** Boots a fresh VM from kernel + initramfs + root disk; resolves once cocoon-init said hello. */
  static async boot(options: BootOptions & { bootTimeoutMs?: number }): Promise<QemuVm> {
    validateShape(options);
    const ramPath = path.join(options.runDir, 'mem');
    const cmdline = kernelCmdline(options, options.id, options.accel === 'tcg' ? hostTscKhz() : undefined);
    return QemuVm.launch(options, options, cmdline, options.disk, ramPath, {
      prepare: () => createRamFile(ramPath, options.memoryMiB),
      start: (vm) => vm.guest.waitForHello(options.bootTimeoutMs ?? DEFAULT_BOOT_TIMEOUT_MS, options.signal),
    });
  }

  /**
   * Restores a snapshot as a new, independent VM: its own RAM file (cloned from the snapshot's)
   * and its own copy-on-write disk layer on the snapshot's disk. The guest's clock is set and its
   * RNG reseeded before this resolves.
   */
  static async restore(options: RestoreOptions): Promise<QemuVm> {
    const manifest = await readSnapshotManifest(options.snapshotDir);
    await verifySnapshot(options.snapshotDir, manifest);
    const ramPath = path.join(options.runDir, 'mem');
    const disk: DiskSpec = { path: path.join(options.runDir, 'disk.qcow2'), format: 'qcow2' };
    const snapshotDisk = path.join(options.snapshotDir, manifest.files.disk.name);
    const stateFile = path.join(options.snapshotDir, manifest.files.state.name);
    return QemuVm.launch(options, manifest.shape, manifest.cmdline, disk, ramPath, {
      incoming: true,
      prepare: async () => {
        await Promise.all([
          cloneRamFile(path.join(options.snapshotDir, manifest.files.mem.name), ramPath),
          createDiskLayer(snapshotDisk, manifest.files.disk.format, disk.path),
        ]);
      },
      start: async (vm) => {
        try {
          await loadDeviceState(vm.qmp, path.join(options.runDir, 'incoming.sock'), stateFile);
        } catch (error) {
          if (error instanceof CocoonError && error.code === 'snapshot_corrupt') throw error;
          throw new CocoonError('snapshot_corrupt', `the snapshot in ${options.snapshotDir} cannot be restored: ${errorMessage(error)}`, {
            status: 422,
            cause: error,
          });
        }
        await vm.qmp.execute('cont', {});
        await vm.guest.restoreFromSnapshot(5000);
      },
    });
  }

  /**
   * Takes a snapshot into `targetDir` (which must not exist) and ends the VM: its RAM file and disk
   * layer become the snapshot's. The directory appears whole or not at all.
   */
  async snapshot(targetDir: string, options: SnapshotOptions = {}): Promise<SnapshotManifest> {
    const durable = options.durable ?? true;
    const partial = `${targetDir}.partial`;
    if (fs.existsSync(targetDir)) throw new CocoonError('snapshot_exists', `snapshot ${targetDir} already exists`, { status: 409 });
    await fs.promises.rm(partial, { recursive: true, force: true });
    await fs.promises.mkdir(partial, { recursive: true });
    try {
      await this.qmp.execute('stop', {});
      const state = await saveDeviceState(this.qmp, path.join(this.runDir, 'migrate.sock'), path.join(partial, 'state'));
      // Once migration completed, the vCPUs are stopped and the disk flushed and inactivated:
      // QEMU writes neither file again, so its exit and our fsyncs can overlap.
      const killed = this.kill();
      const diskName = this.disk.format === 'qcow2' ? 'disk.qcow2' : 'disk.raw';
      await moveFile(this.ramPath, path.join(partial, 'mem'));
      await moveFile(this.disk.path, path.join(partial, diskName));
      if (options.compact) {
        await killed;
        await digHoles(path.join(partial, 'mem'));
      }
      if (durable) await Promise.all([fsyncFile(path.join(partial, 'mem')), fsyncFile(path.join(partial, diskName))]);
      await killed;
      const manifest: SnapshotManifest = {
        formatVersion: 1,
        createdAt: new Date().toISOString(),
        shape: this.shape,
        cmdline: this.cmdline,
        files: {
          state: { name: 'state', ...state },
          mem: { name: 'mem', sizeBytes: this.shape.memoryMiB * 1024 * 1024 },
          disk: { name: diskName, format: this.disk.format, sizeBytes: fs.statSync(path.join(partial, diskName)).size },
        },
        guestPorts: [...this.hostPorts.keys()],
      };
      await writeSnapshotManifest(partial, manifest, durable);
      await fs.promises.rename(partial, targetDir);
      if (durable) await fsyncDir(path.dirname(targetDir));
      return manifest;
    } catch (error) {
      await this.kill();
      await fs.promises.rm(partial, { recursive: true, force: true });
      if (error instanceof CocoonError) throw error;
      throw new CocoonError('snapshot_failed', `snapshot of ${this.id} failed: ${errorMessage(error)}`, { cause: error });
    }
  }

  /** Stops the VM at once (SIGKILL) and waits for the process to be gone. Idempotent. */
  async kill(): Promise<void> {
    if (!this.gone) {
      this.child.ref(); // keep the event loop alive until the exit is seen
      try {
        process.kill(this.pid, 'SIGKILL');
      } catch {
        // already gone
      }
      await this.exitPromise;
    }
    this.qmp.close();
    this.guest.close();
    this.serial.close();
  }

  /** Kills the VM and removes its run directory. */
  async destroy(): Promise<void> {
    await this.kill();
    await fs.promises.rm(this.runDir, { recursive: true, force: true });
  }

  stats(): VmStats {
    return processStats(this.pid);
  }

  /** The last lines of the serial console, for error messages and logs. */
  serialTail(lines = 30): string {
    return tailSerialLog(this.serialLogPath, lines);
  }

  /** Shared by boot and restore: start QEMU, connect its channels, run `start`, clean up on failure. */
  private static async launch(
    options: CommonVmOptions,
    shape: MachineShape,
    cmdline: string,
    disk: DiskSpec,
    ramPath: string,
    steps: { incoming?: boolean; prepare: () => Promise<void>; start: (vm: QemuVm) => Promise<void> },
  ): Promise<QemuVm> {
    validateId(options.id);
    const runDirExisted = fs.existsSync(options.runDir);
    await fs.promises.mkdir(options.runDir, { recursive: true, mode: 0o700 });
    const sockets = {
      qmp: path.join(options.runDir, 'qmp.sock'),
      guest: path.join(options.runDir, 'guest.sock'),
      serial: path.join(options.runDir, 'serial.sock'),
    };
    let vm: QemuVm | undefined;
    let started: { child: ChildProcess; exit: Promise<void> } | undefined;
    let launch: QemuLaunch | undefined;
    try {
      for (const socket of [...Object.values(sockets), path.join(options.runDir, 'incoming.sock')]) {
        if (Buffer.byteLength(socket) > MAX_SOCKET_PATH) {
          throw new CocoonError('path_too_long', `run directory ${options.runDir} is too long for unix sockets; use a shorter data directory`);
        }
      }
      await steps.prepare();
      launch = {
        shape,
        cmdline,
        ram: { path: ramPath, share: true },
        disk,
        forwards: await resolveForwards(options.network.forwards),
        egress: options.network.egress ?? false,
        sockets,
        pidFile: path.join(options.runDir, 'qemu.pid'),
        incoming: steps.incoming ?? false,
        sandbox: process.env.COCOON_QEMU_SANDBOX !== '0',
      };
      started = startQemu(launch, options.runDir);
      const { child, exit } = started;
      const launched = launch;
      const [qmp, guest, serial] = await Promise.race([
        connectChannels(launched, options),
        exit.then(() => {
          throw qemuStartError(options.runDir, launched);
        }),
      ]);
      vm = new QemuVm({ launch: launched, options, child, exit, qmp, guest, serial });
      await Promise.race([
        steps.start(vm),
        exit.then(() => {
          throw qemuStartError(options.runDir, launched, vm);
        }),
      ]);
      log.info({ vm: options.id, pid: child.pid, accel: shape.accel, restore: launched.incoming }, 'vm started');
      // Start writing the RAM file back now, while the guest runs, so that the fsync of the next
      // snapshot only has the pages dirtied since (a fresh clone's pages are all dirty).
      fsyncFile(ramPath).catch(() => undefined);
      return vm;
    } catch (caught) {
      let error = caught;
      // QEMU dying makes its sockets close too: whichever the caller noticed first, QEMU's own
      // words (in qemu.log) say best what went wrong.
      if (started && !isCocoonError(error, 'snapshot_corrupt') && (await exitedWithin(started.exit, 500))) {
        error = qemuStartError(options.runDir, launch ?? undefined, vm);
      }
      if (vm) await vm.kill();
      else if (started) await killAndWait(started);
      if (runDirExisted) await removeLaunchFiles(options.runDir, disk, ramPath);
      else await fs.promises.rm(options.runDir, { recursive: true, force: true });
      throw error;
    }
  }
}

function validateId(id: string): void {
  if (!ID_PATTERN.test(id)) {
    throw new CocoonError('invalid_vm_id', `VM id ${JSON.stringify(id)} must be 1-63 of [a-z0-9-], starting with a letter or digit`, {
      status: 400,
    });
  }
}

export function validateShape(shape: Pick<MachineShape, 'vcpus' | 'memoryMiB'>): void {
  const { vcpus, memoryMiB } = shape;
  if (!Number.isInteger(vcpus) || vcpus < LIMITS.minVcpus || vcpus > LIMITS.maxVcpus) {
    throw new CocoonError('invalid_resources', `vcpus must be an integer from ${LIMITS.minVcpus} to ${LIMITS.maxVcpus}, got ${vcpus}`, {
      status: 400,
    });
  }
  if (!Number.isInteger(memoryMiB) || memoryMiB < LIMITS.minMemoryMiB || memoryMiB > LIMITS.maxMemoryMiB) {
    throw new CocoonError(
      'invalid_resources',
      `memoryMiB must be an integer from ${LIMITS.minMemoryMiB} to ${LIMITS.maxMemoryMiB}, got ${memoryMiB}`,
      { status: 400 },
    );
  }
}

async function resolveForwards(forwards: PortForward[]): Promise<Required<PortForward>[]> {
  const resolved: Required<PortForward>[] = [];
  for (const forward of forwards) {
    if (!Number.isInteger(forward.guestPort) || forward.guestPort < 1 || forward.guestPort > 65535) {
      throw new CocoonError('invalid_port', `guest port ${forward.guestPort} is not a TCP port (1-65535)`, { status: 400 });
    }
    if (forward.hostPort !== undefined) await assertPortFree(forward.hostPort);
    resolved.push({ guestPort: forward.guestPort, hostPort: forward.hostPort ?? (await freeLoopbackPort()) });
  }
  return resolved;
}

function startQemu(launch: QemuLaunch, runDir: string): { child: ChildProcess; exit: Promise<void> } {
  const logFd = fs.openSync(path.join(runDir, 'qemu.log'), 'w', 0o600);
  try {
    const child = spawn(QEMU_BINARY, qemuArgs(launch), {
      stdio: ['ignore', logFd, logFd],
      detached: true, // own process group: a Ctrl-C to the daemon does not kill guests
    });
    child.unref();
    const exit = new Promise<void>((resolve) => {
      child.once('exit', () => resolve());
      child.once('error', () => resolve());
    });
    return { child, exit };
  } finally {
    fs.closeSync(logFd);
  }
}

async function connectChannels(
  launch: QemuLaunch,
  options: CommonVmOptions,
): Promise<[QmpClient, GuestChannel, SerialLog]> {
  const serial = new SerialLog(path.join(options.runDir, 'serial.log'), options.serialLogMaxBytes);
  try {
    const [qmp, guest] = await Promise.all([
      QmpClient.connect(launch.sockets.qmp, { timeoutMs: 10_000, signal: options.signal }),
      GuestChannel.connect(launch.sockets.guest, 10_000, options.signal),
      serial.attach(launch.sockets.serial, 10_000, options.signal),
    ]);
    return [qmp, guest, serial];
  } catch (error) {
    serial.close();
    throw error;
  }
}

async function exitedWithin(exit: Promise<void>, ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<boolean>((resolve) => {
    timer = setTimeout(() => resolve(false), ms);
  });
  const result = await Promise.race([exit.then(() => true), timeout]);
  clearTimeout(timer);
  return result;
}

function qemuStartError(runDir: string, launch: QemuLaunch | undefined, vm?: QemuVm): CocoonError {
  let output = '';
  try {
    output = fs.readFileSync(path.join(runDir, 'qemu.log'), 'utf8').trim().slice(-2000);
  } catch {
    // no log
  }
  if (/hostfwd|host forwarding rule/i.test(output)) {
    const ports = launch?.forwards.map((f) => f.hostPort).join(', ') ?? '';
    return new CocoonError('port_in_use', `QEMU could not listen on host port(s) ${ports}: ${output}`, { status: 409 });
  }
  if (launch?.incoming && /migration|load of/i.test(output)) {
    return new CocoonError('snapshot_corrupt', `QEMU could not load the snapshot (damaged, or made for another machine shape): ${output}`, {
      status: 422,
    });
  }
  const console = vm ? `\nlast console lines:\n${vm.serialTail(20)}` : '';
  return new CocoonError('vm_start_failed', `QEMU exited while starting: ${output || '(no output)'}${console}`);
}

async function killAndWait(started: { child: ChildProcess; exit: Promise<void> }): Promise<void> {
  started.child.ref();
  try {
    if (started.child.pid) process.kill(started.child.pid, 'SIGKILL');
  } catch {
    // already gone
  }
  await started.exit;
}

async function removeLaunchFiles(runDir: string, disk: DiskSpec, ramPath: string): Promise<void> {
  const names = ['qmp.sock', 'guest.sock', 'serial.sock', 'incoming.sock', 'migrate.sock', 'qemu.pid'];
  await Promise.all([
    ...names.map((name) => fs.promises.rm(path.join(runDir, name), { force: true })),
    fs.promises.rm(ramPath, { force: true }),
    disk.path.startsWith(runDir + path.sep) ? fs.promises.rm(disk.path, { force: true }) : Promise.resolve(),
  ]);
}

/** A qcow2 layer over `backing`: the VM writes there, the backing file never changes. */
export async function createDiskLayer(backing: string, backingFormat: 'raw' | 'qcow2', layer: string): Promise<void> {
  try {
    await execFileAsync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', path.resolve(backing), '-F', backingFormat, layer]);
  } catch (error) {
    throw new CocoonError('disk_layer_failed', `cannot create a disk layer over ${backing}: ${errorMessage(error)}`, { cause: error });
  }
}

async function moveFile(from: string, to: string): Promise<void> {
  try {
    await fs.promises.rename(from, to);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== 'EXDEV') throw error;
    await execFileAsync('cp', ['--sparse=always', '--', from, to]);
    await fs.promises.rm(from);
  }
}

async function fsyncFile(file: string): Promise<void> {
  const handle = await fs.promises.open(file, 'r+');
  try {
    await handle.datasync();
  } finally {
    await handle.close();
  }
}

export async function fsyncDir(dir: string): Promise<void> {
  const handle = await fs.promises.open(dir, 'r');
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}

/** CPU time and resident memory of a process, from /proc. */
export function processStats(pid: number): VmStats {
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
