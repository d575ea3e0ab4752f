import assert from 'node:assert/strict';
import { mkdtemp, readdir, rm, stat, writeFile, mkdir } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, relative, sep } from 'node:path';
import { Readable } from 'node:stream';
import { test } from 'node:test';
import fc from 'fast-check';
import { isCocoonError } from '../../src/common/errors.ts';
import { isValidObjectKey } from '../../src/objectstore/keys.ts';
import { objectStoreFromEnv } from '../../src/objectstore/factory.ts';
import { LocalObjectStore } from '../../src/objectstore/local.ts';
import { S3ObjectStore } from '../../src/objectstore/s3.ts';

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

// The cases every object store shares (round trip, size bound, failing source, atomic visibility,
// move, bad keys) are in test/conformance/object-store.test.ts; here what only the directory has.

test('an object is a private file at its key under the root; a move is a rename', async (t) => {
  const store = await tempStore(t);
  await store.put('bundles/a/b.bin', Readable.from([Buffer.from('x')]), { maxBytes: 10 });
  assert.equal((await stat(store.pathOf('bundles/a/b.bin'))).mode & 0o777, 0o600);
  const before = (await stat(store.pathOf('bundles/a/b.bin'))).ino;
  await store.move('bundles/a/b.bin', 'bundles/c.bin');
  assert.equal((await stat(store.pathOf('bundles/c.bin'))).ino, before, 'the same file, renamed');
  assert.deepEqual(await listFiles(store.root), ['bundles/c.bin']);
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
