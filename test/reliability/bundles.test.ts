/**
 * Hostile bundles the builder tests (test/builder/bundle-*.test.ts) do not already try: sparse
 * files (GNU 'S' entries with a huge real size, PAX GNU.sparse.* headers of format 0.1 and
 * 1.0) and sizes announced out of band (a PAX `size` record, a base-256 size field), which must
 * never become a huge (or huge sparse) file on disk. Traversal, absolute names, symlink and
 * hard-link escapes, devices and FIFOs, size/count/depth bounds and gzip and zip bombs are
 * covered there.
 */
import assert from 'node:assert/strict';
import { readdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { test } from 'node:test';
import { gzipSync } from 'node:zlib';
import { isCocoonError } from '../../src/common/errors.ts';
import { unpackBundle, type BundleLimits } from '../../src/builder/bundle.ts';
import { DOCKERFILE, tarEntry, tree, workDir } from '../builder/bundle-fixtures.ts';

const TIB = 2 ** 40;

/** Writes `value` as a NUL-terminated octal field and recomputes the header checksum. */
function setOctal(block: Buffer, offset: number, length: number, value: number): void {
  block.write(value.toString(8).padStart(length - 1, '0') + '\0', offset, length, 'latin1');
}

function checksum(block: Buffer): void {
  block.fill(0x20, 148, 156);
  let sum = 0;
  for (const byte of block) sum += byte;
  block.write(sum.toString(8).padStart(6, '0') + '\0 ', 148, 8, 'latin1');
}

/** A PAX extended header ('x') with these records, for the entry after it. */
function pax(records: Record<string, string>): Buffer {
  let body = '';
  for (const [key, value] of Object.entries(records)) {
    const rest = ` ${key}=${value}\n`;
    let n = rest.length + 1;
    while (`${n}${rest}`.length !== n) n = `${n}${rest}`.length;
    body += `${n}${rest}`;
  }
  return tarEntry({ path: 'PaxHeaders/x', type: 'ExtendedHeader', data: body });
}

/** An old-GNU sparse entry ('S'): `data` holds the stored pieces, the header claims `realSize`. */
function gnuSparse(path: string, data: Buffer, realSize: number): Buffer {
  const entry = tarEntry({ path, type: 'SparseFile', data });
  const block = entry.subarray(0, 512);
  block.write('ustar  \0', 257, 8, 'latin1'); // old GNU magic
  // One sparse map record at offset 386: the data sits at realSize - data.length.
  setOctal(block, 386, 12, realSize - data.length);
  setOctal(block, 398, 12, data.length);
  setOctal(block, 483, 12, realSize); // realsize
  checksum(block);
  return entry;
}

function archive(...parts: Buffer[]): Buffer {
  return gzipSync(Buffer.concat([...parts, Buffer.alloc(1024)]));
}

function chunked(data: Buffer): Readable {
  return Readable.from([data]);
}

/** Every regular file under `dir` and its size and allocated bytes. */
async function files(dir: string): Promise<Array<{ name: string; size: number; allocated: number }>> {
  const out = [];
  for (const name of await tree(dir)) {
    if (name.endsWith('/') || name.endsWith('@')) continue;
    const st = await stat(join(dir, name));
    out.push({ name, size: st.size, allocated: st.blocks * 512 });
  }
  return out;
}

/**
 * Unpacks `bundle`: either it is refused as invalid_bundle with nothing left behind, or it
 * unpacks and no file on disk is larger (in size or allocation) than the bytes the archive
 * carried. Answers which.
 */
async function refusedOrSmall(t: Parameters<typeof workDir>[0], bundle: Buffer, limits: Partial<BundleLimits> = {}): Promise<'refused' | Array<{ name: string; size: number }>> {
  const { parent, dest } = await workDir(t);
  try {
    await unpackBundle(chunked(bundle), dest, { limits });
  } catch (error) {
    assert.ok(isCocoonError(error, 'invalid_bundle'), `expected invalid_bundle, got ${String(error)}`);
    assert.equal(error.status, 400);
    assert.deepEqual(await readdir(parent), [], 'nothing left behind');
    return 'refused';
  }
  const found = await files(dest);
  const carried = bundle.length * 1032; // deflate's largest ratio
  for (const f of found) {
    assert.ok(f.size < 1024 * 1024 && f.size <= carried, `${f.name}: ${f.size} bytes on disk`);
    assert.ok(f.allocated <= Math.max(f.size, 4096) * 2, `${f.name}: ${f.allocated} bytes allocated`);
  }
  return found.map(({ name, size }) => ({ name, size }));
}

test('an old-GNU sparse entry claiming a terabyte is refused', async (t) => {
  const result = await refusedOrSmall(t, archive(tarEntry(DOCKERFILE), gnuSparse('huge.img', Buffer.from('tail'), TIB)));
  assert.equal(result, 'refused');
});

test('PAX GNU.sparse 0.1 and 1.0 headers never make a huge (or sparse) file', async (t) => {
  // Format 0.1: the map is in the header; the entry's data is just the stored pieces.
  const v01 = archive(
    tarEntry(DOCKERFILE),
    pax({ 'GNU.sparse.numblocks': '1', 'GNU.sparse.map': `${TIB - 4},4`, 'GNU.sparse.size': String(TIB), 'GNU.sparse.name': 'huge.img' }),
    tarEntry({ path: 'GNUSparseFile.0/huge.img', data: 'tail' }),
  );
  const a = await refusedOrSmall(t, v01);
  if (a !== 'refused') assert.ok(a.every((f) => f.size <= 4096), JSON.stringify(a));
  // Format 1.0: the map is at the start of the data, in 512-byte blocks.
  const map = Buffer.alloc(512);
  map.write(`1\n${TIB - 4}\n4\n`, 'latin1');
  const v10 = archive(
    tarEntry(DOCKERFILE),
    pax({ 'GNU.sparse.major': '1', 'GNU.sparse.minor': '0', 'GNU.sparse.name': 'huge.img', 'GNU.sparse.realsize': String(TIB) }),
    tarEntry({ path: 'GNUSparseFile.0/huge.img', data: Buffer.concat([map, Buffer.from('tail')]) }),
  );
  const b = await refusedOrSmall(t, v10);
  if (b !== 'refused') assert.ok(b.every((f) => f.size <= 4096), JSON.stringify(b));
});

test('a size announced in a PAX record or in base-256 is checked against the limits before any byte', async (t) => {
  for (const size of [TIB, 2 ** 53, 5 * 1024 * 1024]) {
    const withPax = archive(tarEntry(DOCKERFILE), pax({ size: String(size) }), tarEntry({ path: 'big', data: 'x' }));
    assert.equal(await refusedOrSmall(t, withPax, { maxFileBytes: 1024 * 1024 }), 'refused', `PAX size ${size}`);
  }
  // A header size beyond the octal field: tar writes it in base-256.
  const base256 = archive(tarEntry(DOCKERFILE), tarEntry({ path: 'big', data: 'x', size: TIB }).subarray(0, 512), Buffer.alloc(512));
  assert.equal(await refusedOrSmall(t, base256), 'refused');
  // A negative PAX size, and ones that are not plain decimals (tar's Number() reads '1e3' and
  // '0x10': the file then takes that many bytes of what follows in the archive, within limits).
  for (const size of ['-1', 'NaN', '1e3', '0x10', '']) {
    const odd = archive(tarEntry(DOCKERFILE), pax({ size }), tarEntry({ path: 'odd', data: 'x' }));
    await refusedOrSmall(t, odd);
  }
});

test('a GNU long name (L) or long link (K) entry that is huge is refused, not buffered', async (t) => {
  const longName = tarEntry({ path: '././@LongLink', type: 'NextFileHasLongPath', data: Buffer.alloc(2 * 1024 * 1024, 'a') });
  assert.equal(await refusedOrSmall(t, archive(tarEntry(DOCKERFILE), longName, tarEntry({ path: 'x', data: 'x' }))), 'refused');
  const longLink = tarEntry({ path: '././@LongLink', type: 'NextFileHasLongLinkpath', data: Buffer.alloc(2 * 1024 * 1024, 'b') });
  assert.equal(await refusedOrSmall(t, archive(tarEntry(DOCKERFILE), longLink, tarEntry({ path: 'l', type: 'SymbolicLink', linkpath: 'x' }))), 'refused');
});
