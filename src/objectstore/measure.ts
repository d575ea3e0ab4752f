import { createHash, type Hash } from 'node:crypto';
import { Transform, type TransformCallback } from 'node:stream';

/**
 * A pass-through stream that counts bytes, hashes them with SHA-256 and fails as soon as more
 * than `maxBytes` went through. Sitting between a source and its destination it gives the
 * size bound and the digest in one pass, without ever holding the whole stream.
 */
export class MeasuringStream extends Transform {
  readonly #hash: Hash = createHash('sha256');
  readonly #maxBytes: number;
  readonly #onExceeded: (maxBytes: number) => Error;
  #bytes = 0;
  #digest: string | undefined;

  constructor(maxBytes: number, onExceeded: (maxBytes: number) => Error) {
    super();
    this.#maxBytes = maxBytes;
    this.#onExceeded = onExceeded;
  }

  override _transform(chunk: Buffer | string, _encoding: BufferEncoding, callback: TransformCallback): void {
    const buffer = typeof chunk === 'string' ? Buffer.from(chunk) : chunk;
    this.#bytes += buffer.length;
    if (this.#bytes > this.#maxBytes) {
      callback(this.#onExceeded(this.#maxBytes));
      return;
    }
    this.#hash.update(buffer);
    callback(null, buffer);
  }

  override _flush(callback: TransformCallback): void {
    this.#digest = this.#hash.digest('hex');
    callback();
  }

  /** Bytes seen so far. */
  get bytes(): number {
    return this.#bytes;
  }

  /** Hex SHA-256 of everything that went through; only once the stream has ended. */
  get sha256(): string {
    if (this.#digest === undefined) throw new Error('MeasuringStream: digest read before the stream ended');
    return this.#digest;
  }
}
