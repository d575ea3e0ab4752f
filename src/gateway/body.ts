/**
 * The request body on its way to the guest: counted against the size limit, and watched for a
 * client that stops sending (slowloris on the body). Chunks pass through untouched and
 * unbuffered; backpressure flows from the guest back to the client's socket.
 */
import { Transform, type Readable, type TransformCallback } from 'node:stream';
import { CocoonError } from '../common/errors.ts';

export class BodyMeter extends Transform {
  bytes = 0;
  /** Set when the meter itself stopped the body (too large, client too slow). */
  failure: CocoonError | undefined;
  readonly #limit: number;
  readonly #idleMs: number;
  readonly #source: Readable;
  #last = 0;
  #timer: NodeJS.Timeout | undefined;

  constructor(source: Readable, limitBytes: number, idleTimeoutMs: number) {
    super({ highWaterMark: 64 * 1024 });
    this.#source = source;
    this.#limit = limitBytes;
    this.#idleMs = idleTimeoutMs;
    if (idleTimeoutMs > 0) {
      this.#last = Date.now();
      this.#timer = setTimeout(() => this.#check(), idleTimeoutMs);
      this.#timer.unref();
    }
    source.pipe(this);
    source.once('aborted', () => this.#stop(undefined));
  }

  override _transform(chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback): void {
    this.bytes += chunk.length;
    if (this.bytes > this.#limit) {
      this.#stop(new CocoonError('request_body_too_large', `the request body exceeds the gateway's limit of ${this.#limit} bytes`, { status: 413 }));
      cb();
      return;
    }
    this.#last = Date.now();
    cb(null, chunk);
  }

  override _flush(cb: TransformCallback): void {
    this.#clear();
    cb();
  }

  override _destroy(error: Error | null, cb: (error?: Error | null) => void): void {
    this.#clear();
    cb(error);
  }

  #check(): void {
    this.#timer = undefined;
    if (this.destroyed || this.writableFinished) return;
    const now = Date.now();
    // Data waiting in a buffer means the guest side is slow, not the client: keep waiting.
    if (this.readableLength > 0 || this.writableLength > 0 || this.#source.readableLength > 0) this.#last = now;
    const due = this.#last + this.#idleMs;
    if (now >= due) {
      this.#stop(new CocoonError('request_body_timeout', `the client sent no request body data for ${this.#idleMs} ms`, { status: 408 }));
      return;
    }
    this.#timer = setTimeout(() => this.#check(), due - now);
    this.#timer.unref();
  }

  #stop(failure: CocoonError | undefined): void {
    if (this.destroyed) return;
    this.failure ??= failure;
    this.#source.unpipe(this);
    this.destroy(failure ?? new Error('the client aborted the request body'));
  }

  #clear(): void {
    if (this.#timer !== undefined) clearTimeout(this.#timer);
    this.#timer = undefined;
  }
}
