/**
 * Who is told that a microVM's VM is about to stop (suspended, terminated or failed): the exec
 * service ends the microVM's sessions with that reason. A listener that throws is logged and
 * does not keep the others from being told.
 */
import type { Logger } from '../common/log.ts';
import type { StopReason } from './instance.ts';

export type StopListener = (microvmId: string, reason: StopReason) => void;

export class StopListeners {
  readonly #listeners = new Set<StopListener>();
  readonly #log: Logger;

  constructor(log: Logger) {
    this.#log = log;
  }

  /** Adds a listener; returns the unsubscribe function. */
  add(listener: StopListener): () => void {
    this.#listeners.add(listener);
    return () => this.#listeners.delete(listener);
  }

  notify(microvmId: string, reason: StopReason): void {
    for (const listener of this.#listeners) {
      try {
        listener(microvmId, reason);
      } catch (error) {
        this.#log.error({ err: error, microvm: microvmId }, 'a stop listener failed');
      }
    }
  }
}
