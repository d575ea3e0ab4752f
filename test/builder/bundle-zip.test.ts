import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { chmod, mkdir, readdir, readFile, readlink, stat, symlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { test } from 'node:test';
import { promisify } from 'node:util';
import { isCocoonError } from '../../src/common/errors.ts';
import { unpackBundle, type BundleLimits } from '../../src/builder/bundle.ts';
import { tree, workDir, ZIP_DOCKERFILE, zipArchive, type ZipSpec } from './bundle-fixtures.ts';

function chunked(data: Buffer, size = 4096): Readable {
  return Readable.from((function* () {
    for (let i = 0; i < data.length; i += size) yield data.subarray(i, i + size);
  })());
}

async function expectInvalid(
  t: Parameters<typeof workDir>[0],
  archive: Buffer,
  reason: RegExp,
  limits: Partial<BundleLimits> = {},
): Promise<void> {
  const { parent, dest } = await workDir(t);
  await assert.rejects(unpackBundle(chunked(archive), dest, { limits }), (error) => {
    assert.ok(isCocoonError(error, 'invalid_bundle'), `expected invalid_bundle, got ${String(error)}`);
    assert.equal(error.status, 400);
    assert.match(error.message, reason);
    return true;
  });
  assert.deepEqual(await readdir(parent), [], 'no directory, spool or temp file left behind');
}

const zip = (...entries: ZipSpec[]) => zipArchive([ZIP_DOCKERFILE, ...entries]);

test('a zip with stored and deflated files, directories, an executable and an inside symlink', async (t) => {
  const { parent, dest } = await workDir(t);
  const archive = zip(
    { name: 'src/' },
    { name: 'src/main.py', data: 'print("hi")\n'.repeat(500), method: 'deflate' },
    { name: 'src/raw.bin', data: Buffer.alloc(70_000, 3), method: 'store' },
    { name: 'run.sh', data: '#!/bin/sh\n', unixMode: 0o104755 },
    { name: 'main-link', data: 'src/main.py', unixMode: 0o120777, method: 'store' },
    { name: 'win/notes.txt', data: 'from windows', host: 0 },
  );
  const result = await unpackBundle(chunked(archive, 999), dest);
  assert.equal(result.format, 'zip');
  assert.equal(result.compressedBytes, archive.length);
  assert.deepEqual(await tree(dest), [
    'Dockerfile', 'main-link@', 'run.sh', 'src/', 'src/main.py', 'src/raw.bin', 'win/', 'win/notes.txt',
  ]);
  assert.equal(await readlink(join(dest, 'main-link')), 'src/main.py');
  assert.equal((await readFile(join(dest, 'main-link'), 'utf8')).length, 12 * 500);
  assert.equal((await stat(join(dest, 'run.sh'))).mode & 0o7777, 0o755, 'setuid dropped, exec kept');
  assert.equal((await stat(join(dest, 'src/raw.bin'))).size, 70_000);
  assert.deepEqual((await readdir(parent)).sort(), ['ctx'], 'the spool file is gone');
});

test('a zip made by the zip tool (data descriptors, extra fields, stored symlinks)', async (t) => {
  const { parent, dest } = await workDir(t);
  const zipTool = await promisify(execFile)('zip', ['-v']).then(() => true, () => false);
  if (!zipTool) {
    t.skip('no zip command on this machine');
    return;
  }
  const src = join(parent, 'src');
  await mkdir(join(src, 'app'), { recursive: true });
  await writeFile(join(src, 'Dockerfile'), 'FROM busybox\n');
  await writeFile(join(src, 'app', 'server.js'), 'console.log(1)\n'.repeat(1000));
  await writeFile(join(src, 'app', 'start'), '#!/bin/sh\n');
  await chmod(join(src, 'app', 'start'), 0o755);
  await symlink('server.js', join(src, 'app', 'index.js'));
  const archivePath = join(parent, 'bundle.zip');
  // -y stores symlinks as links; reading from a pipe (-) forces data descriptors.
  await promisify(execFile)('sh', ['-c', `cd "${src}" && zip -q -r -y - . > "${archivePath}"`]);
  const result = await unpackBundle(chunked(await readFile(archivePath)), dest);
  assert.equal(result.format, 'zip');
  assert.deepEqual(await tree(dest), ['Dockerfile', 'app/', 'app/index.js@', 'app/server.js', 'app/start']);
  assert.equal((await stat(join(dest, 'app', 'start'))).mode & 0o111, 0o111);
});

test('hostile names are refused', async (t) => {
  await expectInvalid(t, zip({ name: 'x/../../etc', data: 'x' }), /entry 'x\/\.\.\/\.\.\/etc' escapes the bundle/);
  await expectInvalid(t, zip({ name: '/etc/passwd', data: 'x' }), /absolute path/);
  await expectInvalid(t, zip({ name: 'C:/Windows/x', data: 'x' }), /Windows absolute path/);
  // Windows tools write '\' between directories; yauzl reads it as '/', so this climbs too.
  await expectInvalid(t, zip({ name: '..\\..\\evil', data: 'x' }), /entry '\.\.\/\.\.\/evil' escapes the bundle/);
  await expectInvalid(t, zip({ name: 'a\u0000b', data: 'x' }), /NUL/);
  await expectInvalid(t, zip({ name: 'Dockerfile', data: 'again' }), /appears more than once/);
});

test('symlink escapes and special files are refused', async (t) => {
  await expectInvalid(t, zip({ name: 'out', data: '../../../etc/shadow', unixMode: 0o120777 }), /symlink 'out' points outside the bundle/);
  await expectInvalid(t, zip({ name: 'abs', data: '/etc', unixMode: 0o120777 }), /absolute path/);
  await expectInvalid(t, zip({ name: 'l', data: 'sub', unixMode: 0o120777 }, { name: 'l/x', data: 'x' }), /inside 'l', which is a symlink/);
  await expectInvalid(t, zip({ name: 'tty', unixMode: 0o020644 }), /entry 'tty' is a character device/);
  await expectInvalid(t, zip({ name: 'sock', unixMode: 0o140755 }), /is a socket/);
  await expectInvalid(t, zip({ name: 'fifo', unixMode: 0o010644 }), /is a FIFO/);
  await expectInvalid(t, zip({ name: 'long', data: 'a/'.repeat(600), unixMode: 0o120777 }), /target longer than/);
});

test('broken, encrypted, exotic or lying entries are refused', async (t) => {
  await expectInvalid(t, zip({ name: 'secret', data: 'x', encrypted: true }), /encrypted/);
  await expectInvalid(t, zip({ name: 'bz', data: 'x', method: 12 }), /compression method 12; use deflate or store/);
  await expectInvalid(t, zip({ name: 'crc', data: 'hello', crc: 1234 }), /entry 'crc' is damaged \(CRC-32 mismatch\)/);
  // Says 10 bytes, inflates to 100 000: yauzl stops at the announced size.
  await expectInvalid(t, zip({ name: 'liar', data: Buffer.alloc(100_000), declaredSize: 10 }), /entry 'liar' is damaged/);
  const good = zip({ name: 'a', data: 'x' });
  await expectInvalid(t, good.subarray(0, good.length - 10), /not a valid zip archive/);
  await expectInvalid(t, zipArchive([{ name: 'app.js', data: 'x' }]), /no Dockerfile at its root/);
  await expectInvalid(t, zipArchive([{ name: 'proj/Dockerfile', data: 'FROM x' }]), /found 'proj\/Dockerfile'/);
  await expectInvalid(t, zipArchive([]), /no Dockerfile/);
});

test('size and count bounds hold for zips, including a zip bomb', async (t) => {
  await expectInvalid(t, zip({ name: 'a', data: Buffer.alloc(5000) }), /larger than 100 bytes/, { maxCompressedBytes: 100 });
  // 50 MiB of zeros deflate to ~50 KiB; the announced size alone stops it before inflating.
  const bomb = zip({ name: 'zeros', data: Buffer.alloc(50 * 1024 * 1024) });
  await expectInvalid(t, bomb, /file 'zeros' is 52428800 bytes; the limit for one file is 1048576 bytes/, { maxFileBytes: 1024 * 1024 });
  await expectInvalid(t, bomb, /unpacks to more than 1048576 bytes/, { maxUncompressedBytes: 1024 * 1024 });
  const many = zipArchive([ZIP_DOCKERFILE, ...Array.from({ length: 12 }, (_, i) => ({ name: `f${i}`, data: 'x' }))]);
  await expectInvalid(t, many, /more than 10 entries/, { maxEntries: 10 });
  await expectInvalid(t, zip({ name: 'a/b/c/d', data: 'x' }), /4 directories deep; the limit is 3/, { maxPathDepth: 3 });
});
