import { Transform, type TransformCallback } from 'node:stream';

/** A pass-through stream that fails once more than `maxBytes` went through (no hashing). */
export class ByteLimit extends Transform {
  readonly #maxBytes: number;
  readonly #onExceeded: () => Error;
  #bytes = 0;

  constructor(maxBytes: number, onExceeded: () => Error) {
    super();
    this.#maxBytes = maxBytes;
    this.#onExceeded = onExceeded;
  }

  get bytes(): number {
    return this.#bytes;
  }

  override _transform(chunk: Buffer, _encoding: BufferEncoding, callback: TransformCallback): void {
    this.#bytes += chunk.length;
    if (this.#bytes > this.#maxBytes) callback(this.#onExceeded());
    else callback(null, chunk);
  }
}
