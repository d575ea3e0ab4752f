/**
 * A sparse file as one object: only its data is stored, never its holes or zero pages. Guest
 * memory files and disks are mostly holes (a 256 MiB guest that touched 40 MiB has 40 MiB of
 * data), so uploading the file as it is would move and store zeros.
 *
 * Format (docs/storage.md "Snapshots in the object store"), all integers unsigned 64-bit
 * little-endian:
 *
 *   header   "CSPARSE1" (8 bytes), the file's size
 *   extents  for each run of non-zero pages, in increasing order: its offset, its length, then
 *            its bytes (offsets page-aligned; a length is a multiple of 4096 bytes except for a
 *            run that ends at the file's size)
 *   trailer  offset 2^64-1, then the number of extents: an object without it is incomplete
 *
 * Each extent's entry of the extents table thus comes right before its bytes, so the object is
 * written and read in one pass, without holding the file or the table in memory.
 */
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import { Readable } from 'node:stream';
import { CocoonError } from '../common/errors.ts';
import { runSparseHelper } from '../vmm/native/helper.ts';

export const SPARSE_MAGIC = Buffer.from('CSPARSE1', 'latin1');
const PAGE = 4096;
const END = 0xffff_ffff_ffff_ffffn;
/** Data is read in chunks of this size, and an extent is cut at this length (bounded buffers). */
const CHUNK = 1024 * 1024;
const MAX_EXTENT = 8 * CHUNK;

/** The bytes an object of a file of `size` bytes can take at most (all data, every page its own extent). */
export function maxSparseObjectBytes(size: number): number {
  return 16 + size + 16 * (Math.ceil(size / PAGE) + 1);
}

/** The data ranges of a file, [start, end) page-aligned, adjacent ones merged (cocoon-sparse map). */
export async function dataRanges(file: string): Promise<Array<[number, number]>> {
  const out = await runSparseHelper(['map', file]);
  const ranges: Array<[number, number]> = [];
  for (const line of out.split('\n')) {
    if (!line) continue;
    const [start, end] = line.split(' ').map(Number) as [number, number];
    if (!Number.isSafeInteger(start) || !Number.isSafeInteger(end) || end <= start) throw new Error(`cocoon-sparse map answered ${JSON.stringify(line)}`);
    const last = ranges.at(-1);
    if (last && last[1] === start) last[1] = end;
    else ranges.push([start, end]);
  }
  return ranges;
}

function u64(value: number | bigint): Buffer {
  const buffer = Buffer.alloc(8);
  buffer.writeBigUInt64LE(BigInt(value));
  return buffer;
}

const ZERO_PAGE = Buffer.alloc(PAGE);

/** Whether buffer[start, end) (at most a page) is all zeros: a native compare, not a JS loop. */
function isZero(buffer: Buffer, start: number, end: number): boolean {
  return buffer.subarray(start, end).equals(ZERO_PAGE.subarray(0, end - start));
}

/**
 * The object's bytes for `file` (an open handle: a rename meanwhile does not matter). The file
 * must not change while it is read (snapshot files never do).
 */
export function encodeSparseFile(file: string): Readable {
  async function* generate(): AsyncGenerator<Buffer> {
    const handle = await fs.promises.open(file, 'r');
    try {
      const size = (await handle.stat()).size;
      yield Buffer.concat([SPARSE_MAGIC, u64(size)]);
      let extents = 0;
      // The run of non-zero pages being gathered: where it starts and its bytes so far.
      let runStart = -1;
      let run: Buffer[] = [];
      let runBytes = 0;
      const flush = function* (): Generator<Buffer> {
        if (runStart < 0) return;
        yield Buffer.concat([u64(runStart), u64(runBytes)]);
        yield* run;
        extents++;
        runStart = -1;
        run = [];
        runBytes = 0;
      };
      for (const [start, end] of await dataRanges(file)) {
        for (let at = start; at < end; at += CHUNK) {
          const length = Math.min(CHUNK, end - at);
          const chunk = Buffer.alloc(length);
          const { bytesRead } = await handle.read(chunk, 0, length, at);
          if (bytesRead !== length) throw new Error(`${file} changed while it was read (short read at ${at})`);
          for (let page = 0; page < length; page += PAGE) {
            const pageEnd = Math.min(page + PAGE, length);
            if (isZero(chunk, page, pageEnd)) {
              yield* flush();
              continue;
            }
            if (runStart >= 0 && runStart + runBytes !== at + page) yield* flush();
            if (runStart < 0) runStart = at + page;
            run.push(chunk.subarray(page, pageEnd));
            runBytes += pageEnd - page;
            if (runBytes >= MAX_EXTENT) yield* flush();
          }
        }
      }
      yield* flush();
      yield Buffer.concat([u64(END), u64(extents)]);
    } finally {
      await handle.close();
    }
  }
  return Readable.from(generate(), { objectMode: false });
}

function invalid(where: string, why: string): CocoonError {
  return new CocoonError('snapshot_corrupt', `the stored snapshot file ${where} is unusable: ${why}`, { status: 422 });
}

/** Reads exact byte counts from a stream of chunks. */
class ExactReader {
  readonly #chunks: AsyncIterator<Buffer>;
  #buffer: Buffer = Buffer.alloc(0);
  readonly hash = createHash('sha256');
  bytes = 0;

  constructor(stream: Readable) {
    this.#chunks = (stream as AsyncIterable<Buffer>)[Symbol.asyncIterator]();
  }

  /** Up to `max` bytes (at least one), or undefined at the end of the stream. */
  async some(max: number): Promise<Buffer | undefined> {
    if (this.#buffer.length === 0) {
      const next = await this.#chunks.next();
      if (next.done) return undefined;
      this.#buffer = Buffer.isBuffer(next.value) ? next.value : Buffer.from(next.value as Uint8Array);
    }
    const out = this.#buffer.subarray(0, max);
    this.#buffer = this.#buffer.subarray(out.length);
    this.hash.update(out);
    this.bytes += out.length;
    return out;
  }

  async exactly(count: number, where: string): Promise<Buffer> {
    const parts: Buffer[] = [];
    let got = 0;
    while (got < count) {
      const part = await this.some(count - got);
      if (!part) throw invalid(where, 'it ends early (an incomplete upload?)');
      parts.push(part);
      got += part.length;
    }
    return parts.length === 1 ? parts[0]! : Buffer.concat(parts);
  }
}

/**
 * Writes the file an object describes to `target` (a new file, mode 0600), checking the
 * object's structure as it goes; answers the object's SHA-256 and size. An object that is
 * malformed, truncated or has bytes after its trailer fails with `snapshot_corrupt`; the caller
 * removes what was written.
 */
export async function decodeSparseObject(stream: Readable, target: string, where: string, maxSize: number): Promise<{ sha256: string; objectBytes: number; sizeBytes: number }> {
  const reader = new ExactReader(stream);
  const header = await reader.exactly(16, where);
  if (!header.subarray(0, 8).equals(SPARSE_MAGIC)) throw invalid(where, 'it is not a sparse file object');
  const size = header.readBigUInt64LE(8);
  if (size > BigInt(maxSize)) throw invalid(where, `it describes a file of ${size} bytes, more than the ${maxSize} expected`);
  const sizeBytes = Number(size);
  const handle = await fs.promises.open(target, 'wx', 0o600);
  try {
    await handle.truncate(sizeBytes);
    let next = 0;
    let extents = 0;
    for (;;) {
      const entry = await reader.exactly(16, where);
      const offset = entry.readBigUInt64LE(0);
      const length = entry.readBigUInt64LE(8);
      if (offset === END) {
        if (length !== BigInt(extents)) throw invalid(where, `its trailer counts ${length} extents, it has ${extents}`);
        break;
      }
      if (offset % BigInt(PAGE) !== 0n || offset < BigInt(next) || length === 0n || offset + length > size) {
        throw invalid(where, `extent ${extents} (offset ${offset}, length ${length}) is out of order or outside the file`);
      }
      if (length % BigInt(PAGE) !== 0n && offset + length !== size) throw invalid(where, `extent ${extents} has a partial page inside the file`);
      let position = Number(offset);
      let left = Number(length);
      while (left > 0) {
        const part = await reader.some(Math.min(left, CHUNK));
        if (!part) throw invalid(where, 'it ends early (an incomplete upload?)');
        await handle.write(part, 0, part.length, position);
        position += part.length;
        left -= part.length;
      }
      next = position;
      extents++;
    }
    if (await reader.some(1)) throw invalid(where, 'it has bytes after its end');
  } finally {
    await handle.close();
  }
  return { sha256: reader.hash.digest('hex'), objectBytes: reader.bytes, sizeBytes };
}
