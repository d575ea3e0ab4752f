/**
 * The object-store conformance suite: the same cases against every implementation of
 * `ObjectStore` (src/objectstore/object-store.ts): the local directory store and the S3 store
 * (against s3rver, a real S3-protocol server in-process). Each case gets an empty store: a new
 * directory, or a new key prefix in the bucket. What only one implementation has (file modes,
 * symlinks, temp sweeping; multipart uploads, other buckets, credentials) stays in
 * test/objectstore/local-store.test.ts and s3-store.test.ts. An implementation declares here,
 * by case name, what it skips and why.
 */
import assert from 'node:assert/strict';
import { mkdtemp, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, relative } from 'node:path';
import { PassThrough, Readable } from 'node:stream';
import { after, before, describe, test, type TestContext } from 'node:test';
import { ListObjectsV2Command, S3Client } from '@aws-sdk/client-s3';
import { isCocoonError } from '../../src/common/errors.ts';
import { LocalObjectStore } from '../../src/objectstore/local.ts';
import type { ObjectStore } from '../../src/objectstore/object-store.ts';
import { S3ObjectStore } from '../../src/objectstore/s3.ts';
import { startS3rver, type TestS3Server } from '../objectstore/s3rver-server.ts';
import { chunked, failingAfter, readAll, sha256 } from '../objectstore/stream-helpers.ts';

interface Target {
  /** An empty store for one test, and every key stored under it (temp files and parts included). */
  fresh(t: TestContext): Promise<{ store: ObjectStore; stored(): Promise<string[]> }>;
}

type Implementation = 'local' | 's3';

/** Case name → why this implementation cannot run it. None today: both hold every case. */
const SKIPS: Record<Implementation, Record<string, string>> = { local: {}, s3: {} };

function cases(implementation: Implementation, target: Target): void {
  const it = (name: string, fn: (t: TestContext) => Promise<void>) => {
    const skip = SKIPS[implementation][name];
    test(name, skip ? { skip } : {}, fn);
  };

  it('put, get, head, exists and delete round-trip with a streamed sha256', async (t) => {
    const { store, stored } = await target.fresh(t);
    const data = Buffer.alloc(300_000, 'cocoon');
    const result = await store.put('bundles/a/b.bin', chunked(data, 7_777), { maxBytes: 1_000_000, contentType: 'application/octet-stream' });
    assert.deepEqual(result, { key: 'bundles/a/b.bin', sha256: sha256(data), sizeBytes: data.length });

    assert.deepEqual(await readAll(await store.get('bundles/a/b.bin')), data);
    const info = await store.head('bundles/a/b.bin');
    assert.equal(info?.sizeBytes, data.length);
    assert.ok(info?.lastModified instanceof Date);
    assert.equal(await store.exists('bundles/a/b.bin'), true);
    assert.ok(store.describe('bundles/a/b.bin').includes('bundles/a/b.bin'), 'messages name the key');

    // A prefix is not an object.
    assert.equal(await store.head('bundles/a'), undefined);
    assert.equal(await store.exists('bundles/a'), false);

    await store.delete('bundles/a/b.bin');
    assert.equal(await store.exists('bundles/a/b.bin'), false);
    assert.equal(await store.head('bundles/a/b.bin'), undefined);
    await store.delete('bundles/a/b.bin'); // deleting twice is fine
    await assert.rejects(store.get('bundles/a/b.bin'), (e) => isCocoonError(e, 'object_not_found') && e.status === 404);
    assert.deepEqual(await stored(), []);
  });

  it('an empty object and an overwrite', async (t) => {
    const { store } = await target.fresh(t);
    const empty = await store.put('k', Readable.from([]), { maxBytes: 10 });
    assert.equal(empty.sizeBytes, 0);
    assert.equal(empty.sha256, sha256(Buffer.alloc(0)));
    assert.equal((await store.head('k'))?.sizeBytes, 0);
    assert.equal((await readAll(await store.get('k'))).length, 0);
    await store.put('k', Readable.from([Buffer.from('second')]), { maxBytes: 10 });
    assert.equal((await readAll(await store.get('k'))).toString(), 'second');
  });

  it('a put over the size bound fails and leaves nothing behind', async (t) => {
    const { store, stored } = await target.fresh(t);
    await store.put('keep', Readable.from([Buffer.from('old')]), { maxBytes: 10 });
    await assert.rejects(
      store.put('big', chunked(Buffer.alloc(100_000), 1000), { maxBytes: 99_999 }),
      (e) => isCocoonError(e, 'object_too_large') && e.status === 413,
    );
    assert.equal(await store.exists('big'), false);
    // Exactly at the bound is fine.
    await store.put('exact', chunked(Buffer.alloc(1000), 100), { maxBytes: 1000 });
    // Replacing an object with one too large keeps the old one.
    await assert.rejects(store.put('keep', chunked(Buffer.alloc(50)), { maxBytes: 10 }), (e) => isCocoonError(e, 'object_too_large'));
    assert.equal((await readAll(await store.get('keep'))).toString(), 'old');
    assert.deepEqual(await stored(), ['exact', 'keep']);
  });

  it('a source that fails mid-way stores nothing', async (t) => {
    const { store, stored } = await target.fresh(t);
    await assert.rejects(
      store.put('x/y', failingAfter(Buffer.alloc(10_000), new Error('connection reset')), { maxBytes: 1e6 }),
      /connection reset/,
    );
    assert.equal(await store.exists('x/y'), false);
    assert.deepEqual(await stored(), []);
  });

  it('nothing is visible under the key until the write completed', async (t) => {
    const { store } = await target.fresh(t);
    const source = new PassThrough();
    const pending = store.put('slow', source, { maxBytes: 1e6 });
    source.write(Buffer.alloc(1000));
    await new Promise((resolve) => setTimeout(resolve, 20));
    assert.equal(await store.exists('slow'), false);
    source.end(Buffer.alloc(1000));
    await pending;
    assert.equal((await store.head('slow'))?.sizeBytes, 2000);
  });

  it('move renames and refuses a missing source', async (t) => {
    const { store, stored } = await target.fresh(t);
    await store.put('uploads/tmp1', Readable.from([Buffer.from('payload')]), { maxBytes: 100 });
    await store.move('uploads/tmp1', 'bundles/final.zip');
    assert.equal(await store.exists('uploads/tmp1'), false);
    assert.equal((await readAll(await store.get('bundles/final.zip'))).toString(), 'payload');
    await assert.rejects(store.move('uploads/none', 'bundles/x'), (e) => isCocoonError(e, 'object_not_found'));
    assert.deepEqual(await stored(), ['bundles/final.zip']);
  });

  it('bad keys are refused before anything is stored', async (t) => {
    const { store, stored } = await target.fresh(t);
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
      await assert.rejects(store.head(key), (e) => isCocoonError(e, 'invalid_object_key'));
      await assert.rejects(store.delete(key), (e) => isCocoonError(e, 'invalid_object_key'));
    }
    assert.deepEqual(await stored(), []);
  });
}

describe('object store: local directory', () => {
  cases('local', {
    async fresh(t) {
      const dir = await mkdtemp(join(tmpdir(), 'cocoon-objects-'));
      t.after(() => rm(dir, { recursive: true, force: true }));
      const store = new LocalObjectStore(join(dir, 'objects'));
      return {
        store,
        async stored() {
          const entries = await readdir(store.root, { recursive: true, withFileTypes: true }).catch(() => []);
          return entries.filter((e) => !e.isDirectory()).map((e) => relative(store.root, join(e.parentPath, e.name))).sort();
        },
      };
    },
  });
});

describe('object store: S3 (s3rver)', () => {
  const BUCKET = 'cocoon-conformance';
  let server: TestS3Server;
  let client: S3Client;
  let prefixes = 0;
  before(async () => {
    server = await startS3rver([BUCKET]);
    client = new S3Client({ region: 'us-east-1', endpoint: server.endpoint, forcePathStyle: true, credentials: server.credentials });
  });
  after(async () => {
    client?.destroy();
    await server?.stop();
  });
  cases('s3', {
    async fresh(t) {
      const prefix = `case-${++prefixes}`;
      const store = new S3ObjectStore({
        bucket: BUCKET, region: 'us-east-1', endpoint: server.endpoint, forcePathStyle: true,
        credentials: server.credentials, prefix,
      });
      t.after(() => store.destroy());
      return {
        store,
        async stored() {
          const listed = await client.send(new ListObjectsV2Command({ Bucket: BUCKET, Prefix: `${prefix}/` }));
          return (listed.Contents ?? []).map((o) => (o.Key ?? '').slice(prefix.length + 1)).sort();
        },
      };
    },
  });
});
