/**
 * The same flows with S3: a server whose object store is a bucket on an in-process S3-protocol
 * server (s3rver, see test/objectstore/s3rver-server.ts), images built from `s3://bucket/key`
 * bundles (tar.gz and zip, a multi-stage Dockerfile), from a bundle uploaded through the API
 * into the S3 store, and bad or missing bundles in S3 ending FAILED with the reason.
 */
import assert from 'node:assert/strict';
import { Readable } from 'node:stream';
import { after, before, describe, test } from 'node:test';
import { ensureBaseImages } from '../../src/builder/base-images.ts';
import { S3ObjectStore } from '../../src/objectstore/s3.ts';
import { startS3rver, type TestS3Server } from '../objectstore/s3rver-server.ts';
import {
  assertNoLeftovers, BUSYBOX_APP, client, makeBundle, makeRawTarGz, removeDataDir, startTestServer,
  type Client, type TestServer,
} from './helpers.ts';

const BUILD = { timeout: 600_000 };
const PLATFORM_BUCKET = 'cocoon-platform';
const USER_BUCKET = 'user-bundles';

describe('images from S3 (s3rver on loopback, real buildah and QEMU)', () => {
  let s3: TestS3Server;
  let t: TestServer;
  let api: Client;
  let userBucket: S3ObjectStore;
  const savedEnv = { ...process.env };

  before(async () => {
    await ensureBaseImages();
    s3 = await startS3rver([PLATFORM_BUCKET, USER_BUCKET]);
    // The server's object store comes from the environment, as in production.
    Object.assign(process.env, {
      COCOON_S3_BUCKET: PLATFORM_BUCKET,
      COCOON_S3_ENDPOINT: s3.endpoint,
      COCOON_S3_REGION: 'us-east-1',
      COCOON_S3_ACCESS_KEY_ID: s3.credentials.accessKeyId,
      COCOON_S3_SECRET_ACCESS_KEY: s3.credentials.secretAccessKey,
      COCOON_S3_PREFIX: 'cocoon',
    });
    t = await startTestServer();
    api = client(t.url, t.adminKey);
    userBucket = new S3ObjectStore({
      bucket: USER_BUCKET, region: 'us-east-1', endpoint: s3.endpoint, forcePathStyle: true, credentials: s3.credentials,
    });
  });
  after(async () => {
    await t?.close();
    if (t) await removeDataDir(t.dataDir);
    userBucket?.destroy();
    await s3?.stop();
    for (const key of Object.keys(process.env)) if (!(key in savedEnv)) delete process.env[key];
  });

  async function putUserBundle(key: string, data: Buffer): Promise<string> {
    await userBucket.put(key, Readable.from([data]), { maxBytes: 64 * 1024 * 1024 });
    return `s3://${USER_BUCKET}/${key}`;
  }

  async function buildFrom(name: string, bundle: string, extra: Record<string, unknown> = {}): Promise<any> {
    const created = await api.post('/images', { name, bundle, ...extra });
    assert.equal(created.status, 202, created.text);
    assert.equal(created.body.bundle, bundle);
    return api.waitForState(created.body.id, ['READY', 'FAILED']);
  }

  test('an s3:// .tar.gz bundle becomes READY', BUILD, async () => {
    const uri = await putUserBundle('apps/busybox.tar.gz', await makeBundle(BUSYBOX_APP));
    const image = await buildFrom('s3-busybox', uri, { readiness: { httpPath: '/cgi-bin/hello' } });
    assert.equal(image.state, 'READY', image.error);
    assert.match(image.bundleSha256, /^[0-9a-f]{64}$/, 'the hash of what was fetched is recorded');
    assert.match((await api.get(`/images/${image.id}/logs`)).text, /fetching the bundle s3:\/\/user-bundles\/apps\/busybox\.tar\.gz/);
    await assertNoLeftovers(t.dataDir, image.id);
  });

  test('an s3:// .zip bundle becomes READY', BUILD, async () => {
    const uri = await putUserBundle('apps/busybox.zip', await makeBundle(BUSYBOX_APP, 'zip'));
    const image = await buildFrom('s3-busybox-zip', uri);
    assert.equal(image.state, 'READY', image.error);
    await assertNoLeftovers(t.dataDir, image.id);
  });

  test('an s3:// multi-stage bundle with ARG, ENV, WORKDIR and USER becomes READY', BUILD, async () => {
    const uri = await putUserBundle('apps/multi.tar.gz', await makeBundle({
      Dockerfile: [
        'FROM busybox AS build',
        'ARG MESSAGE=built-in-stage-one',
        'WORKDIR /out',
        'RUN echo "$MESSAGE" > index.html',
        'FROM busybox',
        'ENV PORT=8081',
        'RUN echo "app:x:1001:1001:app:/srv:/bin/sh" >> /etc/passwd && mkdir -p /srv/www && chown -R 1001 /srv',
        'WORKDIR /srv',
        'COPY --from=build /out/index.html www/',
        'USER app',
        'CMD ["sh", "-c", "[ \\"$(id -u)\\" = 1001 ] && [ \\"$(pwd)\\" = /srv ] && exec httpd -f -p $PORT -h www"]',
        '',
      ].join('\n'),
    }));
    const image = await buildFrom('s3-multi', uri, { port: 8081, readiness: { httpPath: '/index.html' } });
    assert.equal(image.state, 'READY', image.error);
    assert.equal(image.port, 8081);
    await assertNoLeftovers(t.dataDir, image.id);
  });

  test('POST /bundles stores into the S3 store, and an image builds from it', BUILD, async () => {
    const upload = await api.uploadBundle(await makeBundle(BUSYBOX_APP));
    assert.equal(upload.status, 201, upload.text);
    const platform = new S3ObjectStore({
      bucket: PLATFORM_BUCKET, region: 'us-east-1', endpoint: s3.endpoint, forcePathStyle: true, credentials: s3.credentials, prefix: 'cocoon',
    });
    try {
      assert.ok(await platform.exists(`bundles/${upload.body.sha256}.tar.gz`), 'the bundle is in the bucket');
    } finally {
      platform.destroy();
    }
    const bad = await api.uploadBundle(await makeRawTarGz([{ name: 'Dockerfile', content: 'FROM busybox\n' }, { name: '../x', content: 'x' }]));
    assert.equal(bad.status, 400, bad.text);
    const image = await buildFrom('s3-uploaded', upload.body.uri);
    assert.equal(image.state, 'READY', image.error);
    await assertNoLeftovers(t.dataDir, image.id);
  });

  test('bad and missing s3:// bundles end FAILED with the reason, and leave nothing', BUILD, async () => {
    const cases: Array<{ name: string; data?: Buffer; reason: RegExp }> = [
      { name: 'not-gzip', data: Buffer.from('plain text\n'.repeat(10)), reason: /invalid_bundle: .*neither a gzip/ },
      { name: 'no-dockerfile', data: await makeBundle({ 'app.sh': 'echo\n' }), reason: /invalid_bundle: .*no Dockerfile/ },
      { name: 'traversal', data: await makeRawTarGz([{ name: 'Dockerfile', content: 'FROM busybox\n' }, { name: '../../escape', content: 'x' }]), reason: /invalid_bundle: / },
      { name: 'symlink', data: await makeRawTarGz([{ name: 'Dockerfile', content: 'FROM busybox\n' }, { name: 'l', symlink: '/etc/shadow' }]), reason: /invalid_bundle: .*link/i },
      { name: 'missing', reason: /bundle_not_found: / },
    ];
    for (const c of cases) {
      const uri = c.data ? await putUserBundle(`bad/${c.name}.tar.gz`, c.data) : `s3://${USER_BUCKET}/bad/not-there.tar.gz`;
      const image = await buildFrom(`s3-bad-${c.name}`, uri);
      assert.equal(image.state, 'FAILED', c.name);
      assert.match(image.error, c.reason, c.name);
      await assertNoLeftovers(t.dataDir, image.id);
    }
  });
});
