import assert from 'node:assert/strict';
import { createServer } from 'node:net';
import { Readable } from 'node:stream';
import { test } from 'node:test';
import { isCocoonError } from '../../src/common/errors.ts';
import { S3ObjectStore, s3ConfigFromEnv } from '../../src/objectstore/s3.ts';
import { startS3rver, type TestS3Server } from './s3rver-server.ts';
import { chunked, readAll, sha256 } from './stream-helpers.ts';

const MIB = 1024 * 1024;

// One in-process S3 server for the file; stopped (and its directory removed) even on failure.
let server: TestS3Server;
let store: S3ObjectStore;

test.before(async () => {
  server = await startS3rver(['cocoon-test', 'other-bucket']);
  store = new S3ObjectStore({
    bucket: 'cocoon-test',
    region: 'us-east-1',
    endpoint: server.endpoint,
    forcePathStyle: true,
    credentials: server.credentials,
    prefix: 'objects',
    partSizeBytes: 5 * MIB,
    queueSize: 2,
  });
});

test.after(async () => {
  store?.destroy();
  await server?.stop();
});

// The cases every object store shares (round trip, size bound, failing source, atomic visibility,
// move, bad keys) are in test/conformance/object-store.test.ts; here what only S3 has.

test('keys live under the prefix in the bucket', () => {
  assert.equal(store.describe('bundles/one.tar.gz'), 's3://cocoon-test/objects/bundles/one.tar.gz');
});

test('a large object streams as a multipart upload', async () => {
  // 11 MiB in 5 MiB parts: three parts, at most two in memory at a time.
  const data = Buffer.alloc(11 * MIB);
  for (let i = 0; i < data.length; i += 4096) data.writeUInt32LE(i, i);
  const result = await store.put('big/object.bin', chunked(data), { maxBytes: 12 * MIB });
  assert.equal(result.sizeBytes, data.length);
  assert.equal(result.sha256, sha256(data));
  const back = await readAll(await store.get('big/object.bin'));
  assert.equal(sha256(back), sha256(data));
  await store.delete('big/object.bin');
});

test('over the size bound nothing is stored, in one part or many', async () => {
  await assert.rejects(
    store.put('small-over', chunked(Buffer.alloc(5000), 1000), { maxBytes: 4999 }),
    (e) => isCocoonError(e, 'object_too_large') && e.status === 413,
  );
  assert.equal(await store.exists('small-over'), false);
  // Over the bound after several parts were uploaded: the multipart upload is abandoned.
  await assert.rejects(
    store.put('big-over', chunked(Buffer.alloc(12 * MIB)), { maxBytes: 11 * MIB }),
    (e) => isCocoonError(e, 'object_too_large'),
  );
  assert.equal(await store.exists('big-over'), false);
});

test('forBucket reads another bucket with the same client, without the prefix', async () => {
  const other = store.forBucket('other-bucket');
  await other.put('apps/app.zip', Readable.from([Buffer.from('other')]), { maxBytes: 100 });
  assert.equal(other.describe('apps/app.zip'), 's3://other-bucket/apps/app.zip');
  assert.equal((await readAll(await other.get('apps/app.zip'))).toString(), 'other');
  assert.equal(await store.exists('apps/app.zip'), false);
});

test('bad keys, a missing bucket and wrong credentials give clear errors', async () => {
  await assert.rejects(store.get('../etc/passwd'), (e) => isCocoonError(e, 'invalid_object_key'));
  await assert.rejects(store.forBucket('no-such-bucket').get('x'), (e) => isCocoonError(e, 'object_store_error') && /does not exist/.test(e.message));
  assert.throws(() => store.forBucket('Bad_Bucket'), (e) => isCocoonError(e, 'invalid_bucket_name'));

  // s3rver checks the access key id (it does not verify SigV4 signatures themselves).
  const wrong = new S3ObjectStore({
    bucket: 'cocoon-test', region: 'us-east-1', endpoint: server.endpoint, forcePathStyle: true,
    credentials: { accessKeyId: 'NOT-A-KEY', secretAccessKey: 'not-the-secret' },
  });
  try {
    await assert.rejects(
      wrong.get('x'),
      (e) => isCocoonError(e, 'object_store_error') && /denied/.test(e.message) && !e.message.includes('not-the-secret'),
    );
  } finally {
    wrong.destroy();
  }
});

test('an unreachable endpoint is object_store_unavailable', async () => {
  // A port that was free a moment ago: nothing listens there.
  const port = await new Promise<number>((resolve) => {
    const probe = createServer().listen(0, '127.0.0.1', () => {
      const address = probe.address();
      probe.close(() => resolve(typeof address === 'object' && address ? address.port : 0));
    });
  });
  const down = new S3ObjectStore({
    bucket: 'cocoon-test', region: 'us-east-1', endpoint: `http://127.0.0.1:${port}`, forcePathStyle: true,
    credentials: server.credentials,
  });
  try {
    await assert.rejects(down.head('x'), (e) => isCocoonError(e, 'object_store_unavailable') && e.status === 503);
  } finally {
    down.destroy();
  }
});

test('s3ConfigFromEnv reads the COCOON_S3_* variables', () => {
  assert.equal(s3ConfigFromEnv({}), undefined);
  assert.deepEqual(
    s3ConfigFromEnv({
      COCOON_S3_BUCKET: 'b1b', COCOON_S3_ENDPOINT: 'http://127.0.0.1:9000',
      COCOON_S3_ACCESS_KEY_ID: 'id', COCOON_S3_SECRET_ACCESS_KEY: 'secret',
    }),
    {
      bucket: 'b1b', region: 'us-east-1', endpoint: 'http://127.0.0.1:9000', forcePathStyle: true,
      credentials: { accessKeyId: 'id', secretAccessKey: 'secret' },
    },
  );
  assert.throws(() => s3ConfigFromEnv({ COCOON_S3_BUCKET: 'b1b', COCOON_S3_ACCESS_KEY_ID: 'id' }), (e) => isCocoonError(e, 'invalid_config'));
});
