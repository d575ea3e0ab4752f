import { once } from 'node:events';
import type { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { createGunzip } from 'node:zlib';
import { Parser, type ReadEntry } from 'tar';
import { isCocoonError, errorMessage } from '../common/errors.ts';
import { MeasuringStream } from '../objectstore/measure.ts';
import { ByteLimit } from './byte-limit.ts';
import { invalidBundle, quoteName } from './bundle-errors.ts';
import type { BundleLimits } from './bundle-limits.ts';
import type { BundleWriter } from './bundle-writer.ts';

/** Room for tar's own bytes beside file content: a header (and maybe a PAX header) per entry, padding, end blocks. */
const TAR_OVERHEAD_PER_ENTRY = 3 * 512;
const TAR_OVERHEAD_FIXED = 1024 * 1024;
/** PAX extended headers (long names, attributes) are small; refuse big ones rather than buffer them. */
const MAX_META_ENTRY_BYTES = 64 * 1024;

export interface ArchiveDigest {
  compressedBytes: number;
  sha256: string;
}

/**
 * Streams a gzip'd tar through gunzip and tar's parser into `writer`, one entry at a time:
 * nothing is buffered beyond a chunk. We decompress ourselves (not tar's auto-detection) so
 * the decompressed bytes are counted and bounded before the parser sees them, and the parser
 * is told not to look for a second layer of compression.
 */
export async function extractTarGz(source: Readable, writer: BundleWriter, limits: BundleLimits): Promise<ArchiveDigest> {
  const compressed = new MeasuringStream(limits.maxCompressedBytes, (max) =>
    invalidBundle(`the bundle is larger than ${max} bytes`));
  const inflated = new ByteLimit(
    limits.maxUncompressedBytes + limits.maxEntries * TAR_OVERHEAD_PER_ENTRY + TAR_OVERHEAD_FIXED,
    () => invalidBundle(`the bundle unpacks to more than ${limits.maxUncompressedBytes} bytes`),
  );
  const parser = new Parser({ strict: true, brotli: false, zstd: false, maxMetaEntrySize: MAX_META_ENTRY_BYTES });

  // The first failure wins, whichever side it comes from (stream, parser, or writing an entry).
  let failure: unknown;
  let rejectFailed!: (error: unknown) => void;
  const failed = new Promise<never>((_, reject) => { rejectFailed = reject; });
  failed.catch(() => {});
  const fail = (error: unknown): void => {
    if (failure !== undefined) return;
    failure = error;
    rejectFailed(error);
  };

  let sawEnd = false;
  let entries = 0;
  const parsed = new Promise<void>((resolve) => parser.on('end', () => resolve()));
  parser.on('eof', () => { sawEnd = true; });
  parser.on('error', (error: unknown) => {
    // tar calls an archive of nothing but end blocks "unrecognized"; it is just empty, and
    // "no Dockerfile" says more about what is wrong with it.
    if (sawEnd && entries === 0 && /Unrecognized archive format/.test(errorMessage(error))) return;
    fail(asInvalidTar(error));
  });
  parser.on('ignoredEntry', (entry: ReadEntry) => {
    fail(entry.meta
      ? invalidBundle(`an extended tar header is larger than ${MAX_META_ENTRY_BYTES} bytes`)
      : invalidBundle(`entry ${quoteName(entry.path)} has a tar entry type Cocoon does not support (${entry.type})`));
  });
  // The parser hands out the next entry only after this one's data was read, so entries are
  // written strictly in order; the chain also orders the work of entries without data.
  let chain: Promise<void> = Promise.resolve();
  parser.on('entry', (entry: ReadEntry) => {
    entries += 1;
    chain = chain
      .then(() => {
        if (failure !== undefined) return undefined;
        return writeEntry(entry, writer, failed);
      })
      .catch(fail);
  });

  const gunzip = createGunzip({ chunkSize: 64 * 1024 });
  // A stage that fails (a truncated gzip, a dropped connection) must also wake the loop below
  // if it waits for the parser to drain: with no more data coming, no drain would.
  // (Aborts are how pipeline tears the other stages down after a failure: not a cause.)
  for (const stream of [source, compressed, gunzip, inflated]) {
    stream.on('error', (error) => { if ((error as { code?: unknown }).code !== 'ABORT_ERR') fail(error); });
  }

  try {
    await pipeline(source, compressed, gunzip, inflated, async (tarStream: AsyncIterable<Buffer>) => {
      let first = true;
      for await (const chunk of tarStream) {
        if (failure !== undefined) throw failure;
        if (first && chunk.length >= 2 && chunk[0] === 0x1f && chunk[1] === 0x8b) {
          fail(invalidBundle('the bundle is compressed twice; upload a .tar.gz, not a gzip of one'));
          throw failure;
        }
        first = false;
        // After tar's end-of-archive blocks the rest is padding: read it (it still counts
        // against the bound) but keep it from the parser, which would buffer it.
        if (sawEnd) continue;
        if (!parser.write(chunk)) await Promise.race([once(parser, 'drain'), failed]);
      }
      parser.end();
      await Promise.race([parsed, failed]);
      await chain;
      if (failure !== undefined) throw failure;
    });
  } catch (error) {
    // Marks the failure (a no-op if something failed first): queued entries are skipped and
    // an entry waiting for data that will never come gives up. Then wait until nothing writes
    // into the directory any more, so that the caller can remove it.
    fail(error);
    await chain;
    throw asInvalidTar(failure);
  }
  return { compressedBytes: compressed.bytes, sha256: compressed.sha256 };
}

async function writeEntry(entry: ReadEntry, writer: BundleWriter, failed: Promise<never>): Promise<void> {
  switch (entry.type) {
    case 'File':
    case 'OldFile':
    case 'ContiguousFile':
      await writer.file(entry.path, { declaredSize: entry.size, mode: entry.mode, mtime: entry.mtime }, untilFailed(entry, failed));
      return;
    case 'Directory':
    case 'GNUDumpDir':
      await writer.directory(entry.path);
      break;
    case 'SymbolicLink':
      await writer.symlink(entry.path, entry.linkpath ?? '');
      break;
    case 'Link':
      await writer.hardlink(entry.path, entry.linkpath ?? '');
      break;
    case 'CharacterDevice':
      return writer.refuse(entry.path, 'a character device');
    case 'BlockDevice':
      return writer.refuse(entry.path, 'a block device');
    case 'FIFO':
      return writer.refuse(entry.path, 'a FIFO (named pipe)');
    default:
      return writer.refuse(entry.path, `a tar entry of type ${entry.type}`);
  }
  entry.resume(); // let entries without content (or a GNU dump directory's listing) end
}

/**
 * An entry's data that stops with the extraction's failure: once the stream feeding the parser
 * failed, the rest of a truncated entry never arrives, and its reader must not wait for it.
 */
async function* untilFailed(entry: ReadEntry, failed: Promise<never>): AsyncGenerator<Buffer> {
  const iterator = entry[Symbol.asyncIterator]();
  for (;;) {
    const next = await Promise.race([iterator.next(), failed]);
    if (next.done) return;
    yield next.value as Buffer;
  }
}

/** gzip and tar parser errors mean a broken bundle; anything else (disk, source) stays as it is. */
function asInvalidTar(error: unknown): unknown {
  if (isCocoonError(error)) return error;
  const code = (error as { code?: unknown } | undefined)?.code;
  if (typeof code === 'string' && code.startsWith('Z_')) {
    return invalidBundle(`it is not a valid gzip stream (${errorMessage(error)})`);
  }
  if ((error as { tarCode?: unknown } | undefined)?.tarCode !== undefined) {
    return invalidBundle(`it is not a valid tar archive (${errorMessage(error).replace(/^TAR_\w+: /, '')})`);
  }
  return error;
}
