import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { chmod, lstat, mkdir, readdir, readFile, readlink, stat, symlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { test } from 'node:test';
import { gzipSync } from 'node:zlib';
import { create as tarCreate } from 'tar';
import { isCocoonError } from '../../src/common/errors.ts';
import { unpackBundle, type BundleLimits } from '../../src/builder/bundle.ts';
import { DOCKERFILE, tarball, tarGz, tree, workDir, type TarSpec } from './bundle-fixtures.ts';

function chunked(data: Buffer, size = 4096): Readable {
  return Readable.from((function* () {
    for (let i = 0; i < data.length; i += size) yield data.subarray(i, i + size);
  })());
}

/** Unpacking `archive` must fail with invalid_bundle matching `reason`, and leave nothing. */
async function expectInvalid(
  t: Parameters<typeof workDir>[0],
  archive: Buffer,
  reason: RegExp,
  limits: Partial<BundleLimits> = {},
): Promise<void> {
  const { parent, dest } = await workDir(t);
  await assert.rejects(
    unpackBundle(chunked(archive), dest, { limits }),
    (error) => {
      assert.ok(isCocoonError(error, 'invalid_bundle'), `expected invalid_bundle, got ${String(error)}`);
      assert.equal(error.status, 400);
      assert.match(error.message, reason);
      return true;
    },
  );
  assert.deepEqual(await readdir(parent), [], 'no directory or temp file left behind');
}

test('a real tar.gz made by the tar package unpacks with files, modes and an inside symlink', async (t) => {
  const { parent } = await workDir(t);
  const src = join(parent, 'src');
  await mkdir(join(src, 'app', 'lib'), { recursive: true });
  await writeFile(join(src, 'Dockerfile'), 'FROM busybox\nCOPY app /app\n');
  await writeFile(join(src, 'app', 'lib', 'util.js'), 'export const x = 1;\n');
  await writeFile(join(src, 'app', 'run.sh'), '#!/bin/sh\necho hi\n');
  await chmod(join(src, 'app', 'run.sh'), 0o4755); // setuid must not survive
  await symlink('lib/util.js', join(src, 'app', 'current.js'));
  await mkdir(join(src, 'empty'));
  const archivePath = join(parent, 'bundle.tar.gz');
  await tarCreate({ gzip: true, cwd: src, file: archivePath, portable: true }, ['.']);
  const archive = await readFile(archivePath);

  const dest = join(parent, 'ctx');
  const result = await unpackBundle(chunked(archive, 1000), dest);
  assert.equal(result.dir, dest);
  assert.equal(result.format, 'tar.gz');
  assert.equal(result.sha256, createHash('sha256').update(archive).digest('hex'));
  assert.equal(result.compressedBytes, archive.length);
  assert.equal(result.fileCount, 3);
  assert.deepEqual(await tree(dest), [
    'Dockerfile', 'app/', 'app/current.js@', 'app/lib/', 'app/lib/util.js', 'app/run.sh', 'empty/',
  ]);
  assert.equal(await readFile(join(dest, 'app', 'current.js'), 'utf8'), 'export const x = 1;\n');
  assert.equal(await readlink(join(dest, 'app', 'current.js')), 'lib/util.js');
  assert.equal((await stat(join(dest, 'app', 'run.sh'))).mode & 0o7777, 0o755);
  assert.equal((await stat(join(dest, 'Dockerfile'))).mode & 0o7777, 0o644);
});

test('hand-made entries: implicit parents, hard link to an earlier file, a large file in many chunks', async (t) => {
  const { dest } = await workDir(t);
  const big = Buffer.alloc(3 * 1024 * 1024 + 17, 'z');
  const archive = tarGz([
    DOCKERFILE,
    { path: 'deep/er/file.txt', data: 'hello' },
    { path: 'deep/er/same.txt', type: 'Link', linkpath: 'deep/er/file.txt' },
    { path: 'big.bin', data: big },
    { path: './dot/./slash//x', data: 'normalised' },
  ]);
  const result = await unpackBundle(chunked(archive, 777), dest);
  assert.equal(result.uncompressedBytes, DOCKERFILE.data!.length + 5 + big.length + 'normalised'.length);
  assert.equal(await readFile(join(dest, 'deep/er/same.txt'), 'utf8'), 'hello');
  assert.equal((await stat(join(dest, 'deep/er/same.txt'))).ino, (await stat(join(dest, 'deep/er/file.txt'))).ino);
  assert.equal((await stat(join(dest, 'big.bin'))).size, big.length);
  assert.equal(await readFile(join(dest, 'dot/slash/x'), 'utf8'), 'normalised');
});

test('path traversal and absolute names are refused', async (t) => {
  await expectInvalid(t, tarGz([DOCKERFILE, { path: 'x/../../etc', data: 'x' }]), /entry 'x\/\.\.\/\.\.\/etc' escapes the bundle/);
  await expectInvalid(t, tarGz([DOCKERFILE, { path: '../evil', data: 'x' }]), /escapes the bundle/);
  await expectInvalid(t, tarGz([DOCKERFILE, { path: 'a/../b', data: 'x' }]), /contains '\.\.'/);
  await expectInvalid(t, tarGz([DOCKERFILE, { path: '/etc/cron.d/x', data: 'x' }]), /absolute path/);
  await expectInvalid(t, tarGz([DOCKERFILE, { path: 'dir\\..\\x', data: 'x' }]), /uses '\\'/);
});

test('symlinks that lead outside are refused, however they get there', async (t) => {
  await expectInvalid(t, tarGz([DOCKERFILE, { path: 'out', type: 'SymbolicLink', linkpath: '../../etc' }]), /symlink 'out' points outside the bundle/);
  await expectInvalid(t, tarGz([DOCKERFILE, { path: 'abs', type: 'SymbolicLink', linkpath: '/etc/passwd' }]), /absolute path/);
  // Each link looks harmless alone; followed, e -> d/d/.. climbs above the root.
  await expectInvalid(t, tarGz([
    DOCKERFILE,
    { path: 'd', type: 'SymbolicLink', linkpath: '.' },
    { path: 'e', type: 'SymbolicLink', linkpath: 'd/d/..' },
  ]), /symlink 'e' resolves outside the bundle/);
  await expectInvalid(t, tarGz([
    DOCKERFILE,
    { path: 'a', type: 'SymbolicLink', linkpath: 'b' },
    { path: 'b', type: 'SymbolicLink', linkpath: 'a' },
  ]), /loop/);
  // Writing through a symlink, even one pointing inside, is refused.
  await expectInvalid(t, tarGz([
    DOCKERFILE,
    { path: 'sub/', type: 'Directory' },
    { path: 'lnk', type: 'SymbolicLink', linkpath: 'sub' },
    { path: 'lnk/x', data: 'x' },
  ]), /entry 'lnk\/x' is inside 'lnk', which is a symlink/);
  // A symlink replacing an earlier directory is refused as a duplicate.
  await expectInvalid(t, tarGz([
    DOCKERFILE,
    { path: 'sub/', type: 'Directory' },
    { path: 'sub', type: 'SymbolicLink', linkpath: '.' },
  ]), /appears more than once/);
});

test('hard links must point to a file already in the bundle', async (t) => {
  await expectInvalid(t, tarGz([DOCKERFILE, { path: 'pw', type: 'Link', linkpath: '../../etc/passwd' }]), /hard link target '\.\.\/\.\.\/etc\/passwd' escapes the bundle/);
  await expectInvalid(t, tarGz([DOCKERFILE, { path: 'pw', type: 'Link', linkpath: '/etc/passwd' }]), /absolute path/);
  await expectInvalid(t, tarGz([DOCKERFILE, { path: 'pw', type: 'Link', linkpath: 'later' }, { path: 'later', data: 'x' }]), /not a file earlier in the bundle/);
  await expectInvalid(t, tarGz([
    DOCKERFILE,
    { path: 'lnk', type: 'SymbolicLink', linkpath: 'Dockerfile' },
    { path: 'hl', type: 'Link', linkpath: 'lnk' },
  ]), /not a file earlier/);
});

test('devices and FIFOs are refused', async (t) => {
  await expectInvalid(t, tarGz([DOCKERFILE, { path: 'dev/sda', type: 'BlockDevice' }]), /entry 'dev\/sda' is a block device/);
  await expectInvalid(t, tarGz([DOCKERFILE, { path: 'null', type: 'CharacterDevice' }]), /is a character device/);
  await expectInvalid(t, tarGz([DOCKERFILE, { path: 'pipe', type: 'FIFO' }]), /is a FIFO/);
});

test('a Dockerfile must be a file at the root', async (t) => {
  await expectInvalid(t, tarGz([{ path: 'app.js', data: 'x' }]), /no Dockerfile at its root$/);
  await expectInvalid(t, tarGz([{ path: 'myapp/Dockerfile', data: 'FROM x' }]), /found 'myapp\/Dockerfile'; pack the folder's contents/);
  await expectInvalid(t, tarGz([{ path: 'real', data: 'FROM x' }, { path: 'Dockerfile', type: 'SymbolicLink', linkpath: 'real' }]), /is a symlink/);
  await expectInvalid(t, tarGz([{ path: 'Dockerfile/', type: 'Directory' }]), /directory named Dockerfile/);
  await expectInvalid(t, tarGz([]), /no Dockerfile/);
});

test('what is not a gzip-compressed tar is refused by its bytes, whatever it is called', async (t) => {
  await expectInvalid(t, Buffer.from('FROM busybox\n'), /neither a gzip-compressed tar nor a zip \(it starts with bytes 46 52 4f 4d\)/);
  await expectInvalid(t, tarball([DOCKERFILE]), /neither a gzip-compressed tar nor a zip/);
  await expectInvalid(t, Buffer.alloc(0), /the bundle is empty/);
  await expectInvalid(t, gzipSync(Buffer.from('just some text, not a tar archive at all '.repeat(30))), /not a valid tar archive/);
  await expectInvalid(t, gzipSync(tarGz([DOCKERFILE])), /compressed twice/);
  const good = tarGz([DOCKERFILE, { path: 'a.txt', data: Buffer.alloc(10_000, 'a') }]);
  await expectInvalid(t, good.subarray(0, good.length - 30), /not a valid gzip stream/);
  const corrupted = Buffer.from(good);
  corrupted[40] = (corrupted[40] as number) ^ 0xff;
  await expectInvalid(t, corrupted, /not a valid (gzip stream|tar archive)/);
});

test('size, count, depth and length bounds hold', async (t) => {
  const archive = tarGz([DOCKERFILE, { path: 'a.bin', data: Buffer.alloc(50_000, 1) }]);
  await expectInvalid(t, archive, /larger than 100 bytes/, { maxCompressedBytes: 100 });
  await expectInvalid(t, archive, /file 'a\.bin' is 50000 bytes; the limit for one file is 40000 bytes/, { maxFileBytes: 40_000 });
  await expectInvalid(t, archive, /unpacks to more than 30000 bytes/, { maxUncompressedBytes: 30_000 });
  const many: TarSpec[] = [DOCKERFILE, ...Array.from({ length: 30 }, (_, i) => ({ path: `f${i}`, data: 'x' }))];
  await expectInvalid(t, tarGz(many), /more than 20 entries/, { maxEntries: 20 });
  await expectInvalid(t, tarGz([DOCKERFILE, { path: 'a/b/c/d/e/f.txt', data: 'x' }]), /6 directories deep; the limit is 5/, { maxPathDepth: 5 });
  await expectInvalid(t, tarGz([DOCKERFILE, { path: `${'n'.repeat(60)}/${'m'.repeat(30)}`, data: 'x' }]), /path longer than 64 bytes/, { maxPathLength: 64 });
  await expectInvalid(t, tarGz([DOCKERFILE, { path: 'same.txt', data: 'x' }, { path: 'same.txt', data: 'y' }]), /'same\.txt' appears more than once/);
});

test('a gzip bomb stops at the uncompressed bound', async (t) => {
  // 64 MiB of zeros compress to ~64 KiB; tar sees end-of-archive blocks, then endless padding.
  const bomb = gzipSync(Buffer.alloc(64 * 1024 * 1024));
  const started = Date.now();
  await expectInvalid(t, bomb, /unpacks to more than 1048576 bytes/, { maxUncompressedBytes: 1024 * 1024, maxEntries: 10 });
  assert.ok(Date.now() - started < 2000, 'stopped early, not after inflating everything');
  // The same inside a file entry that claims to be small.
  const fileBomb = gzipSync(Buffer.concat([tarball([DOCKERFILE]).subarray(0, 1024), tarball([{ path: 'zeros', data: Buffer.alloc(8 * 1024 * 1024) }])]));
  await expectInvalid(t, fileBomb, /unpacks to more than|limit for one file/, { maxUncompressedBytes: 1024 * 1024 });
});

test('a content hash that does not match the name is refused', async (t) => {
  const { parent, dest } = await workDir(t);
  await assert.rejects(unpackBundle(chunked(tarGz([DOCKERFILE])), dest, { expectedSha256: '0'.repeat(64) }), /does not match its name/);
  assert.deepEqual(await readdir(parent), []);
});

test('a source that fails mid-way, or an existing destination, leave nothing behind', async (t) => {
  const { parent, dest } = await workDir(t);
  const archive = tarGz([DOCKERFILE, { path: 'big', data: Buffer.alloc(200_000, 7) }]);
  const failing = Readable.from((async function* () {
    yield archive.subarray(0, 5000);
    throw new Error('connection reset by peer');
  })());
  await assert.rejects(unpackBundle(failing, dest), (e) => isCocoonError(e, 'bundle_unpack_failed') && /connection reset/.test(e.message));
  assert.deepEqual(await readdir(parent), []);

  await mkdir(dest);
  await assert.rejects(unpackBundle(chunked(archive), dest), (e) => isCocoonError(e, 'bundle_unpack_failed') && /already exists/.test(e.message));
  assert.deepEqual(await readdir(dest), [], 'an existing directory is not touched');
  assert.ok((await lstat(dest)).isDirectory());
});
