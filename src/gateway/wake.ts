/**
 * Waking microVMs on request. The gateway coalesces: while one `ensureRunning` for a microVM
 * is pending, every other request for it waits on that same promise. Each request waits at
 * most `timeoutMs` (then 503 + Retry-After) and stops waiting when its client leaves; neither
 * cancels the wake itself, which only the gateway's shutdown aborts.
 */
import { CocoonError } from '../common/errors.ts';
import type { MicroVMDirectory, MicroVMRoute } from './types.ts';

export type WakeOutcome =
  | { kind: 'running'; route: MicroVMRoute }
  | { kind: 'timeout' }
  | { kind: 'client_gone' }
  | { kind: 'failed'; error: unknown };

export class WakeCoalescer {
  readonly #directory: MicroVMDirectory;
  readonly #pending = new Map<string, Promise<MicroVMRoute>>();
  readonly #shutdown = new AbortController();

  constructor(directory: MicroVMDirectory) {
    this.#directory = directory;
  }

  /** The pending wake for `microvmId`, started if there is none. */
  wake(microvmId: string): Promise<MicroVMRoute> {
    const existing = this.#pending.get(microvmId);
    if (existing !== undefined) return existing;
    if (this.#shutdown.signal.aborted) {
      return Promise.reject(new CocoonError('gateway_closing', 'the gateway is shutting down', { status: 503 }));
    }
    const signal = this.#shutdown.signal;
    const p = Promise.resolve().then(() => this.#directory.ensureRunning(microvmId, signal));
    this.#pending.set(microvmId, p);
    // Each waiter handles a rejection; this chain only forgets the settled wake.
    p.finally(() => {
      if (this.#pending.get(microvmId) === p) this.#pending.delete(microvmId);
    }).catch(() => {});
    return p;
  }

  /**
   * Waits for the microVM's wake, at most `timeoutMs`, or until `clientGone` aborts.
   */
  async waitRunning(microvmId: string, timeoutMs: number, clientGone: AbortSignal): Promise<WakeOutcome> {
    if (clientGone.aborted) return { kind: 'client_gone' };
    const wake = this.wake(microvmId);
    let timer: NodeJS.Timeout | undefined;
    let onGone: (() => void) | undefined;
    const stop = new Promise<WakeOutcome>((resolve) => {
      timer = setTimeout(() => resolve({ kind: 'timeout' }), timeoutMs);
      onGone = () => resolve({ kind: 'client_gone' });
      clientGone.addEventListener('abort', onGone, { once: true });
    });
    try {
      return await Promise.race([
        wake.then(
          (route): WakeOutcome => ({ kind: 'running', route }),
          (error: unknown): WakeOutcome => ({ kind: 'failed', error }),
        ),
        stop,
      ]);
    } finally {
      clearTimeout(timer);
      if (onGone !== undefined) clientGone.removeEventListener('abort', onGone);
    }
  }

  get pendingCount(): number {
    return this.#pending.size;
  }

  /** Aborts every pending wake's signal; later wakes are refused. */
  close(): void {
    this.#shutdown.abort(new CocoonError('gateway_closing', 'the gateway is shutting down', { status: 503 }));
  }
}
