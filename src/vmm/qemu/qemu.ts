/**
 * The QEMU driver: boot, snapshot, restore, kill and stats of one microVM.
 *
 * Every VM owns a run directory (sockets, RAM file, disk layer, logs). QEMU runs in its own
 * process group, writes its stderr to `qemu.log` there, and survives this process (so that a
 * restarted daemon can adopt it). Every failure path kills what it started and removes what it
 * made: a caller never has to clean up after a failed boot or restore.
 */
import type { ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { CocoonError, errorMessage, isCocoonError } from '../../common/errors.ts';
import { fsyncDir, fsyncFile } from '../../common/fs.ts';
import { log } from '../../common/log.ts';
import type { Endpoint, ForkPoint, ForkPointOptions, SnapshotOptions, SpaceWatchOptions, Vm } from '../driver.ts';
import { GuestChannel, checkGuestProtocol } from '../guest-channel.ts';
import { QEMU_ARCH } from './arch.ts';
import { noSpaceError, qemuKilledError, qemuStartError } from './start-errors.ts';
import { commitSnapshot, fsyncFailure, moveFile, sealData } from '../snapshot-commit.ts';
import { takeForkPoint } from './fork-point.ts';
import { createDiskLayer, relinkBacking, wantedBackingName } from './disk-layers.ts';
import { watchDiskSpace } from './space-watch.ts';
import { type DeviceStateSave, loadDeviceState, prepareDeviceStateSave, saveDeviceState } from './migration.ts';
import { type QemuLaunch, hostTscKhz, kernelCmdline, qemuArgs } from './qemu-args.ts';
import { QmpClient } from './qmp.ts';
import { assertPortFree, freeLoopbackPort } from '../../net/ports.ts';
import { DISCARDED_RAM_NAME, cloneRamFile, createEmptyRamFile, createRamFile, digHoles, discardRamFile, releaseUnusedRam, reservesRam, unlinkRamFileHeld } from '../ram-file.ts';
import { holdRam, releaseRam } from '../space-ledger.ts';
import { isMemoryDiff, restoreMemoryDiff } from '../mem-diff.ts';
import { type SnapshotMemory, startMemoryDiff, warmMemoryDiffs } from '../snapshot-memory.ts';
import { findProcesses, killProcesses, processStats, processAlive, processCmdline, processCwd, processStartTime, waitForProcessExit } from '../../host/processes.ts';
import { type SandboxedProcess, type VmCgroup, type VmIdentity, grantLaunchAccess, launchIdentity, launchLimits, removeVmCgroup, startSandboxed } from '../launch-sandbox.ts';
import { SerialLog, tailSerialLog } from './serial-log.ts';
import { PhaseClock, type Phases } from '../phases.ts';
import { restoreTuning, suspendTuning } from './tuning.ts';
import { endInBackground, qemuExitsSettled } from './exits.ts';
import { type HeldSum, startHeldSum } from '../native/diff-server.ts';
import { type PooledQemu, activeQemuPool } from './pool.ts';
import { type RestoreStart, attachPooled, continueRestored, prefilledWith, writeBackRamLater } from './pooled-restore.ts';
import { identityBeforeReading, isVerified, rememberVerified } from '../verified-files.ts';
import { sealSnapshotFiles, snapshotFailure, takeBackSnapshotFiles } from '../snapshot-safety.ts';
import { QEMU_OWN_NAMES, qemuDirOf, qemuSocketsOf } from './paths.ts';
import { listenShim, SHIM_BACKLOG } from '../native/listen-shim.ts';
import {
  type PendingSnapshot,
  assertDataChecksums,
  checkDataChecksum,
  dataChecksumKey,
  kernelBootId,
  parseChecksumLine,
  readPendingSnapshot,
  readSnapshotManifest,
  verifySnapshot,
  writePendingSnapshot,
} from '../snapshot.ts';
import {
  type BootOptions,
  type CommonVmOptions,
  type DataChecksum,
  type DiskSpec,
  LIMITS,
  type MachineShape,
  type PortForward,
  type RestoreOptions,
  type SnapshotManifest,
  type VmLimits,
  type VmStats,
} from '../types.ts';
import { setting } from '../../common/settings.ts';

const QEMU_BINARY = setting('COCOON_QEMU');
const ID_PATTERN = /^[a-z0-9][a-z0-9-]{0,62}$/;
/** Unix socket paths are limited to 108 bytes by the kernel. */
const MAX_SOCKET_PATH = 107;

export const DEFAULT_BOOT_TIMEOUT_MS = 120_000;

/** How a restore starts QEMU (tuning.ts); exported for the vm benchmark. */
export { restoreTuning };

/** What every QEMU's command line has (`qemu-system-<arch>`), to find ours among the host's processes. */
const QEMU_PROGRAM = 'qemu-system';

/**
 * How a VM's QEMU is found: its command line mentions its run directory, or (started ahead by
 * the pool, then placed: pool.ts) its working directory is in it. A pool's waiting processes
 * are the pool's, not a VM's.
 */
function byCwd(): { byCwd: true; exceptCwd?: string } {
  const pool = activeQemuPool();
  return { byCwd: true, ...(pool ? { exceptCwd: pool.root + path.sep } : {}) };
}

/** PIDs of live QEMU processes of `marker` (a run directory, or one above run directories). */
export function findQemuProcesses(marker: string): number[] {
  return findProcesses(QEMU_PROGRAM, marker, byCwd());
}

/** SIGKILLs every QEMU of `marker` (but those in `keep`) and waits until they are gone; answers their pids. */
export function killQemuProcesses(marker: string, keep?: ReadonlySet<number>): Promise<number[]> {
  return killProcesses(QEMU_PROGRAM, marker, keep, byCwd());
}

/** Removes a dead VM's files from its run directory (its RAM, disk layer and sockets), keeping the logs. */
export async function clearRunFiles(runDir: string): Promise<void> {
  await qemuExitsSettled();
  const names = ['mem', DISCARDED_RAM_NAME, 'disk.qcow2', LAUNCH_FILE, 'qemu.pid', 'qmp.sock', 'guest.sock', 'serial.sock', 'incoming.sock', 'migrate.sock'];
  await Promise.all(names.map((name) => fs.promises.rm(path.join(runDir, name), { force: true })));
}

export type { SnapshotOptions };
/** /proc stats of a process (src/host/processes.ts). */
export { processStats };

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
  /** The VM's cgroups, removed once an adopted QEMU is gone. */
  cgroup?: VmCgroup;
  /** The guest protocol version (cocoon-init's hello, or the snapshot's manifest); absent in older records. */
  guestProtocol?: number;
  /** The backlog of the forwarded ports' listeners (Vm.portBacklog); absent in older records (1). */
  portBacklog?: number;
}

/** The QEMU process: our child, or one adopted from a previous daemon (then polled for its exit). */
interface VmProcess {
  readonly pid: number;
  readonly exit: Promise<void>;
  /** Keep the event loop alive until the exit is seen (while we wait for a kill). */
  hold(): void;
}

const LAUNCH_FILE = 'launch.json';

export class QemuVm implements Vm {
  readonly id: string;
  readonly runDir: string;
  readonly shape: MachineShape;
  readonly cmdline: string;
  readonly disk: DiskSpec;
  readonly ramPath: string;
  /** Guest port → host port on 127.0.0.1. */
  readonly hostPorts: ReadonlyMap<number, number>;
  /** 256 when QEMU runs with native/cocoon-listen.so, else libslirp's 1 (Vm.portBacklog). */
  readonly portBacklog: number;
  readonly qmp: QmpClient;
  readonly guest: GuestChannel;
  readonly serialLogPath: string;
  /** The guest agent's port on the host (a unix socket QEMU serves; src/guest/agent/). */
  readonly agentSocketPath: string;
  /** The protocol cocoon-init said hello with (on boot), or the snapshot's (on restore), or the launch record's (on adopt). */
  guestProtocol: number | undefined;
  /** Milliseconds of each step of the boot or restore (phases.ts); absent for an adopted VM. */
  startPhases: Readonly<Phases> | undefined;
  private readonly proc: VmProcess;
  private readonly serial: SerialLog;
  private readonly exitPromise: Promise<void>;
  private gone = false;
  /** The space ledger's promise of the RAM file has ended (`releaseRamOnce`). */
  private ramReleased = false;
  /** An fsync of this VM's files failed once: what is on disk may lack pages, so no more snapshots. */
  private storageFailed: string | undefined;
  /** Guest ports being forwarded by `forwardPort` right now (concurrent callers share one). */
  private readonly pendingForwards = new Map<number, Promise<number>>();
  /** Snapshots and fork points under way (`pauseHeld`). */
  private pauseHolds = 0;

  private constructor(parts: {
    launch: Pick<QemuLaunch, 'shape' | 'cmdline' | 'disk' | 'ram' | 'forwards' | 'sockets'>;
    options: Pick<CommonVmOptions, 'id' | 'runDir'>;
    proc: VmProcess;
    qmp: QmpClient;
    guest: GuestChannel;
    serial: SerialLog;
    portBacklog: number | undefined;
  }) {
    this.id = parts.options.id;
    this.portBacklog = parts.portBacklog ?? 1;
    this.runDir = parts.options.runDir;
    this.shape = parts.launch.shape;
    this.cmdline = parts.launch.cmdline;
    this.disk = parts.launch.disk;
    this.ramPath = parts.launch.ram.path;
    this.hostPorts = new Map(parts.launch.forwards.map((f) => [f.guestPort, f.hostPort]));
    this.proc = parts.proc;
    // The RAM file is a promise of the space ledger while QEMU maps it (again, for an adopted VM).
    holdRam(this.ramPath, this.shape.memoryMiB * 1024 * 1024);
    this.exitPromise = parts.proc.exit.then(() => {
      this.gone = true;
      this.releaseRamOnce();
    });
    this.qmp = parts.qmp;
    this.guest = parts.guest;
    this.serial = parts.serial;
    this.serialLogPath = parts.serial.path;
    this.agentSocketPath = parts.launch.sockets.agent ?? path.join(qemuDirOf(parts.options.runDir), 'agent.sock');
  }

  /** What a snapshot manifest records of who made it (types.ts `SnapshotManifest`). */
  madeBy(): Pick<SnapshotManifest, 'vmm' | 'arch' | 'guestProtocol'> {
    return {
      vmm: { name: 'qemu', version: this.qmp.version ?? 'unknown' },
      arch: QEMU_ARCH,
      ...(this.guestProtocol !== undefined ? { guestProtocol: this.guestProtocol } : {}),
    };
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

  /**
   * Forwards one more guest port while the VM runs (HMP `hostfwd_add` on the user-mode network),
   * to a free port on 127.0.0.1; answers the host port (at once when it is forwarded already).
   * The port is then in `hostPorts`, so a snapshot records it and a restore forwards it again.
   * (launch.json keeps the ports of the start: a VM adopted after a daemon restart forgets it
   * until its next restore.)
   */
  async forwardPort(guestPort: number): Promise<Endpoint> {
    const known = this.hostPorts.get(guestPort);
    if (known !== undefined) return { host: '127.0.0.1', port: known };
    if (!Number.isInteger(guestPort) || guestPort < 1 || guestPort > 65535) {
      throw new CocoonError('invalid_port', `guest port ${guestPort} is not a TCP port (1-65535)`, { status: 400 });
    }
    const pending = this.pendingForwards.get(guestPort);
    if (pending) return { host: '127.0.0.1', port: await pending };
    const work = (async (): Promise<number> => {
      // A free port can be taken before QEMU binds it: one more try with another.
      for (let attempt = 0; ; attempt++) {
        const hostPort = await freeLoopbackPort();
        const output = await this.qmp.execute('human-monitor-command', { 'command-line': `hostfwd_add net0 tcp:127.0.0.1:${hostPort}-:${guestPort}` });
        if (typeof output === 'string' && output.trim() !== '') {
          if (attempt < 1) continue;
          throw new CocoonError('port_forward_failed', `QEMU could not forward guest port ${guestPort}: ${output.trim().slice(0, 200)}`, { status: 502 });
        }
        (this.hostPorts as Map<number, number>).set(guestPort, hostPort);
        return hostPort;
      }
    })();
    this.pendingForwards.set(guestPort, work);
    try {
      return { host: '127.0.0.1', port: await work };
    } finally {
      this.pendingForwards.delete(guestPort);
    }
  }

  /** Forwarded ports listen on the host's loopback only. */
  endpoint(guestPort: number): Endpoint {
    return { host: '127.0.0.1', port: this.hostPort(guestPort) };
  }

  /** The control channel to cocoon-init (the driver interface's name for `guest`). */
  get channel(): GuestChannel {
    return this.guest;
  }

  /** A fork point of the running VM (fork-point.ts). */
  forkPoint(targetDir: string, options: ForkPointOptions = {}): Promise<ForkPoint> {
    return this.holdingPause(() => takeForkPoint(this, targetDir, options));
  }

  /**
   * True while a snapshot or fork point has (or may have) the vCPUs stopped: the space watch
   * then neither stops nor continues the guest (a `cont` in the middle would change memory under
   * the checksums and the saved device state).
   */
  get pauseHeld(): boolean {
    return this.pauseHolds > 0;
  }

  private async holdingPause<T>(work: () => Promise<T>): Promise<T> {
    this.pauseHolds++;
    try {
      return await work();
    } finally {
      this.pauseHolds--;
    }
  }

  /**
   * Ends the space ledger's promise of the RAM file, once: at the exit, or earlier at the
   * answer of a snapshot that ends QEMU in the background. The ledger knows RAM files by name,
   * and a later VM in the same run directory has one of the same name that this exit must not
   * let go of.
   */
  private releaseRamOnce(): void {
    if (this.ramReleased) return;
    this.ramReleased = true;
    releaseRam(this.ramPath);
  }

  /** Continues the guest if QEMU has it paused (adopted in the middle of a snapshot or fork point). */
  async ensureRunning(): Promise<void> {
    const status = await this.qmp.execute('query-status', {});
    if (!status.running) await this.qmp.execute('cont', {});
  }

  /** Continues a guest paused on a full data disk once there is room (space-watch.ts). */
  watchDiskSpace(options: SpaceWatchOptions): () => void {
    return watchDiskSpace(this, options);
  }

  /** Boots a fresh VM from kernel + initramfs + root disk; resolves once cocoon-init said hello. */
  static async boot(options: BootOptions & { bootTimeoutMs?: number }): Promise<QemuVm> {
    await qemuExitsSettled();
    validateShape(options);
    const ramPath = path.join(options.runDir, 'mem');
    const cmdline = kernelCmdline(options, options.id, options.accel === 'tcg' ? hostTscKhz() : undefined);
    const clock = new PhaseClock();
    return QemuVm.launch(options, options, cmdline, options.disk, ramPath, {
      clock,
      prepare: async () => {
        await createRamFile(ramPath, options.memoryMiB);
        return 'ram_create';
      },
      start: async (vm) => {
        await vm.guest.waitForHello(options.bootTimeoutMs ?? DEFAULT_BOOT_TIMEOUT_MS, options.signal);
        clock.mark('guest_boot');
      },
    });
  }

  /**
   * Restores a snapshot as a new, independent VM: its own RAM file (cloned from the snapshot's)
   * and its own copy-on-write disk layer on the snapshot's disk. The guest's clock is set and its
   * RNG reseeded before this resolves.
   */
  static async restore(options: RestoreOptions): Promise<QemuVm> {
    const clock = new PhaseClock();
    // (A suspend's QEMU still exiting is in no restore's way: tuning.ts `overlapExits`.)
    if (!restoreTuning.overlapExits) {
      await qemuExitsSettled();
      clock.mark('exits_settled');
    }
    if (suspendTuning.diffServer) warmMemoryDiffs(); // for its suspend (snapshot-memory.ts)
    const manifest = await readSnapshotManifest(options.snapshotDir);
    assertSnapshotCompatible(options.snapshotDir, manifest);
    await verifySnapshot(options.snapshotDir, manifest);
    clock.mark('manifest_state_check');
    const hasChecksums = Boolean(manifest.files.mem.checksum && manifest.files.disk.checksum);
    const verify = options.verifyData === false ? false : options.verifyData === 'if-present' ? hasChecksums : true;
    // The memory file is checked as it is copied for the new VM, and the disk along with it
    // (one helper run), before the device state is loaded: the guest runs only on what matches
    // the checksums.
    if (verify) assertDataChecksums(options.snapshotDir, manifest);
    const ramPath = path.join(options.runDir, 'mem');
    const disk: DiskSpec = { path: path.join(options.runDir, 'disk.qcow2'), format: 'qcow2' };
    const snapshotDisk = path.join(options.snapshotDir, manifest.files.disk.name);
    const stateFile = path.join(options.snapshotDir, manifest.files.state.name);
    const memFile = path.join(options.snapshotDir, manifest.files.mem.name);
    const diskLayer = () => createDiskLayer(snapshotDisk, manifest.files.disk.format, disk.path);
    // A suspended microVM's memory: the image's plus the pages it changed (mem-diff.ts). It is
    // rebuilt into a new file, before QEMU starts.
    const memoryDiff = isMemoryDiff(manifest);
    const memoryFromDiff = async (): Promise<string> => {
      await restoreMemoryDiff({ dir: options.snapshotDir, manifest, baseDir: options.memoryBase, target: ramPath, verify: Boolean(verify), alsoVerifyDisk: Boolean(verify) });
      return verify ? 'ram_from_diff_checksums' : 'ram_from_diff';
    };
    /**
     * The snapshot's memory copied into the VM's RAM file (`into`: the file exists, QEMU may map
     * it); answers the phase name, which says whether the data was read for its checksums.
     */
    const copyMemory = async (into: boolean): Promise<string> => {
      if (!verify) {
        // Unverified means made moments ago: still in the page cache, not yet written back.
        await cloneRamFile(memFile, ramPath, { nosync: true, into });
        return 'ram_clone';
      }
      // Files verified before and unchanged since (same identity: verified-files.ts, e.g. an
      // image snapshot restored again) are copied without reading them for a checksum; their
      // identity is checked again once the copy is made, so a change meanwhile is caught.
      const memKey = dataChecksumKey(manifest.files.mem.checksum)!;
      const diskKey = dataChecksumKey(manifest.files.disk.checksum)!;
      const remembered = async () => (await Promise.all([isVerified(memFile, memKey), isVerified(snapshotDisk, diskKey)])).every(Boolean);
      if (await remembered()) {
        await cloneRamFile(memFile, ramPath, { into });
        if (await remembered()) return 'ram_clone';
        if (!into) await fs.promises.rm(ramPath, { force: true }); // (`into` empties it again)
      }
      const [memBefore, diskBefore] = await Promise.all([identityBeforeReading(memFile), identityBeforeReading(snapshotDisk)]);
      const [memChecksum, diskChecksum] = await cloneRamFile(memFile, ramPath, { checksum: true, alsoChecksum: [snapshotDisk], into });
      checkDataChecksum(options.snapshotDir, manifest, 'mem', memChecksum);
      checkDataChecksum(options.snapshotDir, manifest, 'disk', diskChecksum);
      await Promise.all([rememberVerified(memFile, memBefore, memKey), rememberVerified(snapshotDisk, diskBefore, diskKey)]);
      return 'ram_clone_checksums';
    };
    // `how`: into a pooled QEMU (listening for its state already), the new way or not (pooled-restore.ts).
    const start = async (vm: QemuVm, how: RestoreStart = { listening: false, inline: false }): Promise<void> => {
      try {
        await loadDeviceState(vm.qmp, path.join(qemuDirOf(options.runDir), 'incoming.sock'), stateFile, 30_000, how);
        clock.mark('device_state_load');
      } catch (error) {
        if (error instanceof CocoonError && error.code === 'snapshot_corrupt') throw error;
        throw new CocoonError('snapshot_corrupt', `the snapshot in ${options.snapshotDir} cannot be restored: ${errorMessage(error)}`, {
          status: 422,
          cause: error,
        });
      }
      await continueRestored(vm, how.inline, clock);
    };
    // A QEMU started ahead for this machine (pool.ts): its memory is filled in place, as below.
    // The image snapshot whose memory the pool copies ahead for the next restores of this machine.
    const imageMemory = memoryDiff ? options.memoryBase : verify ? options.snapshotDir : undefined;
    const pooled = restoreTuning.pool
      ? activeQemuPool()?.take(
          { shape: manifest.shape, cmdline: manifest.cmdline, egress: options.network.egress ?? false, limits: launchLimits(manifest.shape, options.limits) },
          imageMemory !== undefined ? { snapshotDir: imageMemory } : undefined,
        )
      : undefined;
    if (pooled) {
      validateShape(manifest.shape);
      // What its RAM file holds already (pool.ts), used the new way only (pooled-restore.ts).
      const ahead = restoreTuning.pooledInline ? pooled.prefilled : undefined;
      return QemuVm.launchPooled(pooled, options, disk, {
        clock,
        ...(manifest.guestProtocol !== undefined ? { guestProtocol: manifest.guestProtocol } : {}),
        diskLayer,
        fill: async () => {
          if (!memoryDiff) {
            if (ahead && verify && (await prefilledWith(ahead, memFile, manifest))) return 'ram_prefilled';
            return copyMemory(true);
          }
          const onBase = await restoreMemoryDiff({ dir: options.snapshotDir, manifest, baseDir: options.memoryBase, target: ramPath, verify: Boolean(verify), alsoVerifyDisk: Boolean(verify), into: true, ...(ahead ? { onBase: ahead.identity } : {}) });
          return `${verify ? 'ram_from_diff_checksums' : 'ram_from_diff'}${onBase ? '_on_base' : ''}`;
        },
        start,
      });
    }
    return QemuVm.launch(options, manifest.shape, manifest.cmdline, disk, ramPath, {
      clock,
      incoming: true,
      ...(manifest.guestProtocol !== undefined ? { guestProtocol: manifest.guestProtocol } : {}),
      ...(restoreTuning.overlap && !memoryDiff
        ? {
            // QEMU starts on an empty RAM file while the memory is copied (and checked) into
            // it: QEMU waiting for its device state does not touch guest RAM, and `start`
            // (state load, then the vCPUs) runs only once the copy is done and matched.
            prepare: async () => {
              await Promise.all([createEmptyRamFile(ramPath, manifest.files.mem.sizeBytes, `a VM from ${options.snapshotDir}`), diskLayer()]);
              return 'disk_layer';
            },
            fill: () => copyMemory(true),
          }
        : {
            prepare: async () => `${(await Promise.all([memoryDiff ? memoryFromDiff() : copyMemory(false), diskLayer()]))[0]}_disk_layer`,
          }),
      start,
    });
  }

  /**
   * Takes a snapshot into `targetDir` (which must not exist) and ends the VM: its RAM file and disk
   * layer become the snapshot's. The directory appears whole or not at all: files are written
   * and fsynced, the manifest (with the files' checksums) last, then the directory is renamed
   * into place and its parent fsynced. QEMU stays alive, paused, until that commit: whatever
   * fails before it (a full disk: `no_space`; an fsync error: `snapshot_failed`, never retried,
   * since a second fsync can succeed with the data lost) abandons the snapshot, gives the VM its
   * files back and lets it run on as before (`details.vmRunning`). If QEMU itself dies on the
   * way, the error is `vm_gone`. Earlier snapshots are never touched.
   */
  async snapshot(targetDir: string, options: SnapshotOptions = {}): Promise<SnapshotManifest> {
    return this.holdingPause(() => this.takeSnapshot(targetDir, options));
  }

  private async takeSnapshot(targetDir: string, options: SnapshotOptions): Promise<SnapshotManifest> {
    const durable = options.durable ?? true;
    const partial = `${targetDir}.partial`;
    if (fs.existsSync(targetDir)) throw new CocoonError('snapshot_exists', `snapshot ${targetDir} already exists`, { status: 409 });
    if (this.storageFailed) {
      throw new CocoonError(
        'snapshot_failed',
        `${this.id} is not snapshotted again: an earlier fsync of its files failed (${this.storageFailed}), so its memory on disk may lack pages the kernel dropped; it runs on until it is terminated`,
        { details: { vmAlive: !this.exited } },
      );
    }
    const diskName = this.disk.format === 'qcow2' ? 'disk.qcow2' : 'disk.raw';
    const clock = new PhaseClock(options.phases);
    const progress = { wasRunning: false, stopped: false, moved: [] as Array<{ from: string; to: string }>, killed: false, committed: false, memory: undefined as SnapshotMemory | undefined, stateSave: undefined as DeviceStateSave | undefined, diskSum: undefined as HeldSum | undefined };
    let manifest: SnapshotManifest;
    const handles: fs.promises.FileHandle[] = [];
    try {
      progress.wasRunning = (await this.qmp.execute('query-status', {})).running;
      await fs.promises.rm(partial, { recursive: true, force: true });
      await fs.promises.mkdir(partial, { recursive: true, mode: 0o700 });
      // The disk layer must name its backing file relative to the directory it moves to
      // (disk-layers.ts). A layer made beside targetDir (a run directory beside the
      // generations) does already; another (one with an absolute name, made before names were
      // relative) is rewritten after the move, by qemu-img, which needs QEMU gone (it holds the
      // image's lock; and QEMU 7.2's change-backing-file writes the wrong backing format).
      const relink = this.disk.format === 'qcow2' && (await wantedBackingName(this.disk.path, { finalDir: targetDir, formerDir: path.dirname(this.disk.path) })) !== undefined;
      // Those two end QEMU before the files are checksummed, so a failure later cannot give the VM back.
      const endFirst = Boolean(options.compact) || relink;
      // A suspend's memory as a diff against its image's, made inside this commit from the RAM
      // file (snapshot-memory.ts); the RAM file itself then never enters the snapshot.
      // Beside it, what the device-state save can do before the pause (the old way: after it).
      const statePath = path.join(partial, 'state');
      const migrateSocket = path.join(qemuDirOf(this.runDir), 'migrate.sock');
      const memoryStarting = options.memoryBase && !endFirst && suspendTuning.diffInCommit
        ? startMemoryDiff({ vm: this.id, baseDir: options.memoryBase, ramPath: this.ramPath, partial, memoryBytes: this.shape.memoryMiB * 1024 * 1024, durable, narrow: suspendTuning.narrowCompare, server: suspendTuning.diffServer, threads: suspendTuning.compareThreads })
        : undefined;
      // Beside the diff, the disk layer's checksum and fsync as a held job of the same helper
      // (diff-server.ts): no helper started, no fork of this process, while the VM is paused.
      const diskSumStarting = memoryStarting && suspendTuning.diffServer ? startHeldSum(this.disk.path, durable).catch(() => undefined) : undefined;
      try {
        progress.stateSave = suspendTuning.diffInCommit ? await prepareDeviceStateSave(this.qmp, migrateSocket, statePath) : undefined;
      } finally {
        progress.memory = await memoryStarting; // never rejects: a diff that cannot start is no diff
        progress.diskSum = await diskSumStarting;
      }
      const memory = progress.memory;
      if (!memory) progress.diskSum?.cancel();
      clock.mark('prepare');
      progress.stopped = true;
      await this.qmp.execute('stop', {});
      clock.mark('pause');
      memory?.go();
      // With the vCPUs stopped (and the disk drained), guest RAM and disk do not change any
      // more: their checksums and fsyncs start now, on open files, while the device state is
      // saved and the files are renamed. (A compacted snapshot punches zeros out first.)
      let sealed: Promise<[DataChecksum[], unknown]> | undefined;
      if (!endFirst && memory && progress.diskSum) {
        sealed = progress.diskSum.go().then((line): [DataChecksum[], unknown] => [[parseChecksumLine(line)], undefined]);
        sealed.catch(() => undefined); // awaited below unless something fails first
      } else if (!endFirst) {
        for (const file of memory ? [this.disk.path] : [this.ramPath, this.disk.path]) handles.push(await fs.promises.open(file, 'r'));
        sealed = sealData(handles, durable);
        sealed.catch(() => undefined); // awaited below unless something fails first
      }
      // The device state's fsync runs beside the pending record and the moves (issue 12); it is
      // awaited before the manifest. The old way (suspendTuning off): inside the save.
      const overlapStateSync = suspendTuning.diffInCommit;
      const state = progress.stateSave
        ? await progress.stateSave.save({ fsync: !overlapStateSync })
        : await saveDeviceState(this.qmp, migrateSocket, statePath, undefined, { fsync: !overlapStateSync });
      const stateSynced = overlapStateSync ? fsyncFile(statePath, 'r') : undefined;
      stateSynced?.catch(() => undefined); // awaited below unless something fails first
      clock.mark('device_state_save');
      // From here on the paused VM's RAM and disk files match the saved state: should this
      // process die, `recoverSnapshot` can complete the snapshot from what the pending record says.
      const pending: PendingSnapshot = {
        formatVersion: 1,
        ...(kernelBootId() ? { bootId: kernelBootId() } : {}),
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
          ...this.madeBy(),
        },
      };
      // Not synced when it names the kernel boot: a process that dies finds it in the page cache,
      // and after a reboot it is not used (the RAM file's pages may be lost: recoverSnapshot).
      await writePendingSnapshot(partial, pending, durable && (!suspendTuning.diffInCommit || pending.bootId === undefined));
      clock.mark('pending_record');
      await options.onStateSaved?.();
      // Renaming the files does not disturb QEMU's open files and mapping.
      let mem = path.join(partial, 'mem');
      const disk = path.join(partial, diskName);
      for (const [from, to] of memory ? [[this.disk.path, disk] as const] : ([[this.ramPath, mem], [this.disk.path, disk]] as const)) {
        await moveFile(from, to);
        progress.moved.push({ from, to });
      }
      clock.mark('move_files');
      if (endFirst) {
        progress.killed = true;
        await this.kill(); // zero pages are punched out of a file no process maps any more
        if (options.compact) {
          // Blocks reserved and never written go first (FIEMAP's unwritten extents: `dig-holes`
          // skips those it finds no page cache for), then the pages that hold only zeros: the
          // snapshot holds what the guest wrote, no more, before it is checksummed and measured.
          await releaseUnusedRam(mem);
          await digHoles(mem);
        }
        if (relink) await relinkBacking(disk, { finalDir: targetDir, formerDir: path.dirname(this.disk.path) });
        clock.mark('compact');
        for (const file of [mem, disk]) handles.push(await fs.promises.open(file, 'r'));
        sealed = sealData(handles, durable);
      }
      // The diff (or, should it fail, the whole RAM file moved in, checksummed and synced).
      const memEntry = memory ? await memory.finish(mem, (from, to) => progress.moved.push({ from, to })) : undefined;
      if (memory) clock.mark('memory_diff');
      const [checksums] = await (sealed as Promise<[DataChecksum[], unknown]>);
      await stateSynced;
      clock.mark('checksums_fsync');
      if (memEntry) mem = path.join(partial, memEntry.name);
      await sealSnapshotFiles(this.runDir, { mem, disk });
      clock.mark('seal_files');
      manifest = {
        ...pending.manifest,
        files: {
          state: pending.manifest.files.state,
          mem: memEntry ?? { ...pending.manifest.files.mem, checksum: checksums[0] },
          disk: { ...pending.manifest.files.disk, sizeBytes: (await fs.promises.stat(disk)).size, checksum: checksums.at(-1) },
        },
      };
      await commitSnapshot(partial, targetDir, manifest, durable);
      progress.committed = true;
      if (durable) await fsyncDir(path.dirname(targetDir));
      clock.mark('commit');
    } catch (error) {
      progress.memory?.cancel();
      progress.diskSum?.cancel();
      await progress.stateSave?.cancel();
      throw await this.abandonSnapshot(error, partial, targetDir, progress);
    } finally {
      for (const handle of handles) await handle.close().catch(() => undefined);
    }
    // A RAM file the snapshot did not take (its memory is a diff) goes with the VM.
    const ramLeft = manifest.files.mem.base !== undefined;
    // `endAfterAnswer`: the answer does not wait for QEMU's exit (exits.ts: what could race the
    // ending process waits for it). SIGKILL is sent at once (before kill's first await); the
    // launch record and the RAM file's name go before the answer, the RAM file's blocks with
    // the last of QEMU's mapping and a handle closed after its exit (ram-file.ts). After the
    // answer nothing touches a name in the run directory, nor the space ledger's entry of the
    // RAM file's name: a restore into the same run directory (a resume) may run meanwhile
    // (tuning.ts `overlapExits`).
    const background = options.endAfterAnswer === true;
    const killed = this.kill();
    killed.catch(() => undefined); // awaited below
    const launchRecord = path.join(this.runDir, LAUNCH_FILE);
    // (Committed: nothing may fail the snapshot now; what cannot be done here is done below.)
    let ramHeld: fs.promises.FileHandle | undefined;
    if (background) {
      [ramHeld] = await Promise.all([ramLeft ? unlinkRamFileHeld(this.ramPath).catch(() => undefined) : undefined, fs.promises.rm(launchRecord, { force: true }).catch(() => undefined)]);
      if (ramLeft && !ramHeld) await discardRamFile(this.ramPath).catch(() => undefined);
      // The paused, killed QEMU writes its RAM file no more: its promise of room ends.
      this.releaseRamOnce();
    }
    const ending = (async () => {
      await killed;
      if (!background) clock.mark('process_kill');
      await (background ? ramHeld?.close() : Promise.all([fs.promises.rm(launchRecord, { force: true }), ramLeft ? discardRamFile(this.ramPath) : undefined]));
      if (!background) clock.mark('process_end');
    })();
    if (background) endInBackground(this.id, ending);
    else await ending;
    // The RAM file's blocks that were reserved and never written go back to the filesystem, in
    // the background (the content does not change; restores read only written extents), and
    // after this returns: starting the helper takes the event loop a few milliseconds.
    // (A compacted snapshot gave them back already; a sparse RAM file never had any.)
    if (!options.compact && !ramLeft && reservesRam(this.shape.memoryMiB * 1024 * 1024)) setTimeout(() => {
      releaseUnusedRam(path.join(targetDir, 'mem')).catch((error: unknown) =>
        log.debug({ vm: this.id, error: errorMessage(error) }, 'cannot give back the unused blocks of a snapshot\'s memory file'),
      );
    }, 0);
    return manifest;
  }

  /** Undoes a snapshot that cannot be committed: files back to the VM, the VM running as before. */
  private async abandonSnapshot(
    error: unknown,
    partial: string,
    targetDir: string,
    progress: { wasRunning: boolean; stopped: boolean; moved: Array<{ from: string; to: string }>; killed: boolean; committed: boolean },
  ): Promise<CocoonError> {
    const gone = !progress.killed && (this.exited || isCocoonError(error, 'vm_gone') || (await exitedWithin(this.exitPromise, 100)));
    // A failed fsync is not retried, ever: the kernel may have dropped the pages it could not
    // write, and a second fsync would then succeed over a file with holes in its history.
    const fsyncError = fsyncFailure(error);
    if (fsyncError) this.storageFailed = fsyncError;
    for (const { from, to } of progress.moved.reverse()) {
      const now = progress.committed ? path.join(targetDir, path.basename(to)) : to;
      await moveFile(now, from).catch((moveError: unknown) =>
        log.error({ vm: this.id, file: now, error: errorMessage(moveError) }, 'cannot give a file back to the VM after a failed snapshot'),
      );
    }
    await takeBackSnapshotFiles(this.runDir, [this.ramPath, this.disk.path]).catch(() => undefined);
    await fs.promises.rm(partial, { recursive: true, force: true });
    if (progress.committed) await fs.promises.rm(targetDir, { recursive: true, force: true });
    let running = false;
    if (!this.exited && !gone && !progress.killed) {
      try {
        if (progress.wasRunning && progress.stopped) await this.qmp.execute('cont', {});
        running = progress.wasRunning;
      } catch {
        await this.kill();
      }
    }
    // A QEMU that went away may not have been reaped yet: it is not alive all the same.
    const alive = !gone && !this.exited;
    const failure = snapshotFailure(error, this.id, gone, { running, alive });
    log.warn({ vm: this.id, code: failure.code, vmRunning: running, vmAlive: alive, error: errorMessage(error) }, 'snapshot abandoned');
    return failure;
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
    const cwd = processCwd(record.pid);
    if (!processCmdline(record.pid).includes(options.runDir) && !(cwd !== undefined && cwd.startsWith(options.runDir + path.sep))) {
      throw new CocoonError('vm_gone', `pid ${record.pid} is not the QEMU of ${options.id}`);
    }
    if (record.guestProtocol !== undefined) checkGuestProtocol(record.guestProtocol, `the guest of ${options.id}`);
    // Sockets a dead daemon served (migration) would block the next snapshot.
    const qemuDir = qemuDirOf(options.runDir);
    await Promise.all(['migrate.sock', 'incoming.sock'].map((name) => fs.promises.rm(path.join(qemuDir, name), { force: true })));
    let held = false;
    const proc: VmProcess = {
      pid: record.pid,
      exit: waitForProcessExit(record.pid, record.startTime, { intervalMs: 100, keepAlive: () => held }).then(() => removeVmCgroup(record.cgroup)),
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
      pidFile: path.join(qemuDir, 'qemu.pid'),
      incoming: false,
      sandbox: true,
    } satisfies QemuLaunch;
    let channels: [QmpClient, GuestChannel, SerialLog];
    const giveUp = new AbortController();
    try {
      channels = await Promise.race([
        connectChannels(launch, options, giveUp.signal),
        proc.exit.then(() => {
          throw new CocoonError('vm_gone', `QEMU of ${options.id} exited while being adopted`);
        }),
      ]);
    } catch (error) {
      giveUp.abort(error);
      if (isCocoonErrorCode(error, 'vm_gone')) throw error;
      throw new CocoonError('vm_adopt_failed', `cannot reconnect to QEMU of ${options.id}: ${errorMessage(error)}`, { cause: error });
    }
    const [qmp, guest, serial] = channels;
    guest.helloSeen = true;
    const vm = new QemuVm({ launch, options, proc, qmp, guest, serial, portBacklog: record.portBacklog });
    vm.guestProtocol = record.guestProtocol;
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
    // After a reboot the RAM file's unsynced pages may be old ones: nothing to complete from.
    if (pending.bootId !== undefined && pending.bootId !== kernelBootId()) {
      await fs.promises.rm(partial, { recursive: true, force: true });
      return 'none';
    }
    const stateFile = path.join(partial, pending.manifest.files.state.name);
    const stateOk = fs.existsSync(stateFile) && fs.statSync(stateFile).size === pending.manifest.files.state.sizeBytes;
    const memThere = fs.existsSync(pending.ramPath) || fs.existsSync(path.join(partial, pending.manifest.files.mem.name));
    const diskThere = fs.existsSync(pending.diskPath) || fs.existsSync(path.join(partial, pending.manifest.files.disk.name));
    if (!stateOk || !memThere || !diskThere) {
      await fs.promises.rm(partial, { recursive: true, force: true });
      return 'none';
    }
    await completeSnapshot(partial, targetDir, pending, options.durable ?? true);
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

  /**
   * A restore into a QEMU the pool started ahead (pool.ts): its files are placed into the run
   * directory, its memory filled (`fill`) while the disk layer is made and attached and the
   * ports forwarded, then `start` as for any restore. A failure kills it and removes what was
   * made, as `launch` does.
   */
  private static async launchPooled(
    pooled: PooledQemu,
    options: CommonVmOptions,
    disk: DiskSpec,
    steps: { clock: PhaseClock; guestProtocol?: number; diskLayer: () => Promise<void>; fill: () => Promise<string>; start: (vm: QemuVm, how: RestoreStart) => Promise<void> },
  ): Promise<QemuVm> {
    const { clock } = steps;
    const { shape, cmdline } = pooled.key;
    const inline = restoreTuning.pooledInline; // (read once: the benchmark switches it between restores)
    const ramPath = path.join(options.runDir, 'mem');
    const qemuDir = qemuDirOf(options.runDir);
    const sockets = qemuSocketsOf(qemuDir);
    let filling: Promise<string> | undefined;
    let serial: SerialLog | undefined;
    let vm: QemuVm | undefined;
    const runDirExisted = fs.existsSync(options.runDir);
    try {
      validateId(options.id);
      for (const socket of [...Object.values(sockets), path.join(qemuDir, 'incoming.sock'), path.join(qemuDir, 'migrate.sock')]) {
        if (Buffer.byteLength(socket) > MAX_SOCKET_PATH) {
          throw new CocoonError('path_too_long', `run directory ${options.runDir} is too long for unix sockets; use a shorter data directory`);
        }
      }
      await fs.promises.mkdir(options.runDir, { recursive: true, mode: 0o700 }).catch((error: unknown) => {
        throw noSpaceError(error, options.id) ?? error;
      });
      pooled.place(options.runDir);
      clock.mark('pool_place');
      // The layer first: a small write, slowed much by the memory copy beside it.
      await steps.diskLayer();
      clock.mark('disk_layer');
      filling = steps.fill();
      filling.catch(() => undefined); // awaited below, or settled in the clean-up
      const resolving = resolveForwards(options.network.forwards);
      resolving.catch(() => undefined); // awaited in attachPooled
      const forwards = await attachPooled(pooled, { runDir: options.runDir, qemuDir, ramPath, disk }, resolving, inline, clock);
      const { child, exit, cgroup } = pooled.process;
      await writeLaunchRecord(options.runDir, {
        formatVersion: 1,
        id: options.id,
        pid: pooled.pid,
        startTime: processStartTime(pooled.pid),
        shape,
        cmdline,
        disk,
        ramPath,
        forwards,
        sockets,
        cgroup,
        ...(steps.guestProtocol !== undefined ? { guestProtocol: steps.guestProtocol } : {}),
        portBacklog: pooled.portBacklog,
      });
      clock.mark('forwards_record');
      serial = new SerialLog(path.join(options.runDir, 'serial.log'), options.serialLogMaxBytes);
      serial.attachSocket(pooled.serialSocket);
      const launch = { shape, cmdline, disk, ram: { path: ramPath, share: true }, forwards, sockets };
      const proc: VmProcess = { pid: pooled.pid, exit, hold: () => child.ref() };
      vm = new QemuVm({ launch, options, proc, qmp: pooled.qmp, guest: pooled.guest, serial, portBacklog: pooled.portBacklog });
      vm.guestProtocol = steps.guestProtocol;
      vm.startPhases = clock.phases;
      clock.mark(`${await filling}_wait`);
      await Promise.race([
        steps.start(vm, { listening: pooled.listening, inline }),
        exit.then(() => {
          throw qemuStartError(options.runDir, { forwards, incoming: true }, vm);
        }),
      ]);
      log.info({ vm: options.id, pid: pooled.pid, accel: shape.accel, restore: true, pooled: true }, 'vm started');
      const restored = vm;
      writeBackRamLater(ramPath, inline, () => restored.exited);
      return vm;
    } catch (caught) {
      let error = caught;
      // QMP's socket closing (vm_gone) is seen before the process's exit: wait for it, to say why.
      if (await exitedWithin(pooled.process.exit, vm || isCocoonError(error, 'vm_gone') ? 500 : 0)) {
        if (pooled.process.child.signalCode) error = qemuKilledError(options.id, pooled.process.child.signalCode, true);
        else if (!isCocoonError(error, 'snapshot_corrupt')) error = qemuStartError(options.runDir, { forwards: [], incoming: true }, vm);
      }
      error = noSpaceError(error, options.id) ?? error;
      if (vm) await vm.kill();
      else {
        serial?.close();
        await pooled.discard();
      }
      await filling?.catch(() => undefined);
      if (runDirExisted) await removeLaunchFiles(options.runDir, disk, ramPath);
      else await fs.promises.rm(options.runDir, { recursive: true, force: true });
      releaseRam(ramPath);
      throw error;
    }
  }

  /** Shared by boot and restore: start QEMU, connect its channels, run `start`, clean up on failure. */
  private static async launch(
    options: CommonVmOptions,
    shape: MachineShape,
    cmdline: string,
    disk: DiskSpec,
    ramPath: string,
    steps: {
      clock: PhaseClock;
      incoming?: boolean;
      guestProtocol?: number;
      /** Before QEMU starts (its files must exist); answers the phase's name. */
      prepare: () => Promise<string>;
      /** While QEMU starts, done before `start` (the RAM file's content); answers the phase's name. */
      fill?: () => Promise<string>;
      start: (vm: QemuVm) => Promise<void>;
    },
  ): Promise<QemuVm> {
    const { clock } = steps;
    let filling: Promise<string> | undefined;
    validateId(options.id);
    const runDirExisted = fs.existsSync(options.runDir);
    await fs.promises.mkdir(options.runDir, { recursive: true, mode: 0o700 }).catch((error: unknown) => {
      throw noSpaceError(error, options.id) ?? error;
    });
    // QEMU's sockets and pid file: a directory of its own (src/host/sandbox.ts: the run directory is root's).
    const qemuDir = qemuDirOf(options.runDir);
    const sockets = qemuSocketsOf(qemuDir);
    let vm: QemuVm | undefined;
    let started: SandboxedProcess | undefined;
    let launch: QemuLaunch | undefined;
    const giveUp = new AbortController();
    try {
      for (const socket of [...Object.values(sockets), path.join(qemuDir, 'incoming.sock'), path.join(qemuDir, 'migrate.sock')]) {
        if (Buffer.byteLength(socket) > MAX_SOCKET_PATH) {
          throw new CocoonError('path_too_long', `run directory ${options.runDir} is too long for unix sockets; use a shorter data directory`);
        }
      }
      await fs.promises.mkdir(qemuDir, { recursive: true, mode: 0o700 });
      // The names a QEMU before this one left (SIGKILL cleans nothing up), or that one still
      // exiting holds (tuning.ts `overlapExits`): this QEMU's own must be the only ones, so that
      // its pid file's lock is its own and the channels connect to it, not to a dying listener.
      await Promise.all(QEMU_OWN_NAMES.map((name) => fs.promises.rm(path.join(qemuDir, name), { force: true })));
      // The host side of the launch is every driver's (launch-sandbox.ts): the uid and the
      // egress guard before the files are made, the files given to that uid after. (The guard
      // also keeps a QEMU that escaped its guest from the host's services: slirp's restrict is
      // QEMU's own policy.)
      const egress = options.network.egress ?? false;
      let identity = await launchIdentity(options.runDir, egress);
      clock.mark('sandbox_setup');
      clock.mark(await steps.prepare());
      identity = await grantLaunchAccess(identity, { runDir: options.runDir, processDir: qemuDir, ramPath, disk, openedFiles: [shape.guest.kernel, shape.guest.initramfs] }, { egress });
      launch = {
        shape,
        cmdline,
        ram: { path: ramPath, share: true },
        disk,
        forwards: await resolveForwards(options.network.forwards),
        egress: options.network.egress ?? false,
        sockets,
        pidFile: path.join(qemuDir, 'qemu.pid'),
        incoming: steps.incoming ?? false,
        sandbox: setting('COCOON_QEMU_SANDBOX'),
      };
      clock.mark('sandbox_setup');
      filling = steps.fill?.();
      filling?.catch(() => undefined); // awaited below, or settled in the clean-up
      // (The VM's cgroup is made as the process starts: startSandboxed.)
      const shim = setting('COCOON_QEMU_LISTEN_SHIM') ? await listenShim() : undefined;
      started = startQemu(options.id, launch, options.runDir, identity, launchLimits(shape, options.limits), undefined, shim);
      clock.mark('process_spawn');
      const { child, exit, cgroup } = started;
      const launched = launch;
      const record: LaunchRecord = {
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
        cgroup,
        ...(steps.guestProtocol !== undefined ? { guestProtocol: steps.guestProtocol } : {}),
        portBacklog: shim !== undefined ? SHIM_BACKLOG : 1,
      };
      const connected = () =>
        Promise.race([
          connectChannels(launched, options, giveUp.signal),
          exit.then(() => {
            throw qemuStartError(options.runDir, launched);
          }),
        ]);
      let channels: [QmpClient, GuestChannel, SerialLog];
      if (restoreTuning.overlap) {
        // The record is written while the channels connect; both settle before going on, so a
        // failure never leaves a record written after the clean-up removed it.
        const recorded = writeLaunchRecord(options.runDir, record);
        try {
          channels = await connected();
        } finally {
          await recorded.catch(() => undefined);
        }
        await recorded;
        clock.mark('launch_record_process_channels');
      } else {
        await writeLaunchRecord(options.runDir, record);
        clock.mark('launch_record');
        channels = await connected();
        clock.mark('process_channels');
      }
      const [qmp, guest, serial] = channels;
      const proc: VmProcess = { pid: child.pid ?? -1, exit, hold: () => child.ref() };
      vm = new QemuVm({ launch: launched, options, proc, qmp, guest, serial, portBacklog: record.portBacklog });
      vm.guestProtocol = steps.guestProtocol;
      vm.startPhases = clock.phases;
      if (filling) clock.mark(`${await filling}_wait`);
      await Promise.race([
        steps.start(vm),
        exit.then(() => {
          throw qemuStartError(options.runDir, launched, vm);
        }),
      ]);
      if (guest.protocolVersion !== undefined && vm.guestProtocol === undefined) {
        // A boot: the version cocoon-init said hello with goes into the record, for an adopter.
        vm.guestProtocol = guest.protocolVersion;
        await writeLaunchRecord(options.runDir, { ...record, guestProtocol: guest.protocolVersion });
      }
      log.info({ vm: options.id, pid: child.pid, accel: shape.accel, restore: launched.incoming }, 'vm started');
      // Start writing the RAM file back now, while the guest runs, so that the fsync of the next
      // snapshot only has the pages dirtied since (a fresh clone's pages are all dirty).
      fsyncFile(ramPath).catch(() => undefined);
      return vm;
    } catch (caught) {
      giveUp.abort(new CocoonError('vm_start_failed', `the start of ${options.id} was given up`));
      let error = caught;
      // QEMU dying makes its sockets close too: whichever the caller noticed first, QEMU's own
      // words (in qemu.log) say best what went wrong. A QEMU killed by a signal (nothing here has
      // sent one yet) was killed from outside: that says nothing about the snapshot.
      if (started && (await exitedWithin(started.exit, 500))) {
        if (started.child.signalCode) error = qemuKilledError(options.id, started.child.signalCode, launch?.incoming ?? false);
        else if (!isCocoonError(error, 'snapshot_corrupt')) error = qemuStartError(options.runDir, launch ?? undefined, vm);
      }
      error = noSpaceError(error, options.id) ?? error;
      if (vm) await vm.kill();
      else if (started) await killAndWait(started);
      await filling?.catch(() => undefined); // no copy writes into what is removed next
      if (runDirExisted) await removeLaunchFiles(options.runDir, disk, ramPath);
      else await fs.promises.rm(options.runDir, { recursive: true, force: true });
      releaseRam(ramPath);
      throw error;
    }
  }
}

/**
 * Refuses a snapshot whose manifest says it was made by another VMM, for another architecture,
 * or by a guest speaking a protocol this host does not. A manifest that says nothing (written
 * before these were recorded) is restored as before.
 */
function assertSnapshotCompatible(dir: string, manifest: SnapshotManifest): void {
  if (manifest.vmm !== undefined && manifest.vmm?.name !== 'qemu') {
    throw new CocoonError('snapshot_incompatible', `snapshot ${dir} was made by ${String(manifest.vmm?.name)}, not QEMU: restore it on a host that runs that VMM`, { status: 422 });
  }
  if (manifest.arch !== undefined && manifest.arch !== QEMU_ARCH) {
    throw new CocoonError('snapshot_incompatible', `snapshot ${dir} is of a ${String(manifest.arch)} guest; this host runs ${QEMU_ARCH} guests`, { status: 422 });
  }
  if (manifest.guestProtocol !== undefined) checkGuestProtocol(manifest.guestProtocol, `the guest in snapshot ${dir}`);
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

/**
 * Starts QEMU in the VM's cgroup as its identity (launch-sandbox.ts `startSandboxed`), its
 * stdout and stderr to `qemu.log` in the run directory.
 */
export function startQemu(
  id: string,
  launch: QemuLaunch,
  runDir: string,
  identity: VmIdentity | undefined,
  limits: Required<VmLimits>,
  cwd?: string,
  /** native/listen-shim.ts: forwarded ports listen with a real backlog (undefined: libslirp's 1). */
  listenShim?: string,
): SandboxedProcess {
  const logFd = fs.openSync(path.join(runDir, 'qemu.log'), 'w', 0o600);
  const guestFds: number[] = [];
  try {
    let args = qemuArgs(launch);
    let preload = listenShim;
    if (identity) {
      // Kernel and initramfs (and the shim) as open files: QEMU's user need not search the directories they are in.
      const { kernel, initramfs } = launch.shape.guest;
      guestFds.push(fs.openSync(kernel, 'r'), fs.openSync(initramfs, 'r'));
      args = qemuArgs({ ...launch, shape: { ...launch.shape, guest: { ...launch.shape.guest, kernel: '/dev/fd/3', initramfs: '/dev/fd/4' } } });
      if (listenShim !== undefined) {
        guestFds.push(fs.openSync(listenShim, 'r'));
        preload = '/dev/fd/5';
      }
    }
    return startSandboxed({
      id,
      argv: [QEMU_BINARY, ...args],
      identity,
      limits,
      logFd,
      fds: guestFds,
      ...(cwd ? { cwd } : {}),
      ...(preload !== undefined ? { env: { LD_PRELOAD: preload } } : {}),
    });
  } finally {
    fs.closeSync(logFd);
    for (const fd of guestFds) fs.closeSync(fd);
  }
}

/**
 * Connects QMP, the guest channel and the serial console. Whoever gives up on the VM (its QEMU
 * exited first) aborts `giveUp`: the connects that are still polling for their sockets must
 * stop, or one would connect to the next QEMU started in the same run directory and take its
 * only QMP, guest or serial connection (a retried restore then hangs without a greeting).
 * Nothing stays connected when this rejects.
 */
async function connectChannels(
  launch: Pick<QemuLaunch, 'sockets'>,
  options: Pick<CommonVmOptions, 'runDir' | 'serialLogMaxBytes' | 'signal'>,
  giveUp: AbortSignal,
): Promise<[QmpClient, GuestChannel, SerialLog]> {
  const signal = options.signal ? AbortSignal.any([options.signal, giveUp]) : giveUp;
  const serial = new SerialLog(path.join(options.runDir, 'serial.log'), options.serialLogMaxBytes);
  const qmp = QmpClient.connect(launch.sockets.qmp, { timeoutMs: 10_000, signal });
  const guest = GuestChannel.connect(launch.sockets.guest, 10_000, signal);
  const attached = serial.attach(launch.sockets.serial, 10_000, signal);
  try {
    await Promise.all([qmp, guest, attached]);
    if (giveUp.aborted) throw giveUp.reason;
    return [await qmp, await guest, serial];
  } catch (error) {
    serial.close();
    void qmp.then((client) => client.close(), () => undefined);
    void guest.then((channel) => channel.close(), () => undefined);
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
 * Completes a snapshot whose process died after saving the device state (`recoverSnapshot`):
 * the QEMU is gone, so its RAM and disk files move into the partial directory (each move is a
 * rename: a crash leaves every file in one place or the other), are checksummed and fsynced,
 * and the snapshot is committed.
 */
async function completeSnapshot(partial: string, targetDir: string, pending: PendingSnapshot, durable: boolean): Promise<SnapshotManifest> {
  const { files } = pending.manifest;
  const mem = path.join(partial, files.mem.name);
  const disk = path.join(partial, files.disk.name);
  if (!fs.existsSync(mem)) await moveFile(pending.ramPath, mem);
  if (!fs.existsSync(disk)) await moveFile(pending.diskPath, disk);
  if (files.disk.format === 'qcow2') await relinkBacking(disk, { finalDir: targetDir, formerDir: path.dirname(pending.diskPath) });
  const handles = [await fs.promises.open(mem, 'r'), await fs.promises.open(disk, 'r')];
  let checksums: DataChecksum[];
  try {
    // The device state too: a snapshot syncs it beside the pending record, and may have died first.
    if (durable) await fsyncFile(path.join(partial, files.state.name), 'r');
    [checksums] = await sealData(handles, durable);
  } finally {
    for (const handle of handles) await handle.close().catch(() => undefined);
  }
  await sealSnapshotFiles(pending.runDir, { mem, disk });
  const manifest: SnapshotManifest = {
    ...pending.manifest,
    files: {
      state: files.state,
      mem: { ...files.mem, checksum: checksums[0] },
      disk: { ...files.disk, sizeBytes: fs.statSync(disk).size, checksum: checksums[1] },
    },
  };
  await commitSnapshot(partial, targetDir, manifest, durable);
  if (durable) await fsyncDir(path.dirname(targetDir));
  await fs.promises.rm(path.join(pending.runDir, LAUNCH_FILE), { force: true });
  return manifest;
}

async function removeLaunchFiles(runDir: string, disk: DiskSpec, ramPath: string): Promise<void> {
  const names = [...QEMU_OWN_NAMES, LAUNCH_FILE];
  await Promise.all([
    ...names.map((name) => fs.promises.rm(path.join(runDir, name), { force: true })),
    fs.promises.rm(qemuDirOf(runDir), { recursive: true, force: true }),
    fs.promises.rm(ramPath, { force: true }),
    disk.path.startsWith(runDir + path.sep) ? fs.promises.rm(disk.path, { force: true }) : Promise.resolve(),
  ]);
}
