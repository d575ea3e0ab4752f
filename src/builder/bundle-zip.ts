import { createWriteStream } from 'node:fs';
import type { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { crc32 } from 'node:zlib';
import yauzl, { type Entry, type ZipFile } from 'yauzl';
import { errorMessage, isCocoonError } from '../common/errors.ts';
import { MeasuringStream } from '../objectstore/measure.ts';
import { invalidBundle, quoteName } from './bundle-errors.ts';
import type { BundleLimits } from './bundle-limits.ts';
import type { ArchiveDigest } from './bundle-tar.ts';
import type { BundleWriter } from './bundle-writer.ts';

const S_IFMT = 0o170000;
const S_IFREG = 0o100000;
const S_IFDIR = 0o040000;
const S_IFLNK = 0o120000;
const FILE_TYPES: Record<number, string> = {
  0o010000: 'a FIFO (named pipe)',
  0o020000: 'a character device',
  0o060000: 'a block device',
  0o140000: 'a socket',
};
/** "Made by" host 3 is Unix: the high 16 bits of the external attributes are st_mode. */
const HOST_UNIX = 3;
const MSDOS_DIRECTORY = 0x10;

/**
 * A zip keeps its table of contents at the end, so it is first spooled to a file (bounded,
 * never in memory) and then read entry by entry with yauzl, each entry streamed into `writer`.
 * yauzl checks that every entry's data has its announced size; the CRC is checked here.
 */
export async function extractZip(
  source: Readable,
  writer: BundleWriter,
  limits: BundleLimits,
  spoolPath: string,
): Promise<ArchiveDigest> {
  const measure = new MeasuringStream(limits.maxCompressedBytes, (max) => invalidBundle(`the bundle is larger than ${max} bytes`));
  await pipeline(source, measure, createWriteStream(spoolPath, { flags: 'wx', mode: 0o600 }));

  let zip: ZipFile;
  try {
    zip = await yauzl.openPromise(spoolPath, {
      lazyEntries: true,
      autoClose: false,
      decodeStrings: false, // names are decoded and validated below, with our own messages
      validateEntrySizes: true,
    });
  } catch (error) {
    throw invalidBundle(`it is not a valid zip archive (${errorMessage(error)})`);
  }
  try {
    if (zip.entryCount > limits.maxEntries) throw invalidBundle(`the bundle has more than ${limits.maxEntries} entries`);
    const entries = zip.eachEntry();
    for (;;) {
      let next: IteratorResult<Entry>;
      try {
        next = await entries.next();
      } catch (error) {
        throw invalidBundle(`it is not a valid zip archive (${errorMessage(error)})`);
      }
      if (next.done) break;
      await writeEntry(zip, next.value, writer, limits);
    }
  } finally {
    zip.close();
  }
  return { compressedBytes: measure.bytes, sha256: measure.sha256 };
}

async function writeEntry(zip: ZipFile, entry: Entry, writer: BundleWriter, limits: BundleLimits): Promise<void> {
  const name = yauzl.getFileNameLowLevel(entry.generalPurposeBitFlag, entry.fileNameRaw, entry.extraFields, false);
  const unix = entry.versionMadeBy >> 8 === HOST_UNIX;
  const mode = unix ? (entry.externalFileAttributes >>> 16) & 0xffff : 0;
  const type = mode & S_IFMT;
  const isDirectory = name.endsWith('/') || type === S_IFDIR || (!unix && (entry.externalFileAttributes & MSDOS_DIRECTORY) !== 0);

  if (isDirectory) {
    await writer.directory(name);
    return;
  }
  if (type !== 0 && type !== S_IFREG && type !== S_IFLNK) {
    return writer.refuse(name, FILE_TYPES[type] ?? `a special file (mode ${type.toString(8)})`);
  }
  if (entry.isEncrypted()) throw invalidBundle(`entry ${quoteName(name)} is encrypted; bundles must not be password-protected`);
  if (!entry.canDecodeFileData()) {
    throw invalidBundle(`entry ${quoteName(name)} uses zip compression method ${entry.compressionMethod}; use deflate or store`);
  }
  if (type === S_IFLNK) {
    // A symlink's data is its target: small, so read it whole (bounded by the path limit).
    if (entry.uncompressedSize > limits.maxPathLength) {
      throw invalidBundle(`symlink ${quoteName(name)} has a target longer than ${limits.maxPathLength} bytes`);
    }
    const chunks: Buffer[] = [];
    for await (const chunk of checked(zip, entry, name)) chunks.push(chunk);
    await writer.symlink(name, Buffer.concat(chunks).toString('utf8'));
    return;
  }
  await writer.file(
    name,
    { declaredSize: entry.uncompressedSize, mode: mode & 0o7777, mtime: entry.getLastModDate() },
    checked(zip, entry, name),
  );
}

/** An entry's data with its CRC-32 checked at the end and decoding errors named after the entry. */
async function* checked(zip: ZipFile, entry: Entry, name: string): AsyncGenerator<Buffer> {
  let crc = 0;
  try {
    const stream = await zip.openReadStreamPromise(entry);
    for await (const chunk of stream) {
      crc = crc32(chunk as Buffer, crc);
      yield chunk as Buffer;
    }
  } catch (error) {
    if (isCocoonError(error)) throw error;
    if ((error as { syscall?: unknown } | undefined)?.syscall !== undefined) throw error; // the disk, not the bundle
    throw invalidBundle(`entry ${quoteName(name)} is damaged (${errorMessage(error)})`);
  }
  if (crc >>> 0 !== entry.crc32 >>> 0) throw invalidBundle(`entry ${quoteName(name)} is damaged (CRC-32 mismatch)`);
}
