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
import { killQemuProcesses, processAlive, processCmdline, processStartTime, waitForProcessExit } from './processes.ts';
import { SerialLog, tailSerialLog } from './serial-log.ts';
import {
  type PendingSnapshot,
  readPendingSnapshot,
  readSnapshotManifest,
  verifySnapshot,
  writePendingSnapshot,
  writeSnapshotManifest,
} from './snapshot.ts';
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
  /**
   * Called once the device state is saved (and the snapshot can be completed by
   * `recoverSnapshot` should this process die), before QEMU is killed. For crash tests.
   */
  onStateSaved?: () => Promise<void>;
}

/** What `launch.json` in a run directory records, so that a restarted daemon can adopt the VM. */
interface LaunchRecord {
  formatVersion: 1;
  id: string;
  pid: number;
  /** /proc start time of the pid: a reused pid is not our QEMU. */
  startTime: number | undefined;
  shape: MachineShape;
  cmdline: string;
  disk: DiskSpec;
  ramPath: string;
  forwards: Required<PortForward>[];
  sockets: QemuLaunch['sockets'];
}

/** The QEMU process: our child, or one adopted from a previous daemon (then polled for its exit). */
interface VmProcess {
  readonly pid: number;
  readonly exit: Promise<void>;
  /** Keep the event loop alive until the exit is seen (while we wait for a kill). */
  hold(): void;
}

const LAUNCH_FILE = 'launch.json';

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
  private readonly proc: VmProcess;
  private readonly serial: SerialLog;
  private readonly exitPromise: Promise<void>;
  private gone = false;

  private constructor(parts: {
    launch: Pick<QemuLaunch, 'shape' | 'cmdline' | 'disk' | 'ram' | 'forwards'>;
    options: Pick<CommonVmOptions, 'id' | 'runDir'>;
    proc: VmProcess;
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
    this.proc = parts.proc;
    this.exitPromise = parts.proc.exit.then(() => {
      this.gone = true;
    });
    this.qmp = parts.qmp;
    this.guest = parts.guest;
    this.serial = parts.serial;
    this.serialLogPath = parts.serial.path;
  }

  get pid(): number {
    return this.proc.pid;
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
      const diskName = this.disk.format === 'qcow2' ? 'disk.qcow2' : 'disk.raw';
      // From here on the paused VM's RAM and disk files match the saved state: should this
      // process die, `recoverSnapshot` can complete the snapshot from what the pending record says.
      const pending: PendingSnapshot = {
        formatVersion: 1,
        runDir: this.runDir,
        ramPath: this.ramPath,
        diskPath: this.disk.path,
        manifest: {
          formatVersion: 1,
          createdAt: new Date().toISOString(),
          shape: this.shape,
          cmdline: this.cmdline,
          files: {
            state: { name: 'state', ...state },
            mem: { name: 'mem', sizeBytes: this.shape.memoryMiB * 1024 * 1024 },
            disk: { name: diskName, format: this.disk.format, sizeBytes: 0 },
          },
          guestPorts: [...this.hostPorts.keys()],
        },
      };
      await writePendingSnapshot(partial, pending, durable);
      await options.onStateSaved?.();
      // Once migration completed, the vCPUs are stopped and the disk flushed and inactivated:
      // QEMU writes neither file again, so its exit and the moves and fsyncs can overlap.
      const killed = this.kill();
      try {
        return await completeSnapshot(partial, targetDir, pending, { compact: options.compact ?? false, durable });
      } finally {
        await killed;
      }
    } catch (error) {
      await this.kill();
      await fs.promises.rm(partial, { recursive: true, force: true });
      if (error instanceof CocoonError) throw error;
      throw new CocoonError('snapshot_failed', `snapshot of ${this.id} failed: ${errorMessage(error)}`, { cause: error });
    }
  }

  /**
   * Re-attaches to a QEMU started by an earlier process (a daemon that crashed or restarted):
   * reads the run directory's launch record, checks that the pid is still that QEMU, and
   * reconnects QMP, the guest channel and the serial console. Throws `vm_gone` when the QEMU
   * is not running any more (nothing is killed or removed then).
   */
  static async adopt(options: { id: string; runDir: string; serialLogMaxBytes?: number; signal?: AbortSignal }): Promise<QemuVm> {
    validateId(options.id);
    let record: LaunchRecord;
    try {
      record = JSON.parse(await fs.promises.readFile(path.join(options.runDir, LAUNCH_FILE), 'utf8')) as LaunchRecord;
    } catch (error) {
      throw new CocoonError('vm_gone', `no launch record in ${options.runDir}: the VM is not running`, { cause: error });
    }
    if (record.formatVersion !== 1 || record.id !== options.id || !processAlive(record.pid, record.startTime)) {
      throw new CocoonError('vm_gone', `QEMU of ${options.id} (pid ${record.pid}) is not running any more`);
    }
    if (!processCmdline(record.pid).includes(options.runDir)) {
      throw new CocoonError('vm_gone', `pid ${record.pid} is not the QEMU of ${options.id}`);
    }
    // Sockets a dead daemon served (migration) would block the next snapshot.
    await Promise.all(['migrate.sock', 'incoming.sock'].map((name) => fs.promises.rm(path.join(options.runDir, name), { force: true })));
    let held = false;
    const proc: VmProcess = {
      pid: record.pid,
      exit: waitForProcessExit(record.pid, record.startTime, { intervalMs: 100, keepAlive: () => held }),
      hold: () => {
        held = true;
      },
    };
    const launch = {
      shape: record.shape,
      cmdline: record.cmdline,
      disk: record.disk,
      ram: { path: record.ramPath, share: true },
      forwards: record.forwards,
      egress: false,
      sockets: record.sockets,
      pidFile: path.join(options.runDir, 'qemu.pid'),
      incoming: false,
      sandbox: true,
    } satisfies QemuLaunch;
    let channels: [QmpClient, GuestChannel, SerialLog];
    try {
      channels = await Promise.race([
        connectChannels(launch, options),
        proc.exit.then(() => {
          throw new CocoonError('vm_gone', `QEMU of ${options.id} exited while being adopted`);
        }),
      ]);
    } catch (error) {
      if (isCocoonErrorCode(error, 'vm_gone')) throw error;
      throw new CocoonError('vm_adopt_failed', `cannot reconnect to QEMU of ${options.id}: ${errorMessage(error)}`, { cause: error });
    }
    const [qmp, guest, serial] = channels;
    guest.helloSeen = true;
    const vm = new QemuVm({ launch, options, proc, qmp, guest, serial });
    log.info({ vm: options.id, pid: record.pid }, 'vm adopted');
    return vm;
  }

  /**
   * Finishes what a snapshot into `targetDir` left when its process died: answers `committed`
   * when the snapshot is complete, `completed` when it had saved the device state (the paused
   * QEMU is killed, its RAM and disk files move into the snapshot), and `none` when there was
   * nothing to complete (a partial directory is removed; the VM's files stay where they are).
   */
  static async recoverSnapshot(targetDir: string, options: { durable?: boolean } = {}): Promise<'committed' | 'completed' | 'none'> {
    const partial = `${targetDir}.partial`;
    if (fs.existsSync(path.join(targetDir, 'manifest.json'))) {
      await fs.promises.rm(partial, { recursive: true, force: true });
      return 'committed';
    }
    const pending = await readPendingSnapshot(partial);
    if (pending === undefined) {
      await fs.promises.rm(partial, { recursive: true, force: true });
      return 'none';
    }
    await killQemuProcesses(pending.runDir);
    const stateFile = path.join(partial, pending.manifest.files.state.name);
    const stateOk = fs.existsSync(stateFile) && fs.statSync(stateFile).size === pending.manifest.files.state.sizeBytes;
    const memThere = fs.existsSync(pending.ramPath) || fs.existsSync(path.join(partial, pending.manifest.files.mem.name));
    const diskThere = fs.existsSync(pending.diskPath) || fs.existsSync(path.join(partial, pending.manifest.files.disk.name));
    if (!stateOk || !memThere || !diskThere) {
      await fs.promises.rm(partial, { recursive: true, force: true });
      return 'none';
    }
    await completeSnapshot(partial, targetDir, pending, { compact: false, durable: options.durable ?? true });
    await fs.promises.rm(path.join(pending.runDir, LAUNCH_FILE), { force: true });
    return 'completed';
  }

  /** Stops the VM at once (SIGKILL) and waits for the process to be gone. Idempotent. */
  async kill(): Promise<void> {
    if (!this.gone) {
      this.proc.hold(); // keep the event loop alive until the exit is seen
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

  /**
   * Lets go of the VM without stopping it: closes QMP, the guest channel and the serial log.
   * QEMU keeps running in its own process group; `QemuVm.adopt` re-attaches to it later.
   */
  detach(): void {
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
      await writeLaunchRecord(options.runDir, {
        formatVersion: 1,
        id: options.id,
        pid: child.pid ?? -1,
        startTime: child.pid ? processStartTime(child.pid) : undefined,
        shape,
        cmdline,
        disk,
        ramPath,
        forwards: launch.forwards,
        sockets,
      });
      const [qmp, guest, serial] = await Promise.race([
        connectChannels(launched, options),
        exit.then(() => {
          throw qemuStartError(options.runDir, launched);
        }),
      ]);
      const proc: VmProcess = { pid: child.pid ?? -1, exit, hold: () => child.ref() };
      vm = new QemuVm({ launch: launched, options, proc, qmp, guest, serial });
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
  launch: Pick<QemuLaunch, 'sockets'>,
  options: Pick<CommonVmOptions, 'runDir' | 'serialLogMaxBytes' | 'signal'>,
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

function isCocoonErrorCode(error: unknown, code: string): boolean {
  return error instanceof CocoonError && error.code === code;
}

async function writeLaunchRecord(runDir: string, record: LaunchRecord): Promise<void> {
  const file = path.join(runDir, LAUNCH_FILE);
  await fs.promises.writeFile(`${file}.tmp`, JSON.stringify(record), { mode: 0o600 });
  await fs.promises.rename(`${file}.tmp`, file);
}

/**
 * The second half of a snapshot, shared by `snapshot` and `recoverSnapshot`: move the stopped
 * VM's RAM and disk files into the partial directory (each move is a rename, so a crash leaves
 * every file in one place or the other), fsync, write the manifest, rename into place.
 */
async function completeSnapshot(
  partial: string,
  targetDir: string,
  pending: PendingSnapshot,
  options: { compact: boolean; durable: boolean },
): Promise<SnapshotManifest> {
  const { files } = pending.manifest;
  const memFile = path.join(partial, files.mem.name);
  const diskFile = path.join(partial, files.disk.name);
  if (!fs.existsSync(memFile)) await moveFile(pending.ramPath, memFile);
  if (!fs.existsSync(diskFile)) await moveFile(pending.diskPath, diskFile);
  if (options.compact) await digHoles(memFile);
  if (options.durable) await Promise.all([fsyncFile(memFile), fsyncFile(diskFile)]);
  const manifest: SnapshotManifest = {
    ...pending.manifest,
    files: { ...files, disk: { ...files.disk, sizeBytes: fs.statSync(diskFile).size } },
  };
  await fs.promises.rm(path.join(partial, 'manifest.json'), { force: true });
  await writeSnapshotManifest(partial, manifest, options.durable);
  await fs.promises.rm(path.join(partial, 'pending.json'), { force: true });
  await fs.promises.rename(partial, targetDir);
  if (options.durable) await fsyncDir(path.dirname(targetDir));
  await fs.promises.rm(path.join(pending.runDir, LAUNCH_FILE), { force: true });
  return manifest;
}

async function removeLaunchFiles(runDir: string, disk: DiskSpec, ramPath: string): Promise<void> {
  const names = ['qmp.sock', 'guest.sock', 'serial.sock', 'incoming.sock', 'migrate.sock', 'qemu.pid', LAUNCH_FILE];
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
