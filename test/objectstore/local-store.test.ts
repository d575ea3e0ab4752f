import assert from 'node:assert/strict';
import { mkdtemp, readdir, rm, stat, writeFile, mkdir } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, relative, sep } from 'node:path';
import { PassThrough, Readable } from 'node:stream';
import { test } from 'node:test';
import fc from 'fast-check';
import { isCocoonError } from '../../src/common/errors.ts';
import { isValidObjectKey } from '../../src/objectstore/keys.ts';
import { objectStoreFromEnv } from '../../src/objectstore/factory.ts';
import { LocalObjectStore } from '../../src/objectstore/local.ts';
import { S3ObjectStore } from '../../src/objectstore/s3.ts';
import { chunked, failingAfter, readAll, sha256 } from './stream-helpers.ts';

async function tempStore(t: { after: (fn: () => Promise<void>) => void }): Promise<LocalObjectStore> {
  const dir = await mkdtemp(join(tmpdir(), 'cocoon-objects-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  return new LocalObjectStore(join(dir, 'objects'));
}

/** Every file under `dir`, relative, sorted. */
async function listFiles(dir: string): Promise<string[]> {
  const entries = await readdir(dir, { recursive: true, withFileTypes: true }).catch(() => []);
  return entries.filter((e) => !e.isDirectory()).map((e) => relative(dir, join(e.parentPath, e.name))).sort();
}

test('put, get, head, exists and delete round-trip with a streamed sha256', async (t) => {
  const store = await tempStore(t);
  const data = Buffer.alloc(300_000, 'cocoon');
  const result = await store.put('bundles/a/b.bin', chunked(data, 7_777), { maxBytes: 1_000_000 });
  assert.deepEqual(result, { key: 'bundles/a/b.bin', sha256: sha256(data), sizeBytes: data.length });

  assert.deepEqual(await readAll(await store.get('bundles/a/b.bin')), data);
  const info = await store.head('bundles/a/b.bin');
  assert.equal(info?.sizeBytes, data.length);
  assert.ok(info?.lastModified instanceof Date);
  assert.equal(await store.exists('bundles/a/b.bin'), true);
  assert.equal((await stat(store.pathOf('bundles/a/b.bin'))).mode & 0o777, 0o600);

  // A prefix is a directory, not an object.
  assert.equal(await store.head('bundles/a'), undefined);

  await store.delete('bundles/a/b.bin');
  assert.equal(await store.exists('bundles/a/b.bin'), false);
  await store.delete('bundles/a/b.bin'); // deleting twice is fine
  await assert.rejects(store.get('bundles/a/b.bin'), (e) => isCocoonError(e, 'object_not_found') && e.status === 404);
  assert.deepEqual(await listFiles(store.root), []);
});

test('an empty object and an overwrite', async (t) => {
  const store = await tempStore(t);
  const empty = await store.put('k', Readable.from([]), { maxBytes: 10 });
  assert.equal(empty.sizeBytes, 0);
  assert.equal(empty.sha256, sha256(Buffer.alloc(0)));
  await store.put('k', Readable.from([Buffer.from('second')]), { maxBytes: 10 });
  assert.equal((await readAll(await store.get('k'))).toString(), 'second');
});

test('a put over the size bound fails and leaves nothing behind', async (t) => {
  const store = await tempStore(t);
  await store.put('keep', Readable.from([Buffer.from('old')]), { maxBytes: 10 });
  await assert.rejects(
    store.put('big', chunked(Buffer.alloc(100_000), 1000), { maxBytes: 99_999 }),
    (e) => isCocoonError(e, 'object_too_large') && e.status === 413,
  );
  // Exactly at the bound is fine.
  await store.put('exact', chunked(Buffer.alloc(1000), 100), { maxBytes: 1000 });
  // Replacing an object with one too large keeps the old one.
  await assert.rejects(store.put('keep', chunked(Buffer.alloc(50)), { maxBytes: 10 }), (e) => isCocoonError(e, 'object_too_large'));
  assert.equal((await readAll(await store.get('keep'))).toString(), 'old');
  assert.deepEqual(await listFiles(store.root), ['exact', 'keep']);
});

test('a source that fails mid-way stores nothing', async (t) => {
  const store = await tempStore(t);
  await assert.rejects(
    store.put('x/y', failingAfter(Buffer.alloc(10_000), new Error('connection reset')), { maxBytes: 1e6 }),
    /connection reset/,
  );
  assert.equal(await store.exists('x/y'), false);
  assert.deepEqual(await listFiles(store.root), []);
});

test('nothing is visible under the key until the write completed', async (t) => {
  const store = await tempStore(t);
  const source = new PassThrough();
  const pending = store.put('slow', source, { maxBytes: 1e6 });
  source.write(Buffer.alloc(1000));
  await new Promise((resolve) => setTimeout(resolve, 20));
  assert.equal(await store.exists('slow'), false);
  source.end(Buffer.alloc(1000));
  await pending;
  assert.equal((await store.head('slow'))?.sizeBytes, 2000);
});

test('move renames atomically and refuses a missing source', async (t) => {
  const store = await tempStore(t);
  await store.put('uploads/tmp1', Readable.from([Buffer.from('payload')]), { maxBytes: 100 });
  await store.move('uploads/tmp1', 'bundles/final.zip');
  assert.equal(await store.exists('uploads/tmp1'), false);
  assert.equal((await readAll(await store.get('bundles/final.zip'))).toString(), 'payload');
  await assert.rejects(store.move('uploads/none', 'bundles/x'), (e) => isCocoonError(e, 'object_not_found'));
});

test('bad keys are refused before touching the filesystem', async (t) => {
  const store = await tempStore(t);
  const bad = [
    '', '/etc/passwd', '../escape', 'a/../../b', 'a//b', 'a/', './a', '.tmp/x', 'a/.hidden', '-rf',
    'a\\b', 'a b', 'ключ', 'a\u0000b', 'x'.repeat(513), `${'y'.repeat(256)}/z`,
  ];
  for (const key of bad) {
    await assert.rejects(
      store.put(key, Readable.from([Buffer.from('x')]), { maxBytes: 10 }),
      (e) => isCocoonError(e, 'invalid_object_key') && e.status === 400,
      `key ${JSON.stringify(key)} should be refused`,
    );
    await assert.rejects(store.get(key), (e) => isCocoonError(e, 'invalid_object_key'));
  }
  assert.deepEqual(await listFiles(store.root), []);
});

test('property: every valid key maps to a path strictly under the root', async (t) => {
  const store = await tempStore(t);
  const segment = fc.stringMatching(/^[A-Za-z0-9_.!*'()=+@,~\/-]{1,20}$/);
  fc.assert(
    fc.property(fc.array(segment, { minLength: 1, maxLength: 6 }), (parts) => {
      const key = parts.join('/');
      if (!isValidObjectKey(key)) return;
      const path = store.pathOf(key);
      const rel = relative(store.root, path);
      assert.ok(rel.length > 0 && !rel.startsWith('..') && !rel.startsWith(sep), `${key} → ${path}`);
      assert.equal(rel.split(sep).join('/'), key);
    }),
    { numRuns: 500 },
  );
});

test('get refuses a symlink planted under the root', async (t) => {
  const store = await tempStore(t);
  await mkdir(store.root, { recursive: true });
  await writeFile(join(store.root, 'real'), 'x');
  const { symlink } = await import('node:fs/promises');
  await symlink('/etc/hostname', join(store.root, 'link'));
  await assert.rejects(store.get('link'), (e) => isCocoonError(e, 'object_not_found'));
});

test('sweepTemp removes only stale temp files', async (t) => {
  const store = await tempStore(t);
  await mkdir(join(store.root, '.tmp'), { recursive: true });
  await writeFile(join(store.root, '.tmp', 'old.part'), 'x');
  const { utimes } = await import('node:fs/promises');
  await utimes(join(store.root, '.tmp', 'old.part'), new Date(Date.now() - 2 * 3600_000), new Date(Date.now() - 2 * 3600_000));
  await writeFile(join(store.root, '.tmp', 'fresh.part'), 'y');
  assert.equal(await store.sweepTemp(), 1);
  assert.deepEqual(await readdir(join(store.root, '.tmp')), ['fresh.part']);
});

test('objectStoreFromEnv picks S3 when a bucket is configured, else the data directory', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'cocoon-objects-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const local = objectStoreFromEnv({ COCOON_DATA_DIR: dir });
  assert.ok(local instanceof LocalObjectStore);
  assert.equal(local.root, join(dir, 'objects'));
  const s3 = objectStoreFromEnv({ COCOON_S3_BUCKET: 'bucket-1', COCOON_S3_ENDPOINT: 'http://127.0.0.1:1' });
  assert.ok(s3 instanceof S3ObjectStore);
  assert.equal(s3.describe('k'), 's3://bucket-1/k');
  s3.destroy();
});
