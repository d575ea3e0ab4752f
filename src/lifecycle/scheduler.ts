/**
 * When a microVM's idle, suspended-duration and session timers fall due, derived from its store
 * row, and the timers that fire then. The due times are a pure function of the row
 * (`dueTimes`), so any process that reads the row (a restarted daemon, another process of the
 * same host) arrives at the same times; the engine arms one timer per kind and microVM from them
 * and the scheduler's periodic scan (`scanDue`) picks up rows whose time passed without a timer
 * here (a SUSPENDED microVM this process has not loaded).
 */
import type { Microvm } from '../store/microvms.ts';

export type TimerKind = 'idle' | 'suspended' | 'expiry';

/** setTimeout takes at most 2^31-1 ms (about 24.8 days); sessions are at most 8 hours. */
const MAX_TIMEOUT_MS = 2 ** 31 - 1;

/** What the due times depend on: fields of the microVM's row (or the engine's copy of them). */
export interface DueInputs {
  state: Microvm['state'];
  /** ms since the epoch. */
  expiresAt: number;
  /** When it became SUSPENDED (ms since the epoch); only read while SUSPENDED. */
  suspendedAt: number | null;
  suspendedMs: number | null;
  /** The latest activity known (ms since the epoch). */
  lastActivity: number;
  maxIdleMs: number;
}

export interface DueTimes {
  /** The session ends (maximumDurationSeconds): terminate whatever the state. */
  expiry: number;
  /** SUSPENDED for suspendedDurationSeconds: terminate. null: not SUSPENDED, or no such limit. */
  suspended: number | null;
  /** No activity for maxIdleDurationSeconds while RUNNING: suspend (if nothing is in flight then). null: not RUNNING. */
  idle: number | null;
}

/** The due times of a microVM in ms since the epoch (pure: the same row gives the same times). */
export function dueTimes(input: DueInputs): DueTimes {
  return {
    expiry: input.expiresAt,
    suspended: input.state === 'SUSPENDED' && input.suspendedMs !== null ? (input.suspendedAt ?? 0) + input.suspendedMs : null,
    idle: input.state === 'RUNNING' ? input.lastActivity + input.maxIdleMs : null,
  };
}

/** The due inputs of a store row. */
export function dueInputsOf(microvm: Microvm): DueInputs {
  const policy = microvm.idlePolicy;
  return {
    state: microvm.state,
    expiresAt: Date.parse(microvm.expiresAt),
    suspendedAt: microvm.suspendedAt === null ? null : Date.parse(microvm.suspendedAt),
    suspendedMs: policy.suspendedDurationSeconds === null ? null : policy.suspendedDurationSeconds * 1000,
    lastActivity: Date.parse(microvm.lastActivityAt),
    maxIdleMs: policy.maxIdleDurationSeconds * 1000,
  };
}

/** Why a due timer ends a microVM (the reasons the API's events and logs show). */
export const TERMINATION_REASONS = {
  expiry: 'the session ended (maximumDurationSeconds)',
  suspended: 'suspended longer than suspendedDurationSeconds',
} as const;

/**
 * One timer per (microVM, kind): `set` replaces the previous one, `clear` drops them. Timers are
 * unref'd (they never keep the process alive) and fire `onDue(id, kind)`; after `close` nothing
 * is armed any more.
 */
export class Scheduler {
  readonly #timers = new Map<string, Map<TimerKind, NodeJS.Timeout>>();
  readonly #onDue: (microvmId: string, kind: TimerKind) => void;
  #closed = false;

  constructor(onDue: (microvmId: string, kind: TimerKind) => void) {
    this.#onDue = onDue;
  }

  /** Arms the `kind` timer of a microVM for `dueAt` (ms since the epoch; past: at once). */
  set(microvmId: string, kind: TimerKind, dueAt: number): void {
    this.clear(microvmId, kind);
    if (this.#closed) return;
    const wait = Math.min(Math.max(0, dueAt - Date.now()), MAX_TIMEOUT_MS);
    const timer = setTimeout(() => {
      this.#timers.get(microvmId)?.delete(kind);
      this.#onDue(microvmId, kind);
    }, wait);
    timer.unref();
    let timers = this.#timers.get(microvmId);
    if (!timers) this.#timers.set(microvmId, (timers = new Map()));
    timers.set(kind, timer);
  }

  /** Whether a `kind` timer of the microVM is armed. */
  has(microvmId: string, kind: TimerKind): boolean {
    return this.#timers.get(microvmId)?.has(kind) ?? false;
  }

  /** Drops the microVM's `kind` timer, or all of its timers. */
  clear(microvmId: string, kind?: TimerKind): void {
    const timers = this.#timers.get(microvmId);
    if (!timers) return;
    for (const [k, timer] of timers) {
      if (kind !== undefined && k !== kind) continue;
      clearTimeout(timer);
      timers.delete(k);
    }
    if (timers.size === 0) this.#timers.delete(microvmId);
  }

  /** Drops every timer; nothing is armed afterwards. */
  close(): void {
    this.#closed = true;
    for (const id of [...this.#timers.keys()]) this.clear(id);
  }
}

/**
 * The rows among `rows` whose session or suspended duration ended by `now` and that have no
 * timer here: what a periodic scan hands to the engine (SUSPENDED microVMs need no VM to be
 * terminated, so any process of their host can end them).
 */
export function dueWithoutTimer(rows: readonly Microvm[], now: number, isLoaded: (id: string) => boolean): Array<{ microvm: Microvm; kind: 'expiry' | 'suspended' }> {
  const due: Array<{ microvm: Microvm; kind: 'expiry' | 'suspended' }> = [];
  for (const microvm of rows) {
    if (microvm.state !== 'SUSPENDED' || isLoaded(microvm.id)) continue;
    const times = dueTimes(dueInputsOf(microvm));
    if (times.expiry <= now) due.push({ microvm, kind: 'expiry' });
    else if (times.suspended !== null && times.suspended <= now) due.push({ microvm, kind: 'suspended' });
  }
  return due;
}
