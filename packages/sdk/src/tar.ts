/**
 * A small ustar writer (POSIX.1-1988 headers, PAX extended headers for long names), enough to
 * pack a folder into a bundle without a dependency. Entries are what a build context holds:
 * directories, regular files and symbolic links; owner 0:0 (the build decides ownership).
 */

const BLOCK = 512;
const encoder = new TextEncoder();

export type TarEntry =
  | { type: 'directory'; name: string; mode: number; mtime: number }
  | { type: 'file'; name: string; mode: number; mtime: number; size: number; content: AsyncIterable<Uint8Array> }
  | { type: 'symlink'; name: string; mode: number; mtime: number; target: string };

function writeString(block: Uint8Array, offset: number, length: number, value: string): void {
  const bytes = encoder.encode(value);
  block.set(bytes.subarray(0, length), offset);
}

/** An octal field: digits, then NUL, right-aligned with zeros. */
function writeOctal(block: Uint8Array, offset: number, length: number, value: number): void {
  const digits = Math.floor(value).toString(8).padStart(length - 1, '0');
  writeString(block, offset, length - 1, digits);
  block[offset + length - 1] = 0;
}

function fitsOctal(value: number, length: number): boolean {
  return value < 8 ** (length - 1);
}

/** ustar splits a long path into prefix (≤155 bytes) and name (≤100 bytes) at a '/'. */
function splitUstarPath(path: string): { prefix: string; name: string } | undefined {
  const bytes = encoder.encode(path).length;
  if (bytes <= 100) return { prefix: '', name: path };
  for (let i = path.indexOf('/'); i >= 0; i = path.indexOf('/', i + 1)) {
    const prefix = path.slice(0, i);
    const name = path.slice(i + 1);
    if (encoder.encode(prefix).length <= 155 && encoder.encode(name).length <= 100 && name !== '') return { prefix, name };
  }
  return undefined;
}

function header(fields: {
  name: string; prefix: string; mode: number; size: number; mtime: number; typeflag: string; linkname: string;
}): Uint8Array {
  const block = new Uint8Array(BLOCK);
  writeString(block, 0, 100, fields.name);
  writeOctal(block, 100, 8, fields.mode & 0o7777);
  writeOctal(block, 108, 8, 0);
  writeOctal(block, 116, 8, 0);
  writeOctal(block, 124, 12, fields.size);
  writeOctal(block, 136, 12, Math.max(0, fields.mtime));
  block.fill(0x20, 148, 156); // checksum counted as spaces
  writeString(block, 156, 1, fields.typeflag);
  writeString(block, 157, 100, fields.linkname);
  writeString(block, 257, 6, 'ustar');
  writeString(block, 263, 2, '00');
  writeString(block, 265, 32, 'root');
  writeString(block, 297, 32, 'root');
  writeString(block, 345, 155, fields.prefix);
  let sum = 0;
  for (const byte of block) sum += byte;
  writeString(block, 148, 7, sum.toString(8).padStart(6, '0') + '\0');
  block[155] = 0x20;
  return block;
}

/** A PAX record `"<len> key=value\n"`, where len counts the whole record. */
function paxRecord(key: string, value: string): string {
  const body = ` ${key}=${value}\n`;
  const bodyLength = encoder.encode(body).length;
  let length = bodyLength + 1;
  while (length !== bodyLength + String(length).length) length = bodyLength + String(length).length;
  return `${length}${body}`;
}

function padding(size: number): Uint8Array {
  const rest = size % BLOCK;
  return new Uint8Array(rest === 0 ? 0 : BLOCK - rest);
}

/** The tar stream of `entries`, ending with the two zero blocks. */
export async function* tarStream(entries: AsyncIterable<TarEntry> | Iterable<TarEntry>): AsyncGenerator<Uint8Array> {
  for await (const entry of entries) {
    const name = entry.type === 'directory' && !entry.name.endsWith('/') ? `${entry.name}/` : entry.name;
    const size = entry.type === 'file' ? entry.size : 0;
    const linkname = entry.type === 'symlink' ? entry.target : '';
    const split = splitUstarPath(name);
    const pax: string[] = [];
    if (!split) pax.push(paxRecord('path', name));
    if (encoder.encode(linkname).length > 100) pax.push(paxRecord('linkpath', linkname));
    if (!fitsOctal(size, 12)) pax.push(paxRecord('size', String(size)));
    if (pax.length > 0) {
      const data = encoder.encode(pax.join(''));
      const paxName = `PaxHeader/${name.replace(/\/$/, '').split('/').pop() ?? 'entry'}`.slice(0, 99);
      yield header({ name: paxName, prefix: '', mode: 0o644, size: data.length, mtime: entry.mtime, typeflag: 'x', linkname: '' });
      yield data;
      yield padding(data.length);
    }
    yield header({
      name: split ? split.name : name.slice(-100),
      prefix: split ? split.prefix : '',
      mode: entry.mode,
      size: fitsOctal(size, 12) ? size : 0,
      mtime: entry.mtime,
      typeflag: entry.type === 'directory' ? '5' : entry.type === 'symlink' ? '2' : '0',
      linkname: encoder.encode(linkname).length > 100 ? '' : linkname,
    });
    if (entry.type === 'file') {
      let written = 0;
      for await (const chunk of entry.content) {
        written += chunk.length;
        if (written > size) throw new Error(`${entry.name} grew while it was being packed`);
        yield chunk;
      }
      if (written !== size) throw new Error(`${entry.name} changed while it was being packed (${written} of ${size} bytes)`);
      yield padding(size);
    }
  }
  yield new Uint8Array(BLOCK * 2);
}

/** gzip-compresses a byte stream with the platform's CompressionStream (Node and browsers). */
export function gzip(source: AsyncIterable<Uint8Array>): ReadableStream<Uint8Array> {
  const iterator = source[Symbol.asyncIterator]();
  const input = new ReadableStream<Uint8Array>({
    async pull(controller) {
      try {
        const { value, done } = await iterator.next();
        if (done) controller.close();
        else controller.enqueue(value);
      } catch (error) {
        controller.error(error);
      }
    },
    async cancel(reason) {
      await iterator.return?.(reason);
    },
  });
  return input.pipeThrough(new CompressionStream('gzip') as unknown as TransformStream<Uint8Array, Uint8Array>);
}
