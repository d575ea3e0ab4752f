/**
 * The per-host executor: what a lifecycle operation does to a microVM on this host, through the
 * VM driver interface only (src/vmm/driver.ts): launch (restore from the image or fork point),
 * suspend (snapshot as a new generation), resume, terminate, fail; the image's hooks at each
 * point (hooks.ts); ports exposed at run time; a VM that exits on its own.
 *
 * Every transition is written to the store (compare-and-set, apply-event.ts) before its side
 * effects; the in-memory state follows the store, except that a decision to suspend is visible
 * to the gateway at once. Callers (the facade, engine.ts) run each operation inside the
 * microVM's operation queue (`instance.ops`), so one microVM's operations never overlap.
 */
import fs from 'node:fs';
import { CocoonError, errorMessage, isCocoonError } from '../common/errors.ts';
import type { Logger } from '../common/log.ts';
import type { HookName } from '../store/images.ts';
import { holdsMicrovmLease } from '../store/leases.ts';
import { claimMicrovm, clearRunHookPayload, getMicrovm, setMicrovmRuntimeIf, touchMicrovmActivity } from '../store/microvms.ts';
import type { Db } from '../store/sql.ts';
import type { Vm, VmDriver } from '../vmm/driver.ts';
import type { PhaseClock } from '../vmm/phases.ts';
import { readSnapshotManifest } from '../vmm/snapshot.ts';
import { applyInstanceEvent } from './apply-event.ts';
import { runHooks } from './hooks.ts';
import type { SharedSnapshots } from './shared-snapshots.ts';
import { appendInstanceEvent, type Instance, type PauseHook, type PausePoint, type StopReason } from './instance.ts';
import { acquireLease } from './ownership.ts';
import { generationDir, imageSnapshotDir, microvmDir, runDir, snapshotDirFor } from './paths.ts';
import { assertRoomToResume } from './space-check.ts';
import { appendLog, clearRunFiles, collectGarbage, compactGeneration, diffGeneration, runtimeRecord, type Runtime } from './storage.ts';
import type { LifecycleTimers } from './timers.ts';
import { allows, transition, type MicrovmEvent } from './transitions.ts';

export interface ExecutorOptions {
  db: Db;
  dataDir: string;
  driver: VmDriver;
  /** The microVMs this executor launches are claimed for this host. */
  hostId: string;
  /** Hosts share the database (a cluster): launch and resume acquire the microVM's lease, writes carry its epoch (ownership.ts). */
  leases: boolean;
  log: Logger;
  /** fsync snapshots. */
  durable: boolean;
  /** Fold disk layers into one once a microVM's chain is longer than this. */
  maxDiskChain: number;
  pauseAt: PauseHook | undefined;
  /** The facade's timers: armed and cleared as a microVM moves. */
  timers: LifecycleTimers;
  /** The microVM is no longer managed here (terminated, or another host's): the facade drops it. */
  forget: (microvmId: string) => void;
  /** A microVM's VM is about to stop (exec sessions end with this reason). */
  notifyStopping: (microvmId: string, reason: StopReason) => void;
  /** In a cluster: snapshots committed to and fetched from the object store; undefined on one host. */
  shared?: SharedSnapshots | undefined;
}

export class HostExecutor {
  readonly #db: Db;
  readonly #dataDir: string;
  readonly #driver: VmDriver;
  readonly #hostId: string;
  readonly #leases: boolean;
  readonly #log: Logger;
  readonly #durable: boolean;
  readonly #maxChain: number;
  readonly #pauseAt: PauseHook | undefined;
  readonly #timers: LifecycleTimers;
  readonly #forget: (microvmId: string) => void;
  /** VMs this executor is stopping on purpose: their exit is no surprise. */
  readonly #stopping = new WeakSet<Vm>();
  readonly #notifyStopping: (microvmId: string, reason: StopReason) => void;
  readonly #shared: SharedSnapshots | undefined;
  #closed = false;

  constructor(options: ExecutorOptions) {
    this.#db = options.db;
    this.#dataDir = options.dataDir;
    this.#driver = options.driver;
    this.#hostId = options.hostId;
    this.#leases = options.leases;
    this.#log = options.log;
    this.#durable = options.durable;
    this.#maxChain = options.maxDiskChain;
    this.#pauseAt = options.pauseAt;
    this.#timers = options.timers;
    this.#forget = options.forget;
    this.#notifyStopping = options.notifyStopping;
    this.#shared = options.shared;
  }

  async pause(point: PausePoint, id: string): Promise<void> {
    if (this.#pauseAt) await this.#pauseAt(point, id);
  }

  async #transition(instance: Instance, event: MicrovmEvent, patch: { runtime?: Runtime; error?: string } = {}): Promise<boolean> {
    const moved = await applyInstanceEvent(this.#db, instance, event, patch);
    const epoch = instance.leaseEpoch;
    if (!moved && epoch !== undefined && !(await holdsMicrovmLease(this.#db, instance.id, this.#hostId, epoch))) await this.#leaseLost(instance);
    return moved;
  }

  /**
   * Another host took this microVM's lease over (this one was declared dead, or was too slow):
   * whatever it runs here of it must stop, and it is not this host's to manage any more. Its
   * files stay (they may be what the new owner resumes from where hosts share a directory).
   */
  async #leaseLost(instance: Instance): Promise<void> {
    this.#log.warn({ microvm: instance.id, epoch: instance.leaseEpoch }, 'another host holds this microVM\'s lease now: stopping its VM here');
    this.#timers.clear(instance);
    instance.leaseEpoch = undefined;
    const vm = instance.vm;
    if (vm) {
      this.#notifyStopping(instance.id, 'failed');
      this.#stopping.add(vm);
      await vm.kill();
    }
    instance.vm = undefined;
    instance.ports = new Map();
    this.#forget(instance.id);
  }

  /** Stops the VM of every microVM given (this host lost its leases: declared dead, or fenced itself). */
  async fence(instances: readonly Instance[]): Promise<void> {
    for (const instance of instances) await this.#leaseLost(instance);
  }

  #hook(instance: Instance, vm: Vm, name: HookName): Promise<void> {
    return runHooks(this.#db, this.#dataDir, instance, vm, name);
  }

  /** Writes the microVM's latest gateway activity to the store (once per change). */
  async flushActivity(instance: Instance): Promise<void> {
    const at = instance.activity.takeDirty();
    if (at) await touchMicrovmActivity(this.#db, instance.id, at);
  }

  // ---- VMs ------------------------------------------------------------------------------------

  async #forwards(snapshotDir: string, appPort: number | undefined, hooksPort: number | undefined): Promise<{ guestPort: number }[]> {
    const manifest = await readSnapshotManifest(snapshotDir);
    const ports = [...(appPort === undefined ? [] : [appPort]), ...(hooksPort === undefined ? [] : [hooksPort]), ...manifest.guestPorts];
    return [...new Set(ports)].map((guestPort) => ({ guestPort }));
  }

  async #restore(instance: Instance, snapshotDir: string, verifyData: boolean | 'if-present' = true): Promise<Vm> {
    const options = {
      id: instance.id,
      runDir: runDir(this.#dataDir, instance.id),
      snapshotDir,
      verifyData,
      // A suspended generation's memory is a diff against the image's (storage.ts diffGeneration).
      ...(instance.imageId !== null ? { memoryBase: imageSnapshotDir(this.#dataDir, instance.imageId) } : {}),
      network: {
        forwards: await this.#forwards(snapshotDir, instance.hasAppPort ? instance.appPort : undefined, instance.httpHooks?.port),
        egress: instance.egress,
      },
    };
    let vm: Vm;
    try {
      vm = await this.#driver.restore(options);
    } catch (error) {
      // A free port picked for the forward can be taken by someone else before the VMM binds it: once more.
      if (!isCocoonError(error, 'port_in_use')) throw error;
      this.#log.warn({ microvm: instance.id }, 'a forwarded port was taken meanwhile; restoring again');
      vm = await this.#driver.restore(options);
    }
    this.attach(instance, vm);
    return vm;
  }

  /** Makes `vm` the microVM's running VM (a restored one, or one recovery adopted). */
  attach(instance: Instance, vm: Vm): void {
    instance.vm = vm;
    instance.ports = new Map(vm.hostPorts);
    void vm.waitForExit().then(() => this.#vmExited(instance, vm));
    // A guest paused by its VMM for lack of space on the data directory continues once there is room.
    vm.watchDiskSpace({
      path: runDir(this.#dataDir, instance.id),
      onPaused: (cause) =>
        void appendLog(this.#dataDir, instance.id, cause === 'disk' ? 'paused by its VMM: no space left on the data directory for its disk' : 'stopped: the data directory is nearly full and its memory may need more'),
      onContinued: () => void appendLog(this.#dataDir, instance.id, 'continued: the data directory has space again'),
    });
  }

  /** A VM process ended that nobody asked to stop: the guest powered off or crashed. */
  #vmExited(instance: Instance, vm: Vm): void {
    if (this.#stopping.has(vm) || instance.vm !== vm || this.#closed) return;
    const console = vm.serialTail(10);
    void instance.ops
      .run('terminate', async () => {
        if (instance.vm !== vm) return;
        await vm.kill();
        instance.vm = undefined;
        instance.ports = new Map();
        const reason = `the VM stopped unexpectedly (its workload exited or the guest crashed); last console lines:\n${console}`;
        await appendLog(this.#dataDir, instance.id, 'the VM stopped unexpectedly');
        await this.#fail(instance, reason);
      })
      .catch((error: unknown) => this.#log.error({ err: error, microvm: instance.id }, 'handling a VM exit failed'));
  }

  /**
   * Forwards a guest port that nothing forwards yet on the VM running now (the gateway asks,
   * for a port the request's token allows); null when the microVM does not run here now (a
   * request racing a suspend gets 404 and may retry) or the driver cannot forward at run time.
   */
  async exposePort(instance: Instance, guestPort: number): Promise<number | null> {
    const vm = instance.vm;
    if (!vm?.forwardPort || instance.state !== 'RUNNING' || instance.terminating) return null;
    const endpoint = await vm.forwardPort(guestPort);
    if (instance.vm === vm) instance.ports.set(guestPort, endpoint.port);
    return endpoint.port;
  }

  /** Leaves a RUNNING microVM's VM running for the next start to adopt (a stop with onStop 'leave'). */
  leaveRunning(instance: Instance): void {
    if (!instance.vm) return;
    this.#stopping.add(instance.vm);
    instance.vm.detach();
  }

  // ---- the operations (each inside the microVM's queue) ---------------------------------------

  async #fail(instance: Instance, reason: string): Promise<void> {
    this.#timers.clear(instance);
    this.#notifyStopping(instance.id, 'failed');
    if (instance.vm) {
      this.#stopping.add(instance.vm);
      await instance.vm.kill();
      instance.vm = undefined;
    }
    await this.#driver.sweep(runDir(this.#dataDir, instance.id));
    await this.#transition(instance, 'fail', { error: reason.slice(0, 2000) });
    await clearRunHookPayload(this.#db, instance.id);
    await clearRunFiles(this.#driver, this.#dataDir, instance.id);
    this.#log.warn({ microvm: instance.id, reason }, 'microVM failed');
  }

  async launch(instance: Instance, verifyData: boolean | 'if-present' = true): Promise<void> {
    if (!allows(instance.state, 'started') || instance.terminating) return;
    await this.pause('launch:starting', instance.id);
    // Another host launched it meanwhile (several hosts on one store): not ours to run.
    if (!(await this.#claim(instance))) {
      this.#log.warn({ microvm: instance.id }, 'another host runs this microVM; not launching it here');
      this.#timers.clear(instance);
      this.#forget(instance.id);
      return;
    }
    // A microVM starts from its image (generation 0), a fork from its own generation 1 (the
    // fork point): then its workload runs already, so it gets the resume hook, not run.
    const { generation, chain } = instance.runtime;
    let vm: Vm;
    try {
      await this.#shared?.ensureLocal(instance, instance.runtime);
      vm = await this.#restore(instance, snapshotDirFor(this.#dataDir, instance, generation), verifyData);
    } catch (error) {
      await this.#fail(instance, `the microVM could not start from ${generation === 0 ? 'its image' : 'its fork point'}: ${errorMessage(error)}`);
      throw error;
    }
    await this.pause('launch:restored', instance.id);
    await this.#hook(instance, vm, generation === 0 ? 'run' : 'resume');
    const runtime: Runtime = { generation, chain, pid: vm.pid, ports: Object.fromEntries(vm.hostPorts) };
    if (!(await this.#transition(instance, 'started', { runtime }))) {
      await this.#discard(instance);
      return;
    }
    instance.activity.lastActivity = Date.now();
    this.#timers.armIdle(instance);
    await appendLog(this.#dataDir, instance.id, `started from ${generation === 0 ? 'its image' : 'its fork point'} (pid ${vm.pid})`);
  }

  /** Makes the PENDING microVM this host's: its lease in a cluster, else the plain claim. */
  async #claim(instance: Instance): Promise<boolean> {
    if (!this.#leases) return claimMicrovm(this.#db, instance.id, this.#hostId);
    try {
      const epoch = await acquireLease(this.#db, instance.id, this.#hostId, ['PENDING']);
      if (epoch === undefined) return false;
      instance.leaseEpoch = epoch;
      return true;
    } catch (error) {
      if (isCocoonError(error, 'microvm_on_other_host')) return false;
      throw error;
    }
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
    await clearRunFiles(this.#driver, this.#dataDir, instance.id);
  }

  /** Whether the idle policy says: suspend now. */
  isIdle(instance: Instance): boolean {
    return instance.activity.idleFor(instance.maxIdleMs);
  }

  async suspend(instance: Instance, reason: 'idle' | 'api' | 'shutdown'): Promise<void> {
    if (!allows(instance.state, 'suspend') || instance.terminating || !instance.vm) return;
    if (reason === 'idle' && !this.isIdle(instance)) {
      this.#timers.armIdle(instance);
      return;
    }
    if (this.#shared) {
      // A cluster: unless the object store answers, the VM is not touched (object_store_unavailable).
      try {
        await this.#shared.ready(instance, instance.runtime);
      } catch (error) {
        this.#timers.armIdle(instance);
        throw error;
      }
    }
    // Decided: from here on the gateway sees SUSPENDING and holds new requests for the resume.
    instance.state = transition(instance.state, 'suspend');
    this.#timers.clearIdle(instance);
    this.#notifyStopping(instance.id, 'suspended');
    let persisted: boolean;
    try {
      persisted = await this.#transition(instance, 'suspend');
    } catch (error) {
      // The store could not record the decision (its disk is full…): nothing happened, the
      // microVM stays RUNNING, in memory too (else the gateway would hold its requests forever).
      instance.state = 'RUNNING';
      this.#timers.armIdle(instance);
      throw error;
    }
    if (!persisted) return;
    const vm = instance.vm;
    await this.pause('suspend:persisted', instance.id);
    await this.flushActivity(instance);
    await this.#hook(instance, vm, 'suspend');
    const next = instance.runtime.generation + 1;
    const target = generationDir(this.#dataDir, instance.id, next);
    // Anything at the target is an unreferenced leftover (an interrupted compaction).
    await fs.promises.rm(target, { recursive: true, force: true });
    this.#stopping.add(vm);
    const started = performance.now();
    // Its memory as a diff against its image's, made inside the snapshot's commit where the VMM
    // can (docs/vmm.md "Memory diffs"); otherwise whole, and diffed below.
    const memoryBase = instance.imageId !== null ? imageSnapshotDir(this.#dataDir, instance.imageId) : undefined;
    let memory: string;
    try {
      const manifest = await vm.snapshot(target, { durable: this.#durable, onStateSaved: () => this.pause('suspend:state-saved', instance.id), endAfterAnswer: true, ...(memoryBase ? { memoryBase } : {}) });
      memory = manifest.files.mem.base ? `, memory diff of ${Math.ceil(manifest.files.mem.sizeBytes / 4096)} pages made in the snapshot` : '';
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
    if (!vm.exited) {
      instance.endingVm = vm;
      void vm.waitForExit().then(() => {
        if (instance.endingVm === vm) instance.endingVm = undefined;
      });
    }
    await this.pause('suspend:committed', instance.id);
    const diff = memory || (await this.#diffGeneration(instance, next));
    const runtime: Runtime = { generation: next, chain: [...instance.runtime.chain, next] };
    let stored = '';
    if (this.#shared) {
      // Last, after whatever rewrites the generation (its memory diff): what is stored is what
      // the generation holds, so a diff stays a diff in the object store too.
      const storing = performance.now();
      try {
        await this.#shared.commit(instance, runtime, { fresh: true });
      } catch (error) {
        await this.#runOnUnstored(instance, runtime, error as CocoonError);
        throw error;
      }
      stored = `, stored in the object store in ${(performance.now() - storing).toFixed(0)} ms`;
    }
    if (!(await this.#transition(instance, 'suspended', { runtime }))) return;
    await appendLog(this.#dataDir, instance.id, `suspended (${reason}) as generation ${next} in ${snapshotMs.toFixed(0)} ms${diff}${stored}`);
    await collectGarbage(this.#dataDir, instance.id, instance.runtime);
    await this.#compactIfLong(instance);
    this.#timers.armSuspended(instance);
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
    await appendLog(this.#dataDir, instance.id, `suspend abandoned, still running: ${error.message}`);
    this.#log.warn({ microvm: instance.id, code: error.code }, 'suspend abandoned; the microVM runs on');
    if (error.details?.vmRunning === true) await this.#hook(instance, vm, 'resume');
    instance.activity.lastActivity = Date.now();
    this.#timers.armIdle(instance);
  }

  /**
   * A cluster's suspend whose generation is committed here but could not be stored in the object
   * store: not SUSPENDED (no other host could resume it), so the VM is restored from that
   * generation and the microVM goes back to RUNNING as it was; a later suspend stores both.
   */
  async #runOnUnstored(instance: Instance, runtime: Runtime, error: CocoonError): Promise<void> {
    let vm: Vm;
    try {
      vm = await this.#restore(instance, generationDir(this.#dataDir, instance.id, runtime.generation), 'if-present');
    } catch (restoreError) {
      const reason = `its snapshot could not be stored in the object store (${error.message}) nor restored here: ${errorMessage(restoreError)}`;
      await this.#fail(instance, reason);
      throw new CocoonError('microvm_failed', `microVM ${instance.id} has failed: ${reason}`, { status: 409, cause: restoreError });
    }
    await this.#hook(instance, vm, 'resume');
    const running: Runtime = { ...runtime, pid: vm.pid, ports: Object.fromEntries(vm.hostPorts) };
    if (!(await this.#transition(instance, 'suspend_abandoned', { runtime: running }))) {
      await this.#discard(instance);
      return;
    }
    await appendLog(this.#dataDir, instance.id, `suspend abandoned, running on from generation ${runtime.generation}: ${error.message}`);
    this.#log.warn({ microvm: instance.id, code: error.code }, 'suspend abandoned (object store); the microVM runs on');
    instance.activity.lastActivity = Date.now();
    this.#timers.armIdle(instance);
  }

  /**
   * Keeps only the memory pages the new generation changed from its image's (storage.ts), before
   * it is stored or recorded; a failure leaves the generation whole. Answers a note for the log.
   */
  async #diffGeneration(instance: Instance, generation: number): Promise<string> {
    if (instance.imageId === null) return '';
    try {
      const diff = await diffGeneration(this.#dataDir, instance.id, generation, imageSnapshotDir(this.#dataDir, instance.imageId), this.#durable);
      return diff ? `, memory diff ${diff.diffPages} of ${diff.pages} pages in ${diff.compareMs.toFixed(0)} ms` : '';
    } catch (error) {
      this.#log.warn({ err: error, microvm: instance.id }, 'cannot keep only the changed memory pages; the generation stays whole');
      return '';
    }
  }

  async #compactIfLong(instance: Instance): Promise<void> {
    if (instance.runtime.chain.length <= this.#maxChain || instance.imageId === null) return;
    try {
      const runtime = await compactGeneration(this.#driver, this.#dataDir, instance.id, imageSnapshotDir(this.#dataDir, instance.imageId), instance.runtime, this.#durable);
      // A cluster: the folded generation is stored before it is recorded (else the chain stays).
      await this.#shared?.commit(instance, runtime, { fresh: true });
      const folded = instance.runtime.chain.filter((generation) => !runtime.chain.includes(generation));
      if (await setMicrovmRuntimeIf(this.#db, instance.id, 'SUSPENDED', runtimeRecord(runtime), new Date(), instance.leaseEpoch)) {
        instance.runtime = runtime;
        await collectGarbage(this.#dataDir, instance.id, runtime);
        await this.#shared?.forget(instance.id, folded);
      }
    } catch (error) {
      // Not fatal: the chain stays as it was and works, only longer.
      this.#log.warn({ err: error, microvm: instance.id }, 'folding disk layers failed');
    }
  }

  /**
   * Resumes a SUSPENDED microVM; answers whether this call did (false: nothing to do, or another
   * host's now). `clock`, when given, is charged each step (phases.ts): the wait before it as
   * `queue`, then space check, lease, store writes, the VM's own restore phases (`vm_*`), hook, log.
   */
  async resume(instance: Instance, reason: 'request' | 'api', clock?: PhaseClock): Promise<boolean> {
    if (!allows(instance.state, 'resume') || instance.terminating) return false;
    clock?.mark('queue');
    // Refused up front (507 no_space, still SUSPENDED, nothing touched) when the data directory cannot hold its memory.
    await assertRoomToResume(this.#dataDir, snapshotDirFor(this.#dataDir, instance, instance.runtime.generation), `microVM ${instance.id}`);
    clock?.mark('space_check');
    if (this.#leases) {
      // The lease first: of several hosts waking it at once, one runs it; the others answer
      // microvm_on_other_host (and forget it here) so that their caller forwards to the winner.
      let epoch: number | undefined;
      try {
        epoch = await acquireLease(this.#db, instance.id, this.#hostId, ['SUSPENDED']);
      } catch (error) {
        if (isCocoonError(error, 'microvm_on_other_host')) {
          this.#timers.clear(instance);
          this.#forget(instance.id);
        }
        throw error;
      }
      if (epoch === undefined) {
        // Not SUSPENDED any more (ended while this host looked away): follow the store.
        const row = await getMicrovm(this.#db, instance.id);
        if (row) instance.state = row.state;
        return false;
      }
      instance.leaseEpoch = epoch;
      clock?.mark('lease');
    }
    instance.state = transition(instance.state, 'resume');
    this.#timers.clearSuspended(instance);
    if (!(await this.#transition(instance, 'resume'))) return false;
    clock?.mark('store_resuming');
    await this.pause('resume:persisted', instance.id);
    const generation = instance.runtime.generation;
    const started = performance.now();
    let fetched = '';
    let vm: Vm;
    try {
      // A cluster: what this host lacks (suspended elsewhere, or a new host) is downloaded first.
      if (this.#shared) {
        await this.#shared.ensureLocal(instance, instance.runtime);
        fetched = `, ${(performance.now() - started).toFixed(0)} ms of it fetching from the object store`;
        clock?.mark('fetch');
      }
      vm = await this.#restore(instance, snapshotDirFor(this.#dataDir, instance, generation));
      // The driver's own phases; `restore_rest` is what they leave out (the manifest read for the forwards, a retry).
      clock?.markParts(vm.startPhases, 'vm_', 'restore_rest');
    } catch (error) {
      if (isCocoonError(error, 'snapshot_corrupt') || isCocoonError(error, 'snapshot_not_found')) {
        await this.#fail(instance, `the microVM's saved state cannot be restored: ${errorMessage(error)}`);
      } else {
        // Generation `generation` is untouched: back to SUSPENDED, a later wake tries again. A
        // SUSPENDED microVM runs no VM process (its terminate does not look for one): whatever
        // the failed restore may have left in its run directory goes now.
        await this.#driver.sweep(runDir(this.#dataDir, instance.id));
        await this.#transition(instance, 'resume_failed');
        this.#timers.armSuspended(instance);
      }
      throw new CocoonError('resume_failed', `microVM ${instance.id} could not be resumed: ${errorMessage(error)}`, { status: 503, cause: error });
    }
    await this.#hook(instance, vm, 'resume');
    clock?.mark('resume_hook');
    await this.pause('resume:restored', instance.id);
    const runtime: Runtime = { ...instance.runtime, pid: vm.pid, ports: Object.fromEntries(vm.hostPorts) };
    if (!(await this.#transition(instance, 'resumed', { runtime }))) {
      await this.#discard(instance);
      return false;
    }
    clock?.mark('store_running');
    instance.activity.lastActivity = Date.now();
    this.#timers.armIdle(instance);
    await appendLog(this.#dataDir, instance.id, `resumed (${reason}) from generation ${generation} in ${(performance.now() - started).toFixed(0)} ms${fetched} (pid ${vm.pid})`);
    clock?.mark('log');
    return true;
  }

  async terminate(instance: Instance, reason: string): Promise<void> {
    if (!allows(instance.state, 'terminate')) {
      // TERMINATED: nothing left. FAILED is final; terminating it only removes what is left of it.
      if (instance.state === 'FAILED') {
        this.#timers.clear(instance);
        await this.#driver.sweep(microvmDir(this.#dataDir, instance.id));
        await fs.promises.rm(microvmDir(this.#dataDir, instance.id), { recursive: true, force: true });
        this.#forget(instance.id);
      }
      return;
    }
    instance.terminating = true;
    this.#timers.clear(instance);
    this.#notifyStopping(instance.id, 'terminated');
    const wasRunning = instance.state === 'RUNNING';
    const wasSuspended = instance.state === 'SUSPENDED';
    if (!(await this.#transition(instance, 'terminate'))) return;
    await this.pause('terminate:persisted', instance.id);
    const vm = instance.vm;
    if (vm) {
      if (wasRunning) await this.#hook(instance, vm, 'terminate');
      this.#stopping.add(vm);
      await vm.kill();
      instance.vm = undefined;
      instance.ports = new Map();
    }
    if (wasSuspended && !vm) {
      // A SUSPENDED microVM runs no VM process: its suspend ended the VM (waited for here if its
      // exit is not seen yet), a failed resume swept what it started, a fork left SUSPENDED never
      // had one, and at start-up recovery kills every process under microvms/ that no RUNNING
      // microVM owns. So no scan of every process for one (the sweep: ~8 ms each at 5000
      // microVMs, the density bench's teardown).
      await instance.endingVm?.kill();
      instance.endingVm = undefined;
    } else {
      await this.#driver.sweep(microvmDir(this.#dataDir, instance.id));
    }
    await fs.promises.rm(microvmDir(this.#dataDir, instance.id), { recursive: true, force: true });
    await this.#transition(instance, 'terminated');
    // In the background (best effort): a slow or unreachable object store does not hold up the end.
    void this.#shared?.forget(instance.id, [...new Set([...instance.runtime.chain, instance.runtime.generation])].filter((g) => g > 0));
    // A payload whose run hook was never sent (terminated while PENDING) is not kept either.
    await clearRunHookPayload(this.#db, instance.id);
    await appendInstanceEvent(this.#db, instance, 'terminated', reason);
    this.#forget(instance.id);
    this.#log.info({ microvm: instance.id, reason }, 'microVM terminated');
  }

  /** From now on a VM's exit is no surprise (the process is stopping). */
  close(): void {
    this.#closed = true;
  }
}
