/**
 * A small per-host pool of QEMU processes started ahead (issue 12: a restore spent ~150 ms
 * starting QEMU and connecting its channels). Each waits with `-incoming defer`, already
 * sandboxed (its uid, the egress guard, its cgroup: launch-sandbox.ts), with QMP, the guest
 * channel and the serial console connected. A restore of a snapshot of the same machine (shape,
 * kernel command line, egress, limits: `PoolKey`) takes one and gives it what a restore names:
 *
 *   - its run directory: the process was started in a directory of the pool with its files
 *     named relative to its working directory (`qemu/` of that directory); `place` renames
 *     that `qemu/` directory, the RAM file and the log into the run directory. Renames keep
 *     QEMU's open files, listening sockets and working directory, so QEMU's command line names
 *     no run directory: the driver finds such a process by its working directory
 *     (host/processes.ts `byCwd`), and the run directory records its uid (`recordVmUid`);
 *   - its RAM file's content: filled in place once placed, as a restore does today (QEMU
 *     waiting for its device state does not touch guest RAM). The pool copies ahead, into each
 *     process's RAM file, the memory of the image snapshot last restored (or resumed against)
 *     on its machine (`PoolMemory`, RAM files up to COCOON_RAM_RESERVE_MAX_MIB, admitted by the
 *     space ledger like a VM's): a restore of that memory while the file is unchanged and
 *     verified then copies nothing, and a resume from a memory diff against it writes only the
 *     diff's pages (`prefilled`; qemu.ts decides, mem-diff.ts `onBase`);
 *   - its disk: the block device starts on a placeholder under a throttle filter with no
 *     limits (qemu-args.ts `diskLater`); `attachDisk` adds the layer and swaps the filter's
 *     child (`blockdev-reopen`), before the device state is loaded;
 *   - its port forwards (`hostfwd_add`);
 *   - its device state: it listens for it already (`incoming.sock` in its `qemu/`; the listening
 *     socket stays valid through the rename), so a restore only sends it.
 *
 * The pool learns what to keep from what is asked (the last keys taken or missed), refills one
 * process at a time in the background, holds at most `size` processes (`COCOON_QEMU_POOL`),
 * and kills every one it holds on `close` (and, at `open`, whatever a dead daemon's pool left).
 */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import type net from 'node:net';
import path from 'node:path';
import { CocoonError, errorMessage } from '../../common/errors.ts';
import { log } from '../../common/log.ts';
import { setting } from '../../common/settings.ts';
import { listenShim, SHIM_BACKLOG } from '../native/listen-shim.ts';
import { recordVmUid } from '../../host/sandbox.ts';
import { killProcesses } from '../../host/processes.ts';
import { connectUnix } from '../../net/unix-socket.ts';
import { GuestChannel } from '../guest-channel.ts';
import { type SandboxedProcess, type VmIdentity, grantLaunchAccess, launchIdentity } from '../launch-sandbox.ts';
import type { DiskSpec, MachineShape, PortForward, VmLimits } from '../types.ts';
import { QEMU_SUBDIR } from './paths.ts';
import { DISK_NODE, DISK_PLACEHOLDER, DISK_THROTTLE_GROUP, qemuArgs } from './qemu-args.ts';
import { listenForDeviceState } from './migration.ts';
import { QmpClient } from './qmp.ts';
import { isMemoryDiff } from '../mem-diff.ts';
import { cloneRamFile, reservesRam } from '../ram-file.ts';
import { readSnapshotManifest } from '../snapshot.ts';
import { assertRoomForRam, holdRam, releaseRam } from '../space-ledger.ts';
import { type FileIdentity, identityBeforeReading } from '../verified-files.ts';

/** What a pooled QEMU must match to be used for a restore. */
export interface PoolKey {
  shape: MachineShape;
  cmdline: string;
  egress: boolean;
  limits: Required<VmLimits>;
}

/** Everything on the command line, and the uid sandbox's switch: two keys are equal when their strings are. */
function keyString(key: PoolKey): string {
  return JSON.stringify([key.shape, key.cmdline, key.egress, key.limits, setting('COCOON_QEMU_SANDBOX')]);
}

/**
 * The memory the pool copies ahead into its processes' RAM files for a machine: an image
 * snapshot's (its whole memory: `<snapshotDir>/<manifest's mem>`).
 */
export interface PoolMemory {
  snapshotDir: string;
}

/** What a process's RAM file holds, copied ahead: that file's content when it had `identity` (verified-files.ts). */
export interface PrefilledRam {
  file: string;
  identity: FileIdentity;
  sizeBytes: number;
}

/** A process's RAM file is filled ahead only while the data directory has room for this many such files besides. */
const PREFILL_ROOM_FACTOR = 4;

/** How long after a take the pool starts refilling (see `refillLater`). */
const REFILL_DELAY_MS = 500;

/** Relative to the process's working directory (`<entry>/qemu`). */
const RELATIVE_SOCKETS = { qmp: 'qmp.sock', guest: 'guest.sock', serial: 'serial.sock', agent: 'agent.sock' };
/** Where a waiting process listens for its device state (qemu.ts names the same file in a run directory's `qemu/`). */
const INCOMING_SOCKET = 'incoming.sock';

/** How a pooled QEMU starts (qemu.ts's `startQemu`, given to `openQemuPool` to keep the folders acyclic). */
export type StartQemu = (
  id: string,
  launch: Parameters<typeof qemuArgs>[0],
  logDir: string,
  identity: VmIdentity | undefined,
  limits: Required<VmLimits>,
  cwd: string,
  /** native/listen-shim.ts (forwarded ports with a real backlog); undefined: none. */
  listenShim?: string,
) => SandboxedProcess;

/**
 * The QMP commands that swap a pooled QEMU's placeholder disk for `disk`, in this order: the
 * layer added, the throttle node reopened onto it, the placeholder removed. Each step writes its
 * command when called, so calling them all at once sends them in order in one exchange.
 */
function diskSteps(disk: DiskSpec): Array<(qmp: QmpClient) => Promise<unknown>> {
  const layer = `${DISK_NODE}-layer`;
  return [
    (qmp) =>
      qmp.execute('blockdev-add', {
        driver: disk.format,
        'node-name': layer,
        discard: 'unmap',
        'detect-zeroes': 'unmap',
        ...(disk.readOnly ? { 'read-only': true } : {}),
        file: { driver: 'file', filename: path.resolve(disk.path), discard: 'unmap' },
      }),
    (qmp) => qmp.execute('blockdev-reopen', { options: [{ driver: 'throttle', 'node-name': DISK_NODE, 'throttle-group': DISK_THROTTLE_GROUP, file: layer }] }),
    (qmp) => qmp.execute('blockdev-del', { 'node-name': DISK_PLACEHOLDER }),
  ];
}

export class PooledQemu {
  readonly dir: string;
  readonly key: PoolKey;
  readonly process: SandboxedProcess;
  readonly identity: VmIdentity | undefined;
  /** Its RAM file holds this memory already (copied ahead, admitted by the space ledger); undefined: it is empty. */
  prefilled: PrefilledRam | undefined;
  readonly qmp: QmpClient;
  readonly guest: GuestChannel;
  readonly serialSocket: net.Socket;
  /** The backlog its forwarded ports will listen with (vmm Vm.portBacklog): 256 with cocoon-listen.so, else 1. */
  readonly portBacklog: number;
  /** It listens for its device state on `incoming.sock` in its `qemu/` already (migration.ts `listenForDeviceState`). */
  readonly listening = true;
  #exited = false;

  constructor(parts: {
    dir: string;
    key: PoolKey;
    process: SandboxedProcess;
    identity: VmIdentity | undefined;
    qmp: QmpClient;
    guest: GuestChannel;
    serialSocket: net.Socket;
    portBacklog: number;
    prefilled?: PrefilledRam | undefined;
  }) {
    this.dir = parts.dir;
    this.portBacklog = parts.portBacklog;
    this.key = parts.key;
    this.process = parts.process;
    this.identity = parts.identity;
    this.qmp = parts.qmp;
    this.guest = parts.guest;
    this.serialSocket = parts.serialSocket;
    this.prefilled = parts.prefilled;
    void parts.process.exit.then(() => {
      this.#exited = true;
    });
  }

  get pid(): number {
    return this.process.child.pid ?? -1;
  }

  get exited(): boolean {
    return this.#exited || this.process.child.exitCode !== null || this.process.child.signalCode !== null;
  }

  /**
   * Moves the process's files into `runDir` (which exists; its `qemu/`, `mem` and `qemu.log`
   * are replaced) and records its uid there. Answers the RAM file's and the sockets' new paths.
   */
  place(runDir: string): { ramPath: string; qemuDir: string } {
    // Synchronous: a handful of renames, on the restore's critical path (the thread pool is
    // busy with the restore's other file work).
    const qemuDir = path.join(runDir, QEMU_SUBDIR);
    const ramPath = path.join(runDir, 'mem');
    fs.rmSync(qemuDir, { recursive: true, force: true });
    if (this.identity) recordVmUid(runDir, this.identity.uid);
    fs.renameSync(path.join(this.dir, QEMU_SUBDIR), qemuDir);
    fs.renameSync(path.join(this.dir, 'mem'), ramPath);
    if (this.prefilled) {
      // The space ledger's promise follows the file (the restore admits it again if it refills it).
      releaseRam(path.join(this.dir, 'mem'));
      holdRam(ramPath, this.prefilled.sizeBytes);
    }
    fs.renameSync(path.join(this.dir, 'qemu.log'), path.join(runDir, 'qemu.log'));
    fs.rmSync(this.dir, { recursive: true, force: true });
    return { ramPath, qemuDir };
  }

  /** Gives the block device its disk (see the file's comment); before the device state is loaded. */
  async attachDisk(disk: DiskSpec): Promise<void> {
    for (const step of diskSteps(disk)) await step(this.qmp);
  }

  /** Forwards each guest port to its host port on 127.0.0.1 (`port_in_use` where QEMU cannot bind it). */
  async forward(forwards: Required<PortForward>[]): Promise<void> {
    for (const port of forwards) await this.#forwardOne(port);
  }

  async #forwardOne({ hostPort, guestPort }: Required<PortForward>): Promise<void> {
    const output = await this.qmp.execute('human-monitor-command', { 'command-line': `hostfwd_add net0 tcp:127.0.0.1:${hostPort}-:${guestPort}` });
    if (typeof output === 'string' && output.trim() !== '') {
      throw new CocoonError('port_in_use', `host port ${hostPort} (for guest port ${guestPort}) cannot be forwarded: ${output.trim().slice(0, 200)}`, { status: 409 });
    }
  }

  /**
   * `attachDisk` and `forward` in one exchange: every command written at once and the answers
   * awaited together (QMP runs them one after the other, in order), instead of a round trip
   * each. The first command that fails is the error (those after a failed disk step fail too).
   */
  async attachDiskAndForward(disk: DiskSpec, forwards: Required<PortForward>[]): Promise<void> {
    const answers: Array<Promise<unknown>> = [
      ...diskSteps(disk).map((step) => step(this.qmp)),
      ...forwards.map((port) => this.#forwardOne(port)),
    ];
    const settled = await Promise.allSettled(answers);
    const failed = settled.find((answer) => answer.status === 'rejected');
    if (failed) throw failed.reason;
  }

  /** Kills the process and waits for it; removes what is left of its directory. */
  async discard(): Promise<void> {
    releaseRam(path.join(this.dir, 'mem'));
    this.qmp.close();
    this.guest.close();
    this.serialSocket.destroy();
    this.process.child.ref();
    try {
      if (this.process.child.pid) process.kill(this.process.child.pid, 'SIGKILL');
    } catch {
      // gone already
    }
    await this.process.exit;
    await fs.promises.rm(this.dir, { recursive: true, force: true });
  }
}

export class QemuPool {
  readonly root: string;
  readonly size: number;
  readonly #startQemu: StartQemu;
  /** Ready processes by key. */
  readonly #ready = new Map<string, PooledQemu[]>();
  /** Keys asked for, most recent last, at most `size` of them. */
  readonly #wanted = new Map<string, PoolKey>();
  /** The memory to copy ahead for a key (the last one a take named). */
  readonly #memory = new Map<string, PoolMemory>();
  #starting: Promise<void> | undefined;
  #closed = false;
  #failures = 0;
  #retryTimer: NodeJS.Timeout | undefined;
  #delayTimer: NodeJS.Timeout | undefined;
  #counter = 0;

  private constructor(root: string, size: number, startQemu: StartQemu) {
    this.root = root;
    this.size = size;
    this.#startQemu = startQemu;
  }

  /** A pool in `root` (made, emptied: a dead daemon's processes there are killed first). */
  static async open(root: string, size: number, startQemu: StartQemu): Promise<QemuPool> {
    const dir = path.resolve(root);
    await killProcesses('qemu-system', dir, undefined, { byCwd: true });
    await fs.promises.rm(dir, { recursive: true, force: true });
    await fs.promises.mkdir(dir, { recursive: true, mode: 0o700 });
    return new QemuPool(dir, size, startQemu);
  }

  /** How many processes wait now (all keys). */
  get readyCount(): number {
    let count = 0;
    for (const list of this.#ready.values()) count += list.length;
    return count;
  }

  /**
   * A waiting process for `key`, or undefined (the pool then starts one for the next restore of
   * it). Either way the pool refills in the background.
   */
  take(key: PoolKey, memory?: PoolMemory): PooledQemu | undefined {
    if (this.#closed || this.size <= 0) return undefined;
    const name = keyString(key);
    if (memory) this.#memory.set(name, { snapshotDir: path.resolve(memory.snapshotDir) });
    this.#wanted.delete(name);
    this.#wanted.set(name, key);
    while (this.#wanted.size > this.size) this.#wanted.delete(this.#wanted.keys().next().value as string);
    for (const known of this.#memory.keys()) if (!this.#wanted.has(known)) this.#memory.delete(known);
    const list = this.#ready.get(name) ?? [];
    let entry: PooledQemu | undefined;
    while ((entry = list.shift()) && entry.exited) void entry.discard();
    this.#refillLater();
    return entry;
  }

  /** Kills every process the pool holds (and waits for them); later `take`s answer undefined. */
  async close(): Promise<void> {
    this.#closed = true;
    if (active === this) active = undefined;
    clearTimeout(this.#retryTimer);
    clearTimeout(this.#delayTimer);
    await this.#starting?.catch(() => undefined);
    const all = [...this.#ready.values()].flat();
    this.#ready.clear();
    await Promise.all(all.map((entry) => entry.discard()));
    await killProcesses('qemu-system', this.root, undefined, { byCwd: true });
    await fs.promises.rm(this.root, { recursive: true, force: true });
  }

  /** How many processes each wanted key should have: one each, the rest to the most recent. */
  #targets(): Map<string, number> {
    const keys = [...this.#wanted.keys()];
    const targets = new Map<string, number>();
    keys.forEach((name, index) => targets.set(name, index === keys.length - 1 ? this.size - (keys.length - 1) : 1));
    return targets;
  }

  /**
   * Refills once the restore that took (or missed) has had its time: a QEMU starting takes a
   * core for ~150 ms, which the restore and its guest's first answer need on a small host. A
   * refill already due stays due: pushed back by every take, it never came while wakes came
   * every half second or so (the microvm bench: a resume then found the pool empty and started
   * its own QEMU, ~150 ms more).
   */
  #refillLater(): void {
    if (this.#delayTimer) return;
    this.#delayTimer = setTimeout(() => {
      this.#delayTimer = undefined;
      this.#refill();
    }, REFILL_DELAY_MS);
    this.#delayTimer.unref();
  }

  #refill(): void {
    if (this.#closed || this.#starting || this.#retryTimer || this.#delayTimer) return;
    const targets = this.#targets();
    // Processes of keys no longer wanted make room.
    for (const [name, list] of this.#ready) {
      const keep = targets.get(name) ?? 0;
      for (const extra of list.splice(keep)) void extra.discard();
      if (list.length === 0) this.#ready.delete(name);
    }
    const lacking = [...targets].reverse().find(([name, target]) => (this.#ready.get(name)?.length ?? 0) < target);
    if (!lacking) return;
    const key = this.#wanted.get(lacking[0])!;
    this.#starting = this.#start(key)
      .then((entry) => {
        this.#failures = 0;
        if (this.#closed || !this.#wanted.has(lacking[0])) return entry.discard();
        const list = this.#ready.get(lacking[0]) ?? [];
        list.push(entry);
        this.#ready.set(lacking[0], list);
        // A process that dies while it waits leaves the pool (and is replaced).
        void entry.process.exit.then(() => {
          const at = list.indexOf(entry);
          if (at >= 0) {
            list.splice(at, 1);
            void entry.discard();
            this.#refill();
          }
        });
      })
      .catch((error: unknown) => {
        this.#failures++;
        log.warn({ error: errorMessage(error), failures: this.#failures }, 'a QEMU for the pool did not start');
        // Back off, so that a host that cannot start QEMU does not spin.
        this.#retryTimer = setTimeout(() => {
          this.#retryTimer = undefined;
          this.#refill();
        }, Math.min(30_000, 500 * 2 ** this.#failures));
        this.#retryTimer.unref();
      })
      .finally(() => {
        this.#starting = undefined;
        this.#refill();
      });
  }

  async #start(key: PoolKey): Promise<PooledQemu> {
    const dir = path.join(this.root, `${++this.#counter}-${randomBytes(4).toString('hex')}`);
    const qemuDir = path.join(dir, QEMU_SUBDIR);
    await fs.promises.mkdir(qemuDir, { recursive: true, mode: 0o700 });
    let started: SandboxedProcess | undefined;
    try {
      // An empty RAM file: QEMU sizes it; a restore fills it (and the space ledger admits it then).
      const ramPath = path.join(dir, 'mem');
      await (await fs.promises.open(ramPath, 'wx', 0o600)).close();
      let identity = await launchIdentity(dir, key.egress);
      identity = await grantLaunchAccess(
        identity,
        { runDir: dir, processDir: qemuDir, ramPath, disk: { path: path.join(dir, 'no-disk') }, openedFiles: [key.shape.guest.kernel, key.shape.guest.initramfs] },
        { egress: key.egress },
      );
      const launch = {
        shape: key.shape,
        cmdline: key.cmdline,
        ram: { path: path.join('..', 'mem'), share: true },
        disk: { path: '', format: 'qcow2' as const },
        diskLater: true,
        forwards: [],
        egress: key.egress,
        sockets: RELATIVE_SOCKETS,
        pidFile: 'qemu.pid',
        incoming: true,
        sandbox: setting('COCOON_QEMU_SANDBOX'),
      };
      const shim = setting('COCOON_QEMU_LISTEN_SHIM') ? await listenShim() : undefined;
      started = this.#startQemu(`pool-${path.basename(dir)}`, launch, dir, identity, key.limits, qemuDir, shim);
      const exited = started.exit.then(() => {
        throw new CocoonError('vm_start_failed', `a QEMU for the pool exited at its start: ${readLog(path.join(dir, 'qemu.log'))}`);
      });
      const socket = (name: string) => path.join(qemuDir, name);
      const giveUp = new AbortController();
      const connecting = Promise.all([
        QmpClient.connect(socket(RELATIVE_SOCKETS.qmp), { timeoutMs: 10_000, signal: giveUp.signal }),
        GuestChannel.connect(socket(RELATIVE_SOCKETS.guest), 10_000, giveUp.signal),
        connectUnix(socket(RELATIVE_SOCKETS.serial), 10_000, giveUp.signal),
      ]);
      let channels: [QmpClient, GuestChannel, net.Socket];
      try {
        channels = await Promise.race([connecting, exited]);
      } catch (error) {
        giveUp.abort(error);
        void connecting.then(([qmp, guest, serial]) => (qmp.close(), guest.close(), serial.destroy()), () => undefined);
        throw error;
      }
      const [qmp, guest, serialSocket] = channels;
      serialSocket.on('error', () => undefined);
      try {
        await Promise.race([listenForDeviceState(qmp, INCOMING_SOCKET), exited]);
      } catch (error) {
        qmp.close();
        guest.close();
        serialSocket.destroy();
        throw error;
      }
      const memory = this.#memory.get(keyString(key));
      const prefilled = memory ? await prefillRam(memory, ramPath) : undefined;
      return new PooledQemu({ dir, key, process: started, identity, qmp, guest, serialSocket, portBacklog: shim !== undefined ? SHIM_BACKLOG : 1, prefilled });
    } catch (error) {
      if (started) {
        started.child.ref();
        try {
          if (started.child.pid) process.kill(started.child.pid, 'SIGKILL');
        } catch {
          // gone already
        }
        await started.exit;
      }
      await fs.promises.rm(dir, { recursive: true, force: true });
      throw error;
    }
  }
}

/**
 * Copies the memory of `memory`'s snapshot into a waiting process's (empty) RAM file; answers
 * what it holds then, or undefined (nothing copied: a memory diff, a RAM file too big to keep
 * ahead, a file changed meanwhile or too fresh to be identified, no space) and the file empty.
 */
async function prefillRam(memory: PoolMemory, ramPath: string): Promise<PrefilledRam | undefined> {
  try {
    const manifest = await readSnapshotManifest(memory.snapshotDir);
    const sizeBytes = manifest.files.mem.sizeBytes;
    if (isMemoryDiff(manifest) || !reservesRam(sizeBytes)) return undefined;
    const file = path.join(memory.snapshotDir, manifest.files.mem.name);
    const identity = await identityBeforeReading(file);
    if (!identity) return undefined;
    // Never the last of the data directory's room: a copy ahead holds its blocks until taken.
    await assertRoomForRam(path.dirname(ramPath), PREFILL_ROOM_FACTOR * sizeBytes, 'memory copied ahead for the pool');
    await cloneRamFile(file, ramPath, { into: true });
    if ((await identityBeforeReading(file)) !== identity) throw new Error(`${file} changed while it was copied`);
    return { file, identity, sizeBytes };
  } catch (error) {
    releaseRam(ramPath);
    await fs.promises.truncate(ramPath, 0).catch(() => undefined);
    log.debug({ error: errorMessage(error) }, 'the pool copied no memory ahead for a process');
    return undefined;
  }
}

function readLog(file: string): string {
  try {
    return fs.readFileSync(file, 'utf8').trim().slice(-500);
  } catch {
    return '';
  }
}

/* ---- the process's pool ---- */

let active: QemuPool | undefined;

/** The pool restores take from, if one is open. */
export function activeQemuPool(): QemuPool | undefined {
  return active;
}

/**
 * Opens this process's pool in `root` (on the filesystem of the run directories: a process is
 * given its run directory by renames) with `COCOON_QEMU_POOL` processes at most (0: none, and
 * undefined is answered). One pool per process: a second open closes the first.
 */
export async function openQemuPool(root: string, startQemu: StartQemu, size = setting('COCOON_QEMU_POOL')): Promise<QemuPool | undefined> {
  await active?.close();
  active = undefined;
  if (size <= 0) return undefined;
  const pool = await QemuPool.open(root, size, startQemu);
  active = pool;
  return pool;
}

/** Closes this process's pool (if it is `pool`, when given). */
export async function closeQemuPool(pool?: QemuPool): Promise<void> {
  const closing = pool ?? active;
  if (!closing) return;
  if (active === closing) active = undefined;
  await closing.close();
}
