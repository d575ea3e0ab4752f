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
 */
import fs from 'node:fs';
import { CocoonError, errorMessage, isCocoonError } from '../common/errors.ts';
import { log as rootLog, type Logger } from '../common/log.ts';
import type { MicroVMDirectory, MicroVMRoute } from '../gateway/types.ts';
import { appendEvent } from '../store/events.ts';
import { callHttpHook, describeHttpHookOutcome } from '../guest/http-hooks.ts';
import { getImage, type ImageHooks, type HookName, type HttpHooks } from '../store/images.ts';
import {
  clearRunHookPayload,
  claimMicrovm,
  getMicrovm,
  getRunHookPayload,
  listHostMicrovms,
  touchMicrovmActivity,
  setMicrovmRuntimeIf,
  type Microvm,
} from '../store/microvms.ts';
import type { Db } from '../store/sql.ts';
import type { Vm, VmDriver } from '../vmm/driver.ts';
import { defaultVmDriver } from '../vmm/drivers.ts';
import { readSnapshotManifest } from '../vmm/snapshot.ts';
import { Activity } from './activity.ts';
import { applyMicrovmEvent } from './apply-event.ts';
import { liveRoute, storedRoute } from './directory.ts';
import { dataDirHostId } from './host-id.ts';
import { OperationQueue } from './queue.ts';
import { dueTimes, dueWithoutTimer, Scheduler, TERMINATION_REASONS, type DueTimes, type TimerKind } from './scheduler.ts';
import { generationDir, imageSnapshotDir, microvmDir, runDir, snapshotDirFor } from './paths.ts';
import { appendLog, clearRunFiles, collectGarbage, compactGeneration, diffGeneration, parseRuntime, runtimeRecord, type Runtime } from './storage.ts';
import { allows, targetState, transition, type MicrovmEvent, type MicrovmState } from './transitions.ts';

/** Points where crash tests stop the daemon (see `LifecycleOptions.pauseAt`). */
export type PausePoint =
  | 'launch:starting'
  | 'launch:restored'
  | 'suspend:persisted'
  | 'suspend:state-saved'
  | 'suspend:committed'
  | 'resume:persisted'
  | 'resume:restored'
  | 'terminate:persisted'
  | 'fork:paused'
  | 'fork:linked'
  | 'checkpoint:paused';

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
  /** Where the gateway reaches this host's forwarded guest ports (config `hostAddress`, default 127.0.0.1). */
  hostAddress?: string;
  /** How often the scheduler scans this host's rows for SUSPENDED microVMs due to end that no timer here covers (default 30 s; see `startDueScan`). */
  scanIntervalMs?: number;
  /** How often gateway activity is written to `lastActivityAt` (default 1000 ms). */
  activityFlushMs?: number;
  /** For crash tests: awaited at each point (a test makes it hang, then kills the process). */
  pauseAt?: (point: PausePoint, microvmId: string) => Promise<void>;
}

type Operation = 'launch' | 'suspend' | 'resume' | 'terminate' | 'fork' | 'checkpoint';

/** What a fork or checkpoint sees of its source while it holds the source's operation queue. */
export interface OperationSource {
  id: string;
  tenantId: string;
  imageId: string | null;
  state: MicrovmState;
  /** The running VM (state RUNNING), else undefined. */
  vm: Vm | undefined;
  runtime: Runtime;
}

interface Instance {
  readonly id: string;
  readonly tenantId: string;
  readonly imageId: string | null;
  state: MicrovmState;
  /** A termination was asked for: the gateway answers 410 from now on. */
  terminating: boolean;
  readonly appPort: number;
  /** false: its image has no app port (nothing forwarded for it; gateway HTTP → 409 no_app_port). */
  readonly hasAppPort: boolean;
  readonly autoResume: boolean;
  readonly maxIdleMs: number;
  readonly suspendedMs: number | null;
  readonly expiresAt: number;
  readonly egress: boolean;
  readonly hooks: ImageHooks;
  /** The image's AWS-style HTTP hooks (null: none). */
  readonly httpHooks: HttpHooks | null;
  runtime: Runtime;
  suspendedAt: number;
  vm: Vm | undefined;
  /** Guest port → host port of the running VM. */
  ports: Map<number, number>;
  /** The gateway's reports: requests and WebSockets in flight, the last traffic (activity.ts). */
  readonly activity: Activity;
  /** This microVM's operations, one at a time (queue.ts). */
  readonly ops: OperationQueue<Operation>;
}

export class LifecycleEngine implements MicroVMDirectory {
  readonly db: Db;
  readonly dataDir: string;
  readonly driver: VmDriver;
  readonly hostId: string;
  readonly #hostAddress: string;
  readonly #log: Logger;
  readonly #durable: boolean;
  readonly #maxChain: number;
  readonly #onStop: 'suspend' | 'leave';
  readonly #pauseAt: LifecycleOptions['pauseAt'];
  readonly #instances = new Map<string, Instance>();
  /** VMs this engine is stopping on purpose: their exit is no surprise. */
  readonly #stopping = new WeakSet<Vm>();
  readonly #activityTimer: NodeJS.Timeout;
  /** Idle, suspended-duration and session timers, due at times derived from the microVMs' rows. */
  readonly #scheduler = new Scheduler((microvmId, kind) => this.#due(microvmId, kind));
  readonly #scanIntervalMs: number;
  #scanTimer: NodeJS.Timeout | undefined;
  /** Told when a microVM's VM is about to stop (exec sessions end with this reason). */
  readonly #stopListeners = new Set<(microvmId: string, reason: 'suspended' | 'terminated' | 'failed') => void>();
  #closed = false;

  constructor(options: LifecycleOptions) {
    this.db = options.db;
    this.dataDir = options.dataDir;
    this.driver = options.driver ?? defaultVmDriver();
    this.hostId = options.hostId ?? dataDirHostId(options.dataDir);
    this.#hostAddress = options.hostAddress ?? '127.0.0.1';
    this.#log = (options.logger ?? rootLog).child({ component: 'lifecycle' });
    this.#durable = options.durable ?? true;
    this.#maxChain = options.maxDiskChain ?? 8;
    this.#onStop = options.onStop ?? 'suspend';
    this.#pauseAt = options.pauseAt;
    this.#activityTimer = setInterval(() => void this.#flushActivity(), options.activityFlushMs ?? 1000);
    this.#activityTimer.unref();
    this.#scanIntervalMs = options.scanIntervalMs ?? 30_000;
  }

  // ---- loading ------------------------------------------------------------------------------

  /** Starts managing a microVM the store knows (a new one, or one found at start-up). */
  async #load(microvm: Microvm): Promise<Instance> {
    const existing = this.#instances.get(microvm.id);
    if (existing) return existing;
    const image = microvm.imageId === null ? undefined : await getImage(this.db, microvm.imageId);
    const instance: Instance = {
      id: microvm.id,
      tenantId: microvm.tenantId,
      imageId: microvm.imageId,
      state: microvm.state,
      terminating: microvm.state === 'TERMINATING',
      appPort: microvm.port,
      hasAppPort: microvm.hasAppPort,
      autoResume: microvm.idlePolicy.autoResumeEnabled,
      maxIdleMs: microvm.idlePolicy.maxIdleDurationSeconds * 1000,
      suspendedMs: microvm.idlePolicy.suspendedDurationSeconds === null ? null : microvm.idlePolicy.suspendedDurationSeconds * 1000,
      expiresAt: Date.parse(microvm.expiresAt),
      egress: microvm.networkEgress,
      hooks: image?.hooks ?? {},
      httpHooks: image?.httpHooks ?? null,
      runtime: parseRuntime(microvm.runtime),
      suspendedAt: microvm.suspendedAt ? Date.parse(microvm.suspendedAt) : Date.now(),
      vm: undefined,
      ports: new Map(),
      activity: new Activity(Date.parse(microvm.lastActivityAt)),
      ops: new OperationQueue<Operation>(),
    };
    this.#instances.set(microvm.id, instance);
    this.#armExpiry(instance);
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
    void this.#enqueue(instance, 'launch', () => this.#launch(instance, verifyData)).catch(() => undefined);
  }

  // ---- the operation queue -------------------------------------------------------------------

  #enqueue<T>(instance: Instance, operation: Operation, fn: () => Promise<T>): Promise<T> {
    return instance.ops.run(operation, fn);
  }

  async #pause(point: PausePoint, id: string): Promise<void> {
    if (this.#pauseAt) await this.#pauseAt(point, id);
  }

  /** Applies an event of the transition table: compare-and-set in the store, then in memory. */
  async #transition(instance: Instance, event: MicrovmEvent, patch: { runtime?: Runtime; error?: string } = {}): Promise<boolean> {
    const to = targetState(event);
    const moved = await applyMicrovmEvent(this.db, instance.id, event, {
      ...(patch.runtime ? { runtime: runtimeRecord(patch.runtime) } : {}),
      ...(patch.error !== undefined ? { error: patch.error } : {}),
    });
    if (moved) {
      instance.state = to;
      if (patch.runtime) instance.runtime = patch.runtime;
      if (to === 'SUSPENDED') instance.suspendedAt = Date.now();
    } else {
      const current = await getMicrovm(this.db, instance.id);
      if (current) instance.state = current.state;
    }
    return moved;
  }

  async #event(instance: Instance, type: string, message: string, data?: Record<string, unknown>): Promise<void> {
    await appendEvent(this.db, { tenantId: instance.tenantId, resourceType: 'microvm', resourceId: instance.id, type, message, ...(data ? { data } : {}) });
  }

  // ---- operations ----------------------------------------------------------------------------

  async #forwards(snapshotDir: string, appPort: number | undefined, hooksPort: number | undefined): Promise<{ guestPort: number }[]> {
    const manifest = await readSnapshotManifest(snapshotDir);
    const ports = [...(appPort === undefined ? [] : [appPort]), ...(hooksPort === undefined ? [] : [hooksPort]), ...manifest.guestPorts];
    return [...new Set(ports)].map((guestPort) => ({ guestPort }));
  }

  async #restore(instance: Instance, snapshotDir: string, verifyData: boolean | 'if-present' = true): Promise<Vm> {
    const options = {
      id: instance.id,
      runDir: runDir(this.dataDir, instance.id),
      snapshotDir,
      verifyData,
      // A suspended generation's memory is a diff against the image's (storage.ts diffGeneration).
      ...(instance.imageId !== null ? { memoryBase: imageSnapshotDir(this.dataDir, instance.imageId) } : {}),
      network: {
        forwards: await this.#forwards(snapshotDir, instance.hasAppPort ? instance.appPort : undefined, instance.httpHooks?.port),
        egress: instance.egress,
      },
    };
    let vm: Vm;
    try {
      vm = await this.driver.restore(options);
    } catch (error) {
      // A free port picked for the forward can be taken by someone else before the VMM binds it: once more.
      if (!isCocoonError(error, 'port_in_use')) throw error;
      this.#log.warn({ microvm: instance.id }, 'a forwarded port was taken meanwhile; restoring again');
      vm = await this.driver.restore(options);
    }
    this.#attach(instance, vm);
    return vm;
  }

  #attach(instance: Instance, vm: Vm): void {
    instance.vm = vm;
    instance.ports = new Map(vm.hostPorts);
    void vm.waitForExit().then(() => this.#vmExited(instance, vm));
    // A guest paused by its VMM for lack of space on the data directory continues once there is room.
    vm.watchDiskSpace({
      path: runDir(this.dataDir, instance.id),
      onPaused: () => void appendLog(this.dataDir, instance.id, 'paused by its VMM: no space left on the data directory for its disk'),
      onContinued: () => void appendLog(this.dataDir, instance.id, 'continued: the data directory has space again'),
    });
  }

  /** A VM process ended that nobody asked to stop: the guest powered off or crashed. */
  #vmExited(instance: Instance, vm: Vm): void {
    if (this.#stopping.has(vm) || instance.vm !== vm || this.#closed) return;
    const console = vm.serialTail(10);
    void this.#enqueue(instance, 'terminate', async () => {
      if (instance.vm !== vm) return;
      await vm.kill();
      instance.vm = undefined;
      instance.ports = new Map();
      const reason = `the VM stopped unexpectedly (its workload exited or the guest crashed); last console lines:\n${console}`;
      await appendLog(this.dataDir, instance.id, 'the VM stopped unexpectedly');
      await this.#fail(instance, reason);
    }).catch((error: unknown) => this.#log.error({ err: error, microvm: instance.id }, 'handling a VM exit failed'));
  }

  async #fail(instance: Instance, reason: string): Promise<void> {
    this.#clearTimers(instance);
    this.#stopping_(instance.id, 'failed');
    if (instance.vm) {
      this.#stopping.add(instance.vm);
      await instance.vm.kill();
      instance.vm = undefined;
    }
    await this.driver.sweep(runDir(this.dataDir, instance.id));
    await this.#transition(instance, 'fail', { error: reason.slice(0, 2000) });
    await clearRunHookPayload(this.db, instance.id);
    await clearRunFiles(this.driver, this.dataDir, instance.id);
    this.#log.warn({ microvm: instance.id, reason }, 'microVM failed');
  }

  async #launch(instance: Instance, verifyData: boolean | 'if-present' = true): Promise<void> {
    if (!allows(instance.state, 'started') || instance.terminating) return;
    await this.#pause('launch:starting', instance.id);
    // Another host launched it meanwhile (several hosts on one store): not ours to run.
    if (!(await claimMicrovm(this.db, instance.id, this.hostId))) {
      this.#log.warn({ microvm: instance.id }, 'another host runs this microVM; not launching it here');
      this.#clearTimers(instance);
      this.#instances.delete(instance.id);
      return;
    }
    // A microVM starts from its image (generation 0), a fork from its own generation 1 (the
    // fork point): then its workload runs already, so it gets the resume hook, not run.
    const { generation, chain } = instance.runtime;
    let vm: Vm;
    try {
      vm = await this.#restore(instance, snapshotDirFor(this.dataDir, instance, generation), verifyData);
    } catch (error) {
      await this.#fail(instance, `the microVM could not start from ${generation === 0 ? 'its image' : 'its fork point'}: ${errorMessage(error)}`);
      throw error;
    }
    await this.#pause('launch:restored', instance.id);
    await this.#hook(instance, vm, generation === 0 ? 'run' : 'resume');
    const runtime: Runtime = { generation, chain, pid: vm.pid, ports: Object.fromEntries(vm.hostPorts) };
    if (!(await this.#transition(instance, 'started', { runtime }))) {
      await this.#discard(instance);
      return;
    }
    instance.activity.lastActivity = Date.now();
    this.#armIdle(instance);
    await appendLog(this.dataDir, instance.id, `started from ${generation === 0 ? 'its image' : 'its fork point'} (pid ${vm.pid})`);
  }

  /** Stops a VM that must not go on (its microVM moved on meanwhile), keeping the log. */
  async #discard(instance: Instance): Promise<void> {
    const vm = instance.vm;
    if (vm) {
      this.#stopping.add(vm);
      await vm.kill();
    }
    instance.vm = undefined;
    instance.ports = new Map();
    await clearRunFiles(this.driver, this.dataDir, instance.id);
  }

  /** Whether the idle policy says: suspend now. */
  #idle(instance: Instance): boolean {
    return instance.activity.idleFor(instance.maxIdleMs);
  }

  async #suspend(instance: Instance, reason: 'idle' | 'api' | 'shutdown'): Promise<void> {
    if (!allows(instance.state, 'suspend') || instance.terminating || !instance.vm) return;
    if (reason === 'idle' && !this.#idle(instance)) {
      this.#armIdle(instance);
      return;
    }
    // Decided: from here on the gateway sees SUSPENDING and holds new requests for the resume.
    instance.state = transition(instance.state, 'suspend');
    this.#clearIdle(instance);
    this.#stopping_(instance.id, 'suspended');
    let persisted: boolean;
    try {
      persisted = await this.#transition(instance, 'suspend');
    } catch (error) {
      // The store could not record the decision (its disk is full…): nothing happened, the
      // microVM stays RUNNING, in memory too (else the gateway would hold its requests forever).
      instance.state = 'RUNNING';
      this.#armIdle(instance);
      throw error;
    }
    if (!persisted) return;
    const vm = instance.vm;
    await this.#pause('suspend:persisted', instance.id);
    await this.#flushOne(instance);
    await this.#hook(instance, vm, 'suspend');
    const next = instance.runtime.generation + 1;
    const target = generationDir(this.dataDir, instance.id, next);
    // Anything at the target is an unreferenced leftover (an interrupted compaction).
    await fs.promises.rm(target, { recursive: true, force: true });
    this.#stopping.add(vm);
    const started = performance.now();
    try {
      await vm.snapshot(target, { durable: this.#durable, onStateSaved: () => this.#pause('suspend:state-saved', instance.id) });
    } catch (error) {
      if (isCocoonError(error) && error.code !== 'vm_gone' && error.details?.vmAlive === true && !vm.exited) {
        await this.#keepRunning(instance, vm, error);
        throw error;
      }
      instance.vm = undefined;
      const reason = `the microVM could not be suspended (its memory could not be saved): ${errorMessage(error)}`;
      await this.#fail(instance, reason);
      // The caller learns that the microVM is FAILED, not only what the VM layer saw.
      throw new CocoonError('microvm_failed', `microVM ${instance.id} has failed: ${reason}; earlier snapshots are untouched`, { status: 409, cause: error });
    }
    const snapshotMs = performance.now() - started;
    instance.vm = undefined;
    instance.ports = new Map();
    await this.#pause('suspend:committed', instance.id);
    const diff = await this.#diffGeneration(instance, next);
    const runtime: Runtime = { generation: next, chain: [...instance.runtime.chain, next] };
    if (!(await this.#transition(instance, 'suspended', { runtime }))) return;
    await appendLog(this.dataDir, instance.id, `suspended (${reason}) as generation ${next} in ${snapshotMs.toFixed(0)} ms${diff}`);
    await collectGarbage(this.dataDir, instance.id, instance.runtime);
    await this.#compactIfLong(instance);
    this.#armSuspended(instance);
  }

  /**
   * A suspend whose snapshot was abandoned while the VM lives on (a full data disk, a failed
   * fsync): nothing was committed and the previous generation is untouched, so the microVM
   * goes back to RUNNING, with its resume hook when its guest runs (one that QEMU had paused for
   * lack of space stays so until the space watcher continues it), and the error says why.
   */
  async #keepRunning(instance: Instance, vm: Vm, error: CocoonError): Promise<void> {
    this.#stopping.delete(vm);
    if (!(await this.#transition(instance, 'suspend_abandoned'))) return;
    await appendLog(this.dataDir, instance.id, `suspend abandoned, still running: ${error.message}`);
    this.#log.warn({ microvm: instance.id, code: error.code }, 'suspend abandoned; the microVM runs on');
    if (error.details?.vmRunning === true) await this.#hook(instance, vm, 'resume');
    instance.activity.lastActivity = Date.now();
    this.#armIdle(instance);
  }

  /** Keeps only the memory pages the generation changed from its image's (storage.ts); a failure leaves it whole. Answers a note for the log. */
  async #diffGeneration(instance: Instance, generation: number): Promise<string> {
    if (instance.imageId === null) return '';
    try {
      const diff = await diffGeneration(this.dataDir, instance.id, generation, imageSnapshotDir(this.dataDir, instance.imageId), this.#durable);
      return diff ? `, memory diff ${diff.diffPages} of ${diff.pages} pages in ${diff.compareMs.toFixed(0)} ms` : '';
    } catch (error) {
      this.#log.warn({ err: error, microvm: instance.id }, 'cannot keep only the changed memory pages; the generation stays whole');
      return '';
    }
  }

  async #compactIfLong(instance: Instance): Promise<void> {
    if (instance.runtime.chain.length <= this.#maxChain || instance.imageId === null) return;
    try {
      const runtime = await compactGeneration(this.driver, this.dataDir, instance.id, imageSnapshotDir(this.dataDir, instance.imageId), instance.runtime, this.#durable);
      if (await setMicrovmRuntimeIf(this.db, instance.id, 'SUSPENDED', runtimeRecord(runtime))) {
        instance.runtime = runtime;
        await collectGarbage(this.dataDir, instance.id, runtime);
      }
    } catch (error) {
      // Not fatal: the chain stays as it was and works, only longer.
      this.#log.warn({ err: error, microvm: instance.id }, 'folding disk layers failed');
    }
  }

  async #resume(instance: Instance, reason: 'request' | 'api'): Promise<void> {
    if (!allows(instance.state, 'resume') || instance.terminating) return;
    instance.state = transition(instance.state, 'resume');
    this.#clearSuspended(instance);
    if (!(await this.#transition(instance, 'resume'))) return;
    await this.#pause('resume:persisted', instance.id);
    const generation = instance.runtime.generation;
    const started = performance.now();
    let vm: Vm;
    try {
      vm = await this.#restore(instance, snapshotDirFor(this.dataDir, instance, generation));
    } catch (error) {
      if (isCocoonError(error, 'snapshot_corrupt') || isCocoonError(error, 'snapshot_not_found')) {
        await this.#fail(instance, `the microVM's saved state cannot be restored: ${errorMessage(error)}`);
      } else {
        // Generation `generation` is untouched: back to SUSPENDED, a later wake tries again.
        await this.#transition(instance, 'resume_failed');
        this.#armSuspended(instance);
      }
      throw new CocoonError('resume_failed', `microVM ${instance.id} could not be resumed: ${errorMessage(error)}`, { status: 503, cause: error });
    }
    await this.#hook(instance, vm, 'resume');
    await this.#pause('resume:restored', instance.id);
    const runtime: Runtime = { ...instance.runtime, pid: vm.pid, ports: Object.fromEntries(vm.hostPorts) };
    if (!(await this.#transition(instance, 'resumed', { runtime }))) {
      await this.#discard(instance);
      return;
    }
    instance.activity.lastActivity = Date.now();
    this.#armIdle(instance);
    await appendLog(this.dataDir, instance.id, `resumed (${reason}) from generation ${generation} in ${(performance.now() - started).toFixed(0)} ms (pid ${vm.pid})`);
  }

  async #terminate(instance: Instance, reason: string): Promise<void> {
    if (!allows(instance.state, 'terminate')) {
      // TERMINATED: nothing left. FAILED is final; terminating it only removes what is left of it.
      if (instance.state === 'FAILED') {
        this.#clearTimers(instance);
        await this.driver.sweep(microvmDir(this.dataDir, instance.id));
        await fs.promises.rm(microvmDir(this.dataDir, instance.id), { recursive: true, force: true });
        this.#instances.delete(instance.id);
      }
      return;
    }
    instance.terminating = true;
    this.#clearTimers(instance);
    this.#stopping_(instance.id, 'terminated');
    const wasRunning = instance.state === 'RUNNING';
    if (!(await this.#transition(instance, 'terminate'))) return;
    await this.#pause('terminate:persisted', instance.id);
    const vm = instance.vm;
    if (vm) {
      if (wasRunning) await this.#hook(instance, vm, 'terminate');
      this.#stopping.add(vm);
      await vm.kill();
      instance.vm = undefined;
      instance.ports = new Map();
    }
    await this.driver.sweep(microvmDir(this.dataDir, instance.id));
    await fs.promises.rm(microvmDir(this.dataDir, instance.id), { recursive: true, force: true });
    await this.#transition(instance, 'terminated');
    // A payload whose run hook was never sent (terminated while PENDING) is not kept either.
    await clearRunHookPayload(this.db, instance.id);
    await this.#event(instance, 'terminated', reason);
    this.#instances.delete(instance.id);
    this.#log.info({ microvm: instance.id, reason }, 'microVM terminated');
  }

  async #commandHook(instance: Instance, vm: Vm, name: HookName): Promise<void> {
    const hook = instance.hooks[name];
    if (!hook) return;
    const started = performance.now();
    let status: string;
    try {
      status = await vm.channel.runHook(name, hook.timeoutSeconds * 1000);
    } catch (error) {
      status = `error (${errorMessage(error)})`;
    }
    const ms = Math.round(performance.now() - started);
    const line = status === 'timeout' ? `hook ${name} timed out after ${hook.timeoutSeconds} s` : `hook ${name} ended: ${status} after ${ms} ms`;
    await appendLog(this.dataDir, instance.id, line);
    await this.#event(instance, 'hook', line, { hook: name, status, ms });
  }

  /** A lifecycle point: the image's command hook, then its HTTP hook (each within its timeout). */
  async #hook(instance: Instance, vm: Vm, name: HookName): Promise<void> {
    await this.#commandHook(instance, vm, name);
    await this.#httpHook(instance, vm, name);
  }

  /**
   * POST /aws/lambda-microvms/runtime/v1/<name> to the image's hooks port, within its timeout;
   * /run carries the launch's runHookPayload (read from the store, dropped once sent; never
   * logged). An answer other than 200, or none, is recorded; the operation goes on.
   */
  async #httpHook(instance: Instance, vm: Vm, name: HookName): Promise<void> {
    const hooks = instance.httpHooks;
    const hook = hooks?.[name];
    if (!hooks || !hook) return;
    let endpoint: { host: string; port: number };
    try {
      endpoint = vm.endpoint(hooks.port);
    } catch (error) {
      const line = `HTTP hook ${name} not sent: ${errorMessage(error)}`;
      await appendLog(this.dataDir, instance.id, line);
      await this.#event(instance, 'hook', line, { hook: name, kind: 'http', status: 'not_sent' });
      return;
    }
    const body = name === 'run' ? await getRunHookPayload(this.db, instance.id) : undefined;
    const outcome = await callHttpHook({ endpoint, name, timeoutMs: hook.timeoutSeconds * 1000, body, retryUnavailable: false });
    if (name === 'run') await clearRunHookPayload(this.db, instance.id);
    const line = describeHttpHookOutcome(name, outcome, hook.timeoutSeconds);
    const status = outcome.ok ? 200 : outcome.reason === 'status' ? outcome.status : outcome.reason;
    await appendLog(this.dataDir, instance.id, line);
    await this.#event(instance, 'hook', line, { hook: name, kind: 'http', status, ms: outcome.ms });
  }

  // ---- timers (the scheduler: scheduler.ts) -------------------------------------------------

  #dueTimes(instance: Instance): DueTimes {
    return dueTimes({
      state: instance.state,
      expiresAt: instance.expiresAt,
      suspendedAt: instance.suspendedAt,
      suspendedMs: instance.suspendedMs,
      lastActivity: instance.activity.lastActivity,
      maxIdleMs: instance.maxIdleMs,
    });
  }

  /** A timer fell due. */
  #due(microvmId: string, kind: TimerKind): void {
    const instance = this.#instances.get(microvmId);
    if (!instance || this.#closed) return;
    if (kind === 'idle') {
      if (!this.#idle(instance)) return this.#armIdle(instance);
      void this.#enqueue(instance, 'suspend', () => this.#suspend(instance, 'idle')).catch((error: unknown) =>
        this.#log.error({ err: error, microvm: instance.id }, 'idle suspend failed'),
      );
      return;
    }
    void this.terminate(instance.id, TERMINATION_REASONS[kind]).catch(() => undefined);
  }

  #armIdle(instance: Instance): void {
    this.#clearIdle(instance);
    if (this.#closed || instance.state !== 'RUNNING' || instance.terminating || instance.activity.busy) return;
    const due = this.#dueTimes(instance).idle;
    if (due !== null) this.#scheduler.set(instance.id, 'idle', due);
  }

  #clearIdle(instance: Instance): void {
    this.#scheduler.clear(instance.id, 'idle');
  }

  #armSuspended(instance: Instance): void {
    this.#clearSuspended(instance);
    if (this.#closed) return;
    const due = this.#dueTimes(instance).suspended;
    if (due !== null) this.#scheduler.set(instance.id, 'suspended', due);
  }

  #clearSuspended(instance: Instance): void {
    this.#scheduler.clear(instance.id, 'suspended');
  }

  #armExpiry(instance: Instance): void {
    if (this.#closed) return;
    this.#scheduler.set(instance.id, 'expiry', this.#dueTimes(instance).expiry);
  }

  #clearTimers(instance: Instance): void {
    this.#scheduler.clear(instance.id);
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
  onVmStopping(listener: (microvmId: string, reason: 'suspended' | 'terminated' | 'failed') => void): () => void {
    this.#stopListeners.add(listener);
    return () => this.#stopListeners.delete(listener);
  }

  #stopping_(microvmId: string, reason: 'suspended' | 'terminated' | 'failed'): void {
    for (const listener of this.#stopListeners) {
      try {
        listener(microvmId, reason);
      } catch (error) {
        this.#log.error({ err: error, microvm: microvmId }, 'a stop listener failed');
      }
    }
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
    this.#clearIdle(instance);
  }

  requestFinished(microvmId: string): void {
    const instance = this.#instances.get(microvmId);
    if (!instance) return;
    instance.activity.requestFinished();
    this.#armIdle(instance);
  }

  webSocketOpened(microvmId: string): void {
    const instance = this.#instances.get(microvmId);
    if (!instance) return;
    instance.activity.webSocketOpened();
    this.#clearIdle(instance);
  }

  webSocketClosed(microvmId: string): void {
    const instance = this.#instances.get(microvmId);
    if (!instance) return;
    instance.activity.webSocketClosed();
    this.#armIdle(instance);
  }

  async #flushOne(instance: Instance): Promise<void> {
    const at = instance.activity.takeDirty();
    if (at) await touchMicrovmActivity(this.db, instance.id, at);
  }

  async #flushActivity(): Promise<void> {
    for (const instance of this.#instances.values()) {
      try {
        await this.#flushOne(instance);
      } catch {
        // the store is closing; try again next time
      }
    }
  }

  // ---- the gateway's directory ------------------------------------------------------------------

  #route(instance: Instance): MicroVMRoute {
    return liveRoute(instance, this.#hostAddress, (guestPort) => this.#exposePort(instance, guestPort));
  }

  /**
   * Forwards a guest port that nothing forwards yet on the VM running now (the gateway asks,
   * for a port the request's token allows); null when the microVM does not run here now (a
   * request racing a suspend gets 404 and may retry) or the driver cannot forward at run time.
   */
  async #exposePort(instance: Instance, guestPort: number): Promise<number | null> {
    const vm = instance.vm;
    if (!vm?.forwardPort || instance.state !== 'RUNNING' || instance.terminating) return null;
    const endpoint = await vm.forwardPort(guestPort);
    if (instance.vm === vm) instance.ports.set(guestPort, endpoint.port);
    return endpoint.port;
  }

  lookup(microvmId: string): MicroVMRoute | null | Promise<MicroVMRoute | null> {
    const instance = this.#instances.get(microvmId);
    if (instance) return this.#route(instance);
    return getMicrovm(this.db, microvmId).then((microvm) => (microvm === undefined ? null : storedRoute(microvm, this.#hostAddress)));
  }

  async ensureRunning(microvmId: string, signal: AbortSignal): Promise<MicroVMRoute> {
    for (let round = 0; ; round++) {
      signal.throwIfAborted();
      const instance = this.#instances.get(microvmId);
      if (!instance) throw await this.#goneError(microvmId);
      if (instance.terminating) throw terminatedError(microvmId);
      switch (instance.state) {
        case 'RUNNING':
          if (instance.vm) return this.#route(instance);
          await instance.ops.settled;
          break;
        case 'SUSPENDED':
          if (!instance.autoResume) {
            throw new CocoonError('microvm_suspended', `microVM ${microvmId} is suspended and autoResumeEnabled is false: resume it with POST /api/v1/microvms/${microvmId}/resume`, { status: 409 });
          }
          await this.#enqueue(instance, 'resume', () => this.#resume(instance, 'request'));
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
    const instance = this.#require(microvmId);
    await instance.ops.settled;
    if (instance.state === 'FAILED') throw new CocoonError('microvm_failed', `microVM ${microvmId} has failed`, { status: 409 });
    await this.#enqueue(instance, 'suspend', () => this.#suspend(instance, 'api'));
  }

  /** Resumes a SUSPENDED microVM (whatever autoResumeEnabled says); no-op when RUNNING. */
  async resume(microvmId: string): Promise<void> {
    const instance = this.#require(microvmId);
    await instance.ops.settled;
    if (instance.state === 'FAILED') throw new CocoonError('microvm_failed', `microVM ${microvmId} has failed`, { status: 409 });
    await this.#enqueue(instance, 'resume', () => this.#resume(instance, 'api'));
  }

  /** Terminates whatever the state; resolves once its files are gone. No-op for unknown or ended microVMs. */
  async terminate(microvmId: string, reason = 'terminated through the API'): Promise<void> {
    const instance = this.#instances.get(microvmId);
    if (!instance) return;
    instance.terminating = true;
    this.#clearTimers(instance);
    await this.#enqueue(instance, 'terminate', () => this.#terminate(instance, reason));
  }

  /**
   * Runs `fn` as an operation of a microVM (after those queued before it; none of its others
   * run meanwhile), once it has settled: forks and checkpoints take their snapshot this way.
   */
  async exclusive<T>(microvmId: string, operation: 'fork' | 'checkpoint', fn: (source: OperationSource) => Promise<T>): Promise<T> {
    const instance = this.#require(microvmId);
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
    return this.#pause(point, microvmId);
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

  #require(microvmId: string): Instance {
    const instance = this.#instances.get(microvmId);
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
    if (vm) this.#attach(instance, vm);
    if (instance.state === 'RUNNING') {
      instance.activity.lastActivity = Math.max(instance.activity.lastActivity, Date.now() - instance.maxIdleMs / 2);
      this.#armIdle(instance);
    }
    if (instance.state === 'SUSPENDED') this.#armSuspended(instance);
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
    clearInterval(this.#activityTimer);
    if (this.#scanTimer) clearInterval(this.#scanTimer);
    this.#scheduler.close();
    const instances = [...this.#instances.values()];
    await Promise.all(instances.map((instance) => instance.ops.settled));
    await this.#flushActivity();
    for (const instance of instances) {
      if (instance.state !== 'RUNNING' || !instance.vm) continue;
      if (this.#onStop === 'suspend') {
        await this.#enqueue(instance, 'suspend', () => this.#suspend(instance, 'shutdown')).catch((error: unknown) =>
          this.#log.error({ err: error, microvm: instance.id }, 'suspend at shutdown failed'),
        );
      } else {
        this.#stopping.add(instance.vm);
        instance.vm.detach();
      }
    }
    this.#instances.clear();
  }
}

function terminatedError(microvmId: string, status = 410): CocoonError {
  return new CocoonError('microvm_terminated', `microVM ${microvmId} has been terminated`, { status });
}
