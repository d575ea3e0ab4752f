/**
 * The lifecycle: one state machine per microVM, and the gateway's directory of microVMs.
 *
 *   PENDING → RUNNING ⇄ (SUSPENDING → SUSPENDED → RESUMING) → … → TERMINATING → TERMINATED,
 *   and FAILED with a reason.
 *
 * Rules that make it crash-safe (see docs/microvms.md):
 * - Every transition is written to the store (compare-and-set) before its side effects; the
 *   in-memory state follows the store, except that a decision to suspend or terminate is visible
 *   to the gateway at once (synchronously), so that no request slips into a VM being stopped.
 * - Operations on one microVM run one at a time (a per-microVM queue); different microVMs are
 *   independent.
 * - Memory and disk are one pair: a suspend commits both as a new snapshot generation (an
 *   atomic directory rename) before the store says SUSPENDED; a resumed VM writes to a new disk
 *   layer, and the generation it came from stays untouched until the next suspend commits.
 * - `recover()` (at start) finishes or rolls back whatever a killed daemon left in flight.
 *
 * This file is the facade: the microVMs this process manages (instance.ts), the API's
 * operations queued per microVM, the gateway's directory and activity reports, timers falling
 * due, start and stop. What an operation does on this host is the executor's (executor.ts, on
 * the VM driver interface), the image's hooks are hooks.ts, the timers timers.ts.
 */
import { CocoonError } from '../common/errors.ts';
import { log as rootLog, type Logger } from '../common/log.ts';
import type { MicroVMDirectory, MicroVMRoute } from '../gateway/types.ts';
import { getMicrovm, listHostMicrovms, transitionMicrovm, type Microvm } from '../store/microvms.ts';
import type { SnapshotStore } from '../snapshots/snapshot-store.ts';
import type { Db } from '../store/sql.ts';
import type { Vm, VmDriver } from '../vmm/driver.ts';
import { PhaseClock, type Phases } from '../vmm/phases.ts';
import { defaultVmDriver } from '../vmm/drivers.ts';
import { liveRoute, storedRoute } from './directory.ts';
import { SharedSnapshots } from './shared-snapshots.ts';
import { HostExecutor } from './executor.ts';
import type { MicrovmRuntime } from './service.ts';
import { dataDirHostId } from './host-id.ts';
import { vmPoolDir } from './paths.ts';
import { ownableMicrovm } from './ownership.ts';
import { loadInstance, type Instance, type Operation, type OperationSource, type PauseHook, type PausePoint } from './instance.ts';
import { StopListeners, type StopListener } from './stop-listeners.ts';
import { dueWithoutTimer, TERMINATION_REASONS, type TimerKind } from './scheduler.ts';
import { LifecycleTimers } from './timers.ts';
import type { MicrovmState } from './transitions.ts';

export type { OperationSource, PausePoint } from './instance.ts';

/**
 * A resume's steps in milliseconds (phases.ts), from the wake's start in the engine (a gateway
 * request's `ensureRunning`, or the API's `resume`) to the microVM answered RUNNING: `queue`,
 * `space_check`, `lease` (a cluster), `store_resuming`, `fetch` (a cluster), the VM's `vm_*`,
 * `restore_rest`, `resume_hook`, `store_running`, `log`, then `wake_return` (to the caller).
 */
export type ResumePhasesObserver = (microvmId: string, reason: 'request' | 'api', phases: Readonly<Phases>) => void;

export interface LifecycleOptions {
  db: Db;
  /** The VMM that runs this host's microVMs (default: src/vmm/drivers.ts). */
  driver?: VmDriver;
  dataDir: string;
  logger?: Logger;
  /** fsync snapshots (default true: a suspended microVM survives a host crash). */
  durable?: boolean;
  /** Fold disk layers into one once a microVM's chain is longer than this (default 8). */
  maxDiskChain?: number;
  /** What a graceful stop does with RUNNING microVMs: suspend them (default) or leave them running for the next start to adopt. */
  onStop?: 'suspend' | 'leave';
  /** This host's identity (config `hostId`): the microVMs it launches are claimed for it. Default: the id kept in `dataDir` (host-id.ts). */
  hostId?: string;
  /**
   * Hosts share the database (a cluster, docs/cluster.md): launch and resume acquire the
   * microVM's lease first, state writes carry its epoch, and a microVM this process does not
   * hold is loaded on demand when no live host runs it (ownership.ts). Default false: one host.
   */
  leases?: boolean;
  /** Where the gateway reaches this host's forwarded guest ports (config `hostAddress`, default 127.0.0.1). */
  hostAddress?: string;
  /** How often the scheduler scans this host's rows for SUSPENDED microVMs due to end that no timer here covers (default 30 s; see `startDueScan`). */
  scanIntervalMs?: number;
  /** How often gateway activity is written to `lastActivityAt` (default 1000 ms). */
  activityFlushMs?: number;
  /** For crash tests: awaited at each point (a test makes it hang, then kills the process). */
  pauseAt?: PauseHook;
  /**
   * For benchmarks: told where each resume's time went, step by step (executor.ts `resume`),
   * once the microVM runs again. Without it no clock is kept.
   */
  onResumePhases?: ResumePhasesObserver;
  /** In a cluster: snapshots are committed to and fetched from the object store (shared-snapshots.ts). */
  snapshots?: SnapshotStore | undefined;
}

/** The facade: the gateway's directory and the runtime exec sessions use; `MicrovmService` on top of it is service.ts. */
export class LifecycleEngine implements MicroVMDirectory, MicrovmRuntime {
  readonly db: Db;
  readonly dataDir: string;
  readonly driver: VmDriver;
  readonly hostId: string;
  readonly #leases: boolean;
  readonly #hostAddress: string;
  readonly #log: Logger;
  readonly #durable: boolean;
  readonly #onStop: 'suspend' | 'leave';
  readonly #instances = new Map<string, Instance>();
  readonly #activityTimer: NodeJS.Timeout;
  /** Idle, suspended-duration and session timers, due at times derived from the microVMs' rows. */
  readonly #timers = new LifecycleTimers((microvmId, kind) => this.#due(microvmId, kind));
  /** What the operations do on this host (launch, suspend, resume, terminate…). */
  readonly #executor: HostExecutor;
  /** Told when a microVM's VM is about to stop (exec sessions end with this reason). */
  readonly #stopListeners: StopListeners;
  readonly #scanIntervalMs: number;
  /** In a cluster: this host's view of the snapshots in the object store (recovery uses it too). */
  readonly shared: SharedSnapshots | undefined;
  #scanTimer: NodeJS.Timeout | undefined;
  readonly #onResumePhases: ResumePhasesObserver | undefined;
  /** MicroVMs whose VM `fenceAll` stopped, with the lease epoch held then (`settleFenced`). */
  readonly #fenced: Array<{ id: string; epoch: number }> = [];
  #closed = false;
  readonly #pool: Promise<{ close(): Promise<void> } | undefined>;

  constructor(options: LifecycleOptions) {
    this.db = options.db;
    this.dataDir = options.dataDir;
    this.driver = options.driver ?? defaultVmDriver();
    this.hostId = options.hostId ?? dataDirHostId(options.dataDir);
    this.#leases = options.leases ?? false;
    this.#hostAddress = options.hostAddress ?? '127.0.0.1';
    this.#log = (options.logger ?? rootLog).child({ component: 'lifecycle' });
    this.#durable = options.durable ?? true;
    this.#onStop = options.onStop ?? 'suspend';
    this.#stopListeners = new StopListeners(this.#log);
    this.shared = options.snapshots ? new SharedSnapshots(options.snapshots, this.dataDir) : undefined;
    this.#executor = new HostExecutor({
      shared: this.shared,
      db: this.db,
      dataDir: this.dataDir,
      driver: this.driver,
      hostId: this.hostId,
      leases: this.#leases,
      log: this.#log,
      durable: this.#durable,
      maxDiskChain: options.maxDiskChain ?? 8,
      pauseAt: options.pauseAt,
      timers: this.#timers,
      forget: (microvmId) => this.#instances.delete(microvmId),
      notifyStopping: (microvmId, reason) => this.#stopListeners.notify(microvmId, reason),
    });
    this.#activityTimer = setInterval(() => void this.#flushActivity(), options.activityFlushMs ?? 1000);
    this.#activityTimer.unref();
    this.#scanIntervalMs = options.scanIntervalMs ?? 30_000;
    this.#onResumePhases = options.onResumePhases;
    // VM processes started ahead make restores and resumes faster (issue 12); opened in the
    // background: a restore before it is open starts its own.
    this.#pool = (this.driver.openPool?.(vmPoolDir(this.dataDir)) ?? Promise.resolve(undefined)).catch((error: unknown) => {
      this.#log.warn({ err: error }, 'the pool of VM processes started ahead could not be opened; restores start their own');
      return undefined;
    });
  }

  // ---- loading ------------------------------------------------------------------------------

  /** Starts managing a microVM the store knows (a new one, or one found at start-up). */
  async #load(microvm: Microvm): Promise<Instance> {
    const existing = this.#instances.get(microvm.id);
    if (existing) return existing;
    const instance = await loadInstance(this.db, microvm, { leases: this.#leases, hostId: this.hostId });
    this.#instances.set(microvm.id, instance);
    this.#timers.armExpiry(instance);
    return instance;
  }

  /**
   * A microVM just created in the store (PENDING): launch it in the background. `verifyData`:
   * how its snapshot's data is checked (default: always; a fork whose fork point was taken
   * moments ago by this process: not at all, its checksums come later).
   */
  async launch(microvm: Microvm, options: { verifyData?: boolean | 'if-present' } = {}): Promise<void> {
    const instance = await this.#load(microvm);
    const verifyData = options.verifyData ?? (instance.runtime.generation > 0 ? 'if-present' : true);
    void this.#enqueue(instance, 'launch', () => this.#executor.launch(instance, verifyData)).catch(() => undefined);
  }

  /**
   * In a cluster: the instance of a microVM this process does not hold yet, loaded from the store
   * when no live host runs it (made ownerless by a host's loss, say); throws
   * `microvm_on_other_host` when one does. With one host: only what it holds.
   */
  async #instanceOrLoad(microvmId: string): Promise<Instance | undefined> {
    const held = this.#instances.get(microvmId);
    if (held || !this.#leases || this.#closed) return held;
    const microvm = await ownableMicrovm(this.db, microvmId, this.hostId);
    if (microvm?.state !== 'SUSPENDED') return undefined;
    return this.#load(microvm);
  }

  /**
   * This host lost its leases (declared dead by another host, or it fenced itself after its
   * heartbeats stopped reaching the database): every VM it runs stops, and it forgets every
   * microVM; a later request loads what it may run again (cluster only).
   */
  async fenceAll(): Promise<void> {
    const instances = [...this.#instances.values()];
    for (const instance of instances) {
      this.#timers.clear(instance);
      if (instance.vm && instance.leaseEpoch !== undefined) this.#fenced.push({ id: instance.id, epoch: instance.leaseEpoch });
    }
    await this.#executor.fence(instances);
  }

  /**
   * After `fenceAll`, once this host reaches the database again: the microVMs whose VM it
   * stopped and whose lease it still holds (no other host declared it dead meanwhile) end
   * FAILED with `host_lost`, since their memory is gone; those another host settled already
   * are left alone (the epoch fences the write).
   */
  async settleFenced(): Promise<void> {
    const fenced = this.#fenced.splice(0);
    for (const { id, epoch } of fenced) {
      await transitionMicrovm(this.db, id, ['PENDING', 'RUNNING', 'RESUMING', 'SUSPENDING'], 'FAILED', {
        leaseEpoch: epoch,
        error: `host_lost: host ${this.hostId} could not reach the database for too long and stopped the microVM's VM before another host could take it over; its memory is lost`,
      });
    }
  }

  #enqueue<T>(instance: Instance, operation: Operation, fn: () => Promise<T>): Promise<T> {
    return instance.ops.run(operation, fn);
  }

  // ---- timers (timers.ts, scheduler.ts) -------------------------------------------------------

  /** A timer fell due. */
  #due(microvmId: string, kind: TimerKind): void {
    const instance = this.#instances.get(microvmId);
    if (!instance || this.#closed) return;
    if (kind === 'idle') {
      if (!this.#executor.isIdle(instance)) return this.#timers.armIdle(instance);
      void this.#enqueue(instance, 'suspend', () => this.#executor.suspend(instance, 'idle')).catch((error: unknown) =>
        this.#log.error({ err: error, microvm: instance.id }, 'idle suspend failed'),
      );
      return;
    }
    void this.terminate(instance.id, TERMINATION_REASONS[kind]).catch(() => undefined);
  }

  /**
   * Starts the periodic scan of this host's rows (recovery starts it once it has loaded them):
   * a SUSPENDED microVM of this host whose session or suspended duration ended, and that this
   * process has no timer for, is loaded and terminated (it needs no VM for that).
   */
  startDueScan(): void {
    if (this.#closed || this.#scanTimer) return;
    this.#scanTimer = setInterval(() => void this.scanDue().catch((error: unknown) => this.#log.warn({ err: error }, 'scanning for due microVMs failed')), this.#scanIntervalMs);
    this.#scanTimer.unref();
  }

  /** One scan (see `startDueScan`); answers the ids it started terminating. */
  async scanDue(now = Date.now()): Promise<string[]> {
    if (this.#closed) return [];
    const rows = (await listHostMicrovms(this.db, this.hostId, ['SUSPENDED'])).filter((m) => m.hostId === this.hostId);
    const ended: string[] = [];
    for (const { microvm, kind } of dueWithoutTimer(rows, now, (id) => this.#instances.has(id))) {
      await this.#load(microvm);
      ended.push(microvm.id);
      void this.terminate(microvm.id, TERMINATION_REASONS[kind]).catch(() => undefined);
    }
    return ended;
  }

  // ---- sessions inside the guest (src/exec/) ------------------------------------------------------

  /** Listens for microVMs whose VM is about to stop; returns the unsubscribe function. */
  onVmStopping(listener: StopListener): () => void {
    return this.#stopListeners.add(listener);
  }

  /** The guest agent's socket of a RUNNING microVM's VM (undefined when it has none running). */
  agentSocketPath(microvmId: string): string | undefined {
    return this.#instances.get(microvmId)?.vm?.agentSocketPath;
  }

  // ---- activity (the gateway's reports) --------------------------------------------------------

  requestStarted(microvmId: string): void {
    const instance = this.#instances.get(microvmId);
    if (!instance) return;
    instance.activity.requestStarted();
    this.#timers.clearIdle(instance);
  }

  requestFinished(microvmId: string): void {
    const instance = this.#instances.get(microvmId);
    if (!instance) return;
    instance.activity.requestFinished();
    this.#timers.armIdle(instance);
  }

  webSocketOpened(microvmId: string): void {
    const instance = this.#instances.get(microvmId);
    if (!instance) return;
    instance.activity.webSocketOpened();
    this.#timers.clearIdle(instance);
  }

  webSocketClosed(microvmId: string): void {
    const instance = this.#instances.get(microvmId);
    if (!instance) return;
    instance.activity.webSocketClosed();
    this.#timers.armIdle(instance);
  }

  async #flushActivity(): Promise<void> {
    for (const instance of this.#instances.values()) {
      try {
        await this.#executor.flushActivity(instance);
      } catch {
        // the store is closing; try again next time
      }
    }
  }

  // ---- the gateway's directory ------------------------------------------------------------------

  #route(instance: Instance): MicroVMRoute {
    return liveRoute(instance, this.#hostAddress, (guestPort) => this.#executor.exposePort(instance, guestPort));
  }

  lookup(microvmId: string): MicroVMRoute | null | Promise<MicroVMRoute | null> {
    const instance = this.#instances.get(microvmId);
    if (instance) return this.#route(instance);
    return getMicrovm(this.db, microvmId).then((microvm) => (microvm === undefined ? null : storedRoute(microvm, this.#hostAddress)));
  }

  async ensureRunning(microvmId: string, signal: AbortSignal): Promise<MicroVMRoute> {
    const clock = this.#onResumePhases ? new PhaseClock() : undefined;
    let resumed = false;
    for (let round = 0; ; round++) {
      signal.throwIfAborted();
      const instance = await this.#instanceOrLoad(microvmId);
      if (!instance) throw await this.#goneError(microvmId);
      if (instance.terminating) throw terminatedError(microvmId);
      switch (instance.state) {
        case 'RUNNING':
          if (instance.vm) {
            if (resumed) this.#reportResume(microvmId, 'request', clock);
            return this.#route(instance);
          }
          await instance.ops.settled;
          break;
        case 'SUSPENDED':
          if (!instance.autoResume) {
            throw new CocoonError('microvm_suspended', `microVM ${microvmId} is suspended and autoResumeEnabled is false: resume it with POST /api/v1/microvms/${microvmId}/resume`, { status: 409 });
          }
          resumed = (await this.#enqueue(instance, 'resume', () => this.#executor.resume(instance, 'request', clock))) || resumed;
          break;
        case 'TERMINATING':
        case 'TERMINATED':
          throw terminatedError(microvmId);
        case 'FAILED':
          throw new CocoonError('microvm_failed', `microVM ${microvmId} has failed; see its state through the API`, { status: 502 });
        default:
          // PENDING, RESUMING, SUSPENDING: wait for the operation in flight.
          await instance.ops.settled;
      }
      if (round > 20) throw new CocoonError('wake_failed', `microVM ${microvmId} did not settle`, { status: 503 });
    }
  }

  async #goneError(microvmId: string): Promise<CocoonError> {
    const microvm = await getMicrovm(this.db, microvmId);
    if (microvm === undefined) return new CocoonError('microvm_not_found', `microVM ${microvmId} does not exist`, { status: 404 });
    if (microvm.state === 'FAILED') return new CocoonError('microvm_failed', `microVM ${microvmId} has failed`, { status: 502 });
    return terminatedError(microvmId);
  }

  // ---- the API's operations ---------------------------------------------------------------------

  /** Suspends a RUNNING microVM (waits out PENDING/RESUMING first); no-op when already SUSPENDED. */
  async suspend(microvmId: string): Promise<void> {
    const instance = await this.#require(microvmId);
    await instance.ops.settled;
    if (instance.state === 'FAILED') throw new CocoonError('microvm_failed', `microVM ${microvmId} has failed`, { status: 409 });
    await this.#enqueue(instance, 'suspend', () => this.#executor.suspend(instance, 'api'));
  }

  /** Resumes a SUSPENDED microVM (whatever autoResumeEnabled says); no-op when RUNNING. */
  async resume(microvmId: string): Promise<void> {
    const clock = this.#onResumePhases ? new PhaseClock() : undefined;
    const instance = await this.#require(microvmId);
    await instance.ops.settled;
    if (instance.state === 'FAILED') throw new CocoonError('microvm_failed', `microVM ${microvmId} has failed`, { status: 409 });
    if (await this.#enqueue(instance, 'resume', () => this.#executor.resume(instance, 'api', clock))) this.#reportResume(microvmId, 'api', clock);
  }

  /** Hands a finished resume's phases to the observer (benchmarks); an observer's error is only logged. */
  #reportResume(microvmId: string, reason: 'request' | 'api', clock: PhaseClock | undefined): void {
    if (!clock || !this.#onResumePhases) return;
    clock.mark('wake_return');
    try {
      this.#onResumePhases(microvmId, reason, clock.phases);
    } catch (error) {
      this.#log.warn({ err: error, microvm: microvmId }, 'the resume phases observer failed');
    }
  }

  /** Terminates whatever the state; resolves once its files are gone. No-op for unknown or ended microVMs. */
  async terminate(microvmId: string, reason = 'terminated through the API'): Promise<void> {
    const instance = await this.#instanceOrLoad(microvmId);
    if (!instance) return;
    instance.terminating = true;
    this.#timers.clear(instance);
    await this.#enqueue(instance, 'terminate', () => this.#executor.terminate(instance, reason));
  }

  /**
   * Runs `fn` as an operation of a microVM (after those queued before it; none of its others
   * run meanwhile), once it has settled: forks and checkpoints take their snapshot this way.
   */
  async exclusive<T>(microvmId: string, operation: 'fork' | 'checkpoint', fn: (source: OperationSource) => Promise<T>): Promise<T> {
    const instance = await this.#require(microvmId);
    return this.#enqueue(instance, operation, async () => {
      if (instance.terminating) throw terminatedError(microvmId, 409);
      return fn({
        id: instance.id,
        tenantId: instance.tenantId,
        imageId: instance.imageId,
        state: instance.state,
        vm: instance.state === 'RUNNING' ? instance.vm : undefined,
        runtime: instance.runtime,
      });
    });
  }

  /** Awaited at a crash test's pause point (forks and checkpoints have theirs). */
  pausePoint(point: PausePoint, microvmId: string): Promise<void> {
    return this.#executor.pause(point, microvmId);
  }

  /** Resolves once the operations queued for a microVM so far are done (e.g. a fork's launch). */
  async settled(microvmId: string): Promise<MicrovmState | undefined> {
    const instance = this.#instances.get(microvmId);
    if (!instance) return (await getMicrovm(this.db, microvmId))?.state;
    await instance.ops.settled;
    return instance.state;
  }

  /** Whether snapshots are fsynced (forks and checkpoints follow the lifecycle's choice). */
  get durable(): boolean {
    return this.#durable;
  }

  async #require(microvmId: string): Promise<Instance> {
    const instance = await this.#instanceOrLoad(microvmId);
    if (!instance || instance.terminating) throw terminatedError(microvmId, 409);
    return instance;
  }

  /** What is known in memory about a microVM (for tests and the API: in-flight counts, operation). */
  inspect(microvmId: string): { state: MicrovmState; inFlight: number; webSockets: number; busy: Operation | undefined; pid: number | undefined } | undefined {
    const instance = this.#instances.get(microvmId);
    return instance && { state: instance.state, inFlight: instance.activity.inFlight, webSockets: instance.activity.webSockets, busy: instance.ops.busy, pid: instance.vm?.pid };
  }

  // ---- start and stop --------------------------------------------------------------------------

  /** Used by recovery (recovery.ts): registers an instance, with the VM it adopted if any (PENDING ones are then `launch`ed). */
  async adoptLoaded(microvm: Microvm, vm: Vm | undefined): Promise<void> {
    const instance = await this.#load(microvm);
    if (vm) this.#executor.attach(instance, vm);
    if (instance.state === 'RUNNING') {
      instance.activity.lastActivity = Math.max(instance.activity.lastActivity, Date.now() - instance.maxIdleMs / 2);
      this.#timers.armIdle(instance);
    }
    if (instance.state === 'SUSPENDED') this.#timers.armSuspended(instance);
    // A PENDING microVM is launched by recovery (`launch`) once it has swept orphaned QEMUs:
    // launched here, its new QEMU could be taken for an orphan and killed.
  }

  get instanceCount(): number {
    return this.#instances.size;
  }

  /** Stops timers; suspends RUNNING microVMs (or leaves them running for the next start to adopt). */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#executor.close();
    clearInterval(this.#activityTimer);
    if (this.#scanTimer) clearInterval(this.#scanTimer);
    this.#timers.close();
    const instances = [...this.#instances.values()];
    await Promise.all(instances.map((instance) => instance.ops.settled));
    await this.#flushActivity();
    for (const instance of instances) {
      if (instance.state !== 'RUNNING' || !instance.vm) continue;
      if (this.#onStop === 'suspend') {
        await this.#enqueue(instance, 'suspend', () => this.#executor.suspend(instance, 'shutdown')).catch((error: unknown) =>
          this.#log.error({ err: error, microvm: instance.id }, 'suspend at shutdown failed'),
        );
      } else {
        this.#executor.leaveRunning(instance);
      }
    }
    this.#instances.clear();
    await (await this.#pool)?.close().catch((error: unknown) => this.#log.error({ err: error }, 'closing the pool of VM processes failed'));
    // The suspends above answered before their QEMUs were gone; a server that exits now
    // (process.exit after close) would leave them dying behind it.
    await this.driver.exitsSettled();
  }
}

function terminatedError(microvmId: string, status = 410): CocoonError {
  return new CocoonError('microvm_terminated', `microVM ${microvmId} has been terminated`, { status });
}
