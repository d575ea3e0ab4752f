/**
 * A microVM's operation queue: its operations (launch, suspend, resume, terminate, fork,
 * checkpoint) run one at a time, in the order they were asked for; different microVMs have
 * different queues and are independent. A failed operation does not stop the ones after it.
 */
export class OperationQueue<Operation extends string> {
  #tail: Promise<void> = Promise.resolve();
  #busy: Operation | undefined;

  /** The operation running now, if any. */
  get busy(): Operation | undefined {
    return this.#busy;
  }

  /** Resolves (never rejects) once every operation queued so far has ended. */
  get settled(): Promise<void> {
    return this.#tail;
  }

  /** Runs `fn` after the operations queued before it; its result or error is the caller's. */
  run<T>(operation: Operation, fn: () => Promise<T>): Promise<T> {
    const result = this.#tail.then(async () => {
      this.#busy = operation;
      try {
        return await fn();
      } finally {
        this.#busy = undefined;
      }
    });
    this.#tail = result.then(
      () => undefined,
      () => undefined,
    );
    return result;
  }
}
