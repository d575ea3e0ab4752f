/**
 * What the lifecycle holds in memory of a microVM it manages on this host (an `Instance`): the
 * row's settings it acts on, the state it follows (the store leads, see engine.ts), the running
 * VM if any, the gateway's activity reports and the per-microVM operation queue. Built from a
 * store row and its image (`loadInstance`); the executor, the timers and the facade share it.
 */
import { appendEvent } from '../store/events.ts';
import { getImage, type ImageHooks, type HttpHooks } from '../store/images.ts';
import type { Microvm } from '../store/microvms.ts';
import type { Db } from '../store/sql.ts';
import type { Vm } from '../vmm/driver.ts';
import { Activity } from './activity.ts';
import { OperationQueue } from './queue.ts';
import { parseRuntime, type Runtime } from './storage.ts';
import type { MicrovmState } from './transitions.ts';

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

/** For crash tests: awaited at each point (a test makes it hang, then kills the process). */
export type PauseHook = (point: PausePoint, microvmId: string) => Promise<void>;

export type Operation = 'launch' | 'suspend' | 'resume' | 'terminate' | 'fork' | 'checkpoint';

/** Why a microVM's VM is about to stop (exec sessions end with this reason). */
export type StopReason = 'suspended' | 'terminated' | 'failed';

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

export interface Instance {
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
  /**
   * The VM a suspend ended whose process was not gone yet when the suspend finished (the
   * suspend answers once its snapshot is committed and the process told to end: the driver's
   * `endAfterAnswer`; kept only until its exit is seen). A terminate of the SUSPENDED microVM
   * waits for it instead of scanning for processes.
   */
  endingVm?: Vm;
  /** Guest port → host port of the running VM. */
  ports: Map<number, number>;
  /** The gateway's reports: requests and WebSockets in flight, the last traffic (activity.ts). */
  readonly activity: Activity;
  /** This microVM's operations, one at a time (queue.ts). */
  readonly ops: OperationQueue<Operation>;
  /**
   * In a cluster: the epoch of this host's lease on the microVM (ownership.ts), carried by every
   * state write; undefined with one host (writes are not fenced) or before the lease is held.
   */
  leaseEpoch: number | undefined;
}

/** The in-memory record of a microVM the store knows (its image's hooks read once, here). */
export async function loadInstance(db: Db, microvm: Microvm, options: { leases?: boolean; hostId?: string } = {}): Promise<Instance> {
  const image = microvm.imageId === null ? undefined : await getImage(db, microvm.imageId);
  return {
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
    leaseEpoch: options.leases && microvm.hostId !== null && microvm.hostId === options.hostId ? microvm.leaseEpoch : undefined,
  };
}

/** Appends an event of a microVM to the store's event log (what the API's events show). */
export async function appendInstanceEvent(db: Db, instance: Pick<Instance, 'id' | 'tenantId'>, type: string, message: string, data?: Record<string, unknown>): Promise<void> {
  await appendEvent(db, { tenantId: instance.tenantId, resourceType: 'microvm', resourceId: instance.id, type, message, ...(data ? { data } : {}) });
}
