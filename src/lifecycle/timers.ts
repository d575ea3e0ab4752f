/**
 * The lifecycle's timers for the microVMs this process manages: one idle, one suspended-duration
 * and one session (expiry) timer per microVM, armed at the due times its row gives
 * (scheduler.ts `dueTimes`) and fired through `onDue`. The executor arms and clears them as the
 * microVM moves; the facade (engine.ts) decides what a due timer does.
 */
import type { Instance } from './instance.ts';
import { dueTimes, Scheduler, type DueTimes, type TimerKind } from './scheduler.ts';

export class LifecycleTimers {
  readonly #scheduler: Scheduler;
  #closed = false;

  constructor(onDue: (microvmId: string, kind: TimerKind) => void) {
    this.#scheduler = new Scheduler(onDue);
  }

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

  /** Arms the idle timer of a RUNNING microVM with nothing in flight (else none). */
  armIdle(instance: Instance): void {
    this.clearIdle(instance);
    if (this.#closed || instance.state !== 'RUNNING' || instance.terminating || instance.activity.busy) return;
    const due = this.#dueTimes(instance).idle;
    if (due !== null) this.#scheduler.set(instance.id, 'idle', due);
  }

  clearIdle(instance: Instance): void {
    this.#scheduler.clear(instance.id, 'idle');
  }

  /** Arms the suspended-duration timer of a SUSPENDED microVM that has such a limit. */
  armSuspended(instance: Instance): void {
    this.clearSuspended(instance);
    if (this.#closed) return;
    const due = this.#dueTimes(instance).suspended;
    if (due !== null) this.#scheduler.set(instance.id, 'suspended', due);
  }

  clearSuspended(instance: Instance): void {
    this.#scheduler.clear(instance.id, 'suspended');
  }

  /** Arms the session's end (maximumDurationSeconds). */
  armExpiry(instance: Instance): void {
    if (this.#closed) return;
    this.#scheduler.set(instance.id, 'expiry', this.#dueTimes(instance).expiry);
  }

  /** Drops every timer of a microVM. */
  clear(instance: Instance): void {
    this.#scheduler.clear(instance.id);
  }

  /** Drops every timer; nothing is armed afterwards. */
  close(): void {
    this.#closed = true;
    this.#scheduler.close();
  }
}
