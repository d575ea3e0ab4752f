import { createHash } from 'node:crypto';
import { Readable } from 'node:stream';

export function sha256(data: Buffer): string {
  return createHash('sha256').update(data).digest('hex');
}

/** A stream of `data` in chunks of `chunkSize`, so that sizes cross chunk borders. */
export function chunked(data: Buffer, chunkSize = 64 * 1024): Readable {
  return Readable.from((function* () {
    for (let offset = 0; offset < data.length; offset += chunkSize) yield data.subarray(offset, offset + chunkSize);
  })());
}

/** Yields `data`, then fails: a network drop in the middle of an upload. */
export function failingAfter(data: Buffer, error: Error): Readable {
  return Readable.from((async function* () {
    yield data;
    await new Promise((resolve) => setImmediate(resolve));
    throw error;
  })());
}

export async function readAll(stream: Readable): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const chunk of stream) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks);
}
