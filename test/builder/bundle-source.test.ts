import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtemp, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { test } from 'node:test';
import { isCocoonError } from '../../src/common/errors.ts';
import { unpackBundle } from '../../src/builder/bundle.ts';
import { openBundle, storeBundle } from '../../src/builder/bundle-source.ts';
import { parseBundleRef } from '../../src/objectstore/bundle-ref.ts';
import { LocalObjectStore } from '../../src/objectstore/local.ts';
import { S3ObjectStore } from '../../src/objectstore/s3.ts';
import { startS3rver } from '../objectstore/s3rver-server.ts';
import { sha256 } from '../objectstore/stream-helpers.ts';
import { DOCKERFILE, tarGz, tree, zipArchive, ZIP_DOCKERFILE } from './bundle-fixtures.ts';

async function tempDir(t: { after: (fn: () => Promise<void>) => void }): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'cocoon-bundle-source-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

test('an uploaded bundle is stored by content hash and builds from its URI', async (t) => {
  const dir = await tempDir(t);
  const store = new LocalObjectStore(join(dir, 'objects'));
  const archive = tarGz([DOCKERFILE, { path: 'app.txt', data: 'hello' }]);
  const stored = await storeBundle(store, Readable.from([archive]));
  const hash = sha256(archive);
  assert.deepEqual(stored, {
    uri: `cocoon://bundles/${hash}.tar.gz`, sha256: hash, sizeBytes: archive.length, format: 'tar.gz', key: `bundles/${hash}.tar.gz`,
  });
  // The same bytes again: same URI, stored once, no upload left over.
  assert.deepEqual(await storeBundle(store, Readable.from([archive])), stored);
  assert.deepEqual(await readdir(join(dir, 'objects', 'bundles')), [`${hash}.tar.gz`]);
  assert.deepEqual(await readdir(join(dir, 'objects', 'uploads')), []);

  const { stream, expectedSha256 } = await openBundle(parseBundleRef(stored.uri), { objects: store });
  assert.equal(expectedSha256, hash);
  const ctx = join(dir, 'ctx');
  const unpacked = await unpackBundle(stream, ctx, { expectedSha256 });
  assert.deepEqual(await tree(ctx), ['Dockerfile', 'app.txt']);
  assert.equal(unpacked.sha256, hash);

  const zip = zipArchive([ZIP_DOCKERFILE]);
  assert.equal((await storeBundle(store, Readable.from([zip]))).format, 'zip');
});

test('uploads that are not bundles, or too large, store nothing', async (t) => {
  const dir = await tempDir(t);
  const store = new LocalObjectStore(join(dir, 'objects'));
  await assert.rejects(storeBundle(store, Readable.from([Buffer.from('<html>')])), (e) => isCocoonError(e, 'invalid_bundle') && e.status === 400);
  await assert.rejects(storeBundle(store, Readable.from([])), (e) => isCocoonError(e, 'invalid_bundle') && /empty/.test(e.message));
  await assert.rejects(
    storeBundle(store, Readable.from([tarGz([DOCKERFILE, { path: 'big', data: randomBytes(100_000) }])]), { maxBytes: 1000 }),
    (e) => isCocoonError(e, 'bundle_too_large') && e.status === 413,
  );
  const left = await readdir(join(dir, 'objects'), { recursive: true }).catch(() => []);
  assert.deepEqual(left.filter((p) => !['.tmp', 'uploads'].includes(p)), []);
});

test('unknown bundles and s3 URIs without S3 give clear errors', async (t) => {
  const dir = await tempDir(t);
  const store = new LocalObjectStore(join(dir, 'objects'));
  await assert.rejects(
    openBundle(parseBundleRef(`cocoon://bundles/${'e'.repeat(64)}.zip`), { objects: store }),
    (e) => isCocoonError(e, 'bundle_not_found') && e.status === 404,
  );
  await assert.rejects(
    openBundle(parseBundleRef('s3://some-bucket/app.tar.gz'), { objects: store }),
    (e) => isCocoonError(e, 's3_not_configured') && /POST \/bundles/.test(e.message),
  );
});

test('an s3:// bundle is fetched from its bucket and unpacked', async (t) => {
  const server = await startS3rver(['platform', 'customer-apps']);
  t.after(() => server.stop());
  const store = new S3ObjectStore({
    bucket: 'platform', region: 'us-east-1', endpoint: server.endpoint, forcePathStyle: true, credentials: server.credentials,
  });
  t.after(() => store.destroy());
  const archive = zipArchive([ZIP_DOCKERFILE, { name: 'index.html', data: '<h1>hi</h1>' }]);
  await store.forBucket('customer-apps').put('releases/v1.zip', Readable.from([archive]), { maxBytes: 1e6 });

  // Uploaded bundles work the same with S3 as the platform's store.
  const stored = await storeBundle(store, Readable.from([tarGz([DOCKERFILE])]));
  assert.equal(await store.exists(stored.key), true);

  const dir = await tempDir(t);
  const { stream, expectedSha256 } = await openBundle(parseBundleRef('s3://customer-apps/releases/v1.zip'), {
    objects: store, s3ForBucket: (bucket) => store.forBucket(bucket),
  });
  assert.equal(expectedSha256, undefined);
  const result = await unpackBundle(stream, join(dir, 'ctx'));
  assert.equal(result.sha256, sha256(archive));
  assert.deepEqual(await tree(join(dir, 'ctx')), ['Dockerfile', 'index.html']);
  await assert.rejects(
    openBundle(parseBundleRef('s3://customer-apps/missing.zip'), { objects: store, s3ForBucket: (b) => store.forBucket(b) }),
    (e) => isCocoonError(e, 'bundle_not_found'),
  );
});
