/**
 * What the API routes (and other front ends) ask of the lifecycle, as one small interface: they
 * depend on this, not on the engine's class, so that the engine can be split, run elsewhere or
 * replaced by a test double without touching a route.
 */
import type { MicroVMDirectory } from '../gateway/types.ts';
import type { Microvm } from '../store/microvms.ts';
import type { Db } from '../store/sql.ts';
import type { LifecycleEngine } from './engine.ts';
import type { StopReason } from './instance.ts';
import { checkpointMicrovm, forkMicrovm, type CheckpointResult, type ForkInput, type ForkResult } from './fork.ts';
import { startMicrovm, type StartMicrovmInput } from './start.ts';
import { assertRoomToLaunch } from './space-check.ts';
import { readLogTail } from './storage.ts';

export { MAX_FORKS, type CheckpointResult, type ForkInput, type ForkResult } from './fork.ts';
export type { StartMicrovmInput } from './start.ts';

export interface MicrovmService {
  /** A new microVM from a READY image (idempotent per clientToken), launched in the background. */
  start(input: StartMicrovmInput): Promise<{ microvm: Microvm; created: boolean }>;
  /** A microVM just created in the store (PENDING): starts it in the background. */
  launch(microvm: Microvm): Promise<void>;
  /**
   * Refuses with 507 `no_space` unless this host's data directory can hold what a new microVM of
   * `image` could need (space-check.ts): for a front end that creates the microVM itself, to
   * refuse before anything is made (`start` checks on its own).
   */
  assertRoomToLaunch(image: { readonly id: string; readonly memoryMiB: number }): Promise<void>;
  /** Suspends a RUNNING microVM; no-op when already SUSPENDED. */
  suspend(microvmId: string): Promise<void>;
  /** Resumes a SUSPENDED microVM; no-op when RUNNING. */
  resume(microvmId: string): Promise<void>;
  /** Terminates whatever the state; resolves once its files are gone. `reason`: what its events and log say (default: through the API). */
  terminate(microvmId: string, reason?: string): Promise<void>;
  /** New microVMs that continue from `source`'s state now. */
  fork(source: Microvm, input: ForkInput): Promise<ForkResult>;
  /** A new image version whose snapshot is `source`'s state now. */
  checkpoint(source: Microvm, name?: string): Promise<CheckpointResult>;
  /** The microVM's log (console and lifecycle notes), its last 256 KiB. */
  logTail(microvmId: string): Promise<string>;
}

/**
 * What sessions inside running microVMs (src/exec/) ask of the lifecycle: wake a microVM as the
 * gateway does, reach its guest agent, count sessions as activity, hear when its VM stops.
 */
export interface MicrovmRuntime extends Pick<MicroVMDirectory, 'ensureRunning' | 'requestStarted' | 'requestFinished' | 'webSocketOpened' | 'webSocketClosed'> {
  /** The guest agent's socket of a RUNNING microVM's VM (undefined when it has none running here). */
  agentSocketPath(microvmId: string): string | undefined;
  /** Listens for microVMs whose VM is about to stop; returns the unsubscribe function. */
  onVmStopping(listener: (microvmId: string, reason: StopReason) => void): () => void;
}

/** The service on this process's engine. */
export function engineMicrovmService(engine: LifecycleEngine, db: Db, region: string): MicrovmService {
  return {
    start: (input) => startMicrovm(db, engine, region, input),
    launch: (microvm) => engine.launch(microvm),
    assertRoomToLaunch: (image) => assertRoomToLaunch(engine.dataDir, image.memoryMiB, `a microVM of image ${image.id}`),
    suspend: (id) => engine.suspend(id),
    resume: (id) => engine.resume(id),
    terminate: (id, reason) => engine.terminate(id, reason),
    fork: (source, input) => forkMicrovm(engine, db, region, source, input),
    checkpoint: (source, name) => checkpointMicrovm(engine, db, region, source, name),
    logTail: (id) => readLogTail(engine.dataDir, id),
  };
}
