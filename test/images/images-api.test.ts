/**
 * Images end to end through the API, with real buildah and QEMU: bundles uploaded and refused,
 * images built from them to READY (busybox as .tar.gz and .zip, a multi-stage Dockerfile, a
 * Debian image that installs a package with apt-get), and every way a build can fail, each
 * leaving nothing behind. One server for the whole file; builds run one at a time.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { ensureBaseImages } from '../../src/builder/base-images.ts';
import { imageSnapshotDir } from '../../src/images/paths.ts';
import { listBundles } from '../../src/store/bundles.ts';
import { createMicrovm, transitionMicrovm } from '../../src/store/microvms.ts';
import { QemuVm } from '../../src/vmm/qemu/qemu.ts';
import { cleanupDir, httpGet, tempDir } from '../support/vm.ts';
import {
  assertNoLeftovers, BUSYBOX_APP, client, makeBundle, makeRawTarGz, removeDataDir, startTestServer,
  type Client, type TestServer,
} from './helpers.ts';

const MAX_BUNDLE_BYTES = 1024 * 1024;
const BUILD = { timeout: 600_000 };

describe('images through the API (real buildah and QEMU)', () => {
  let t: TestServer;
  let api: Client;
  let adminTenantId: string;
  let busyboxUri: string;
  let busyboxImage: { id: string; arn: string } | undefined;

  before(async () => {
    await ensureBaseImages();
    t = await startTestServer({ bundleLimits: { maxCompressedBytes: MAX_BUNDLE_BYTES } });
    api = client(t.url, t.adminKey);
    adminTenantId = (await t.server.db.get<{ id: string }>("SELECT id FROM tenants WHERE name = 'admin'"))!.id;
  });
  after(async () => {
    await t?.close();
    if (t) await removeDataDir(t.dataDir);
  });

  async function storedBundleFiles(): Promise<string[]> {
    const objects = path.join(t.dataDir, 'objects');
    const list = (dir: string): string[] =>
      fs.existsSync(dir) ? fs.readdirSync(dir, { recursive: true, withFileTypes: true }).filter((e) => e.isFile()).map((e) => path.join(e.parentPath, e.name)) : [];
    return [...list(objects), ...list(path.join(t.dataDir, 'tmp'))];
  }

  test('POST /bundles refuses bad bundles with 400 and stores nothing', async () => {
    const before = await storedBundleFiles();
    const bundlesBefore = (await listBundles(t.server.db, adminTenantId)).items.length;
    const cases: Array<{ what: string; data: Buffer; type?: string; reason: RegExp }> = [
      { what: 'not gzip', data: Buffer.from('this is plain text, not an archive\n'.repeat(20)), reason: /neither a gzip|not a|gzip/i },
      { what: 'no Dockerfile', data: await makeBundle({ 'app.sh': 'echo hi\n' }), reason: /no Dockerfile/i },
      { what: 'no Dockerfile (zip)', data: await makeBundle({ 'app.sh': 'echo hi\n' }, 'zip'), type: 'application/zip', reason: /no Dockerfile/i },
      {
        what: 'path traversal',
        data: await makeRawTarGz([{ name: 'Dockerfile', content: 'FROM busybox\n' }, { name: '../escaped.txt', content: 'x' }]),
        reason: /\.\.|outside|travers/i,
      },
      {
        what: 'absolute path',
        data: await makeRawTarGz([{ name: 'Dockerfile', content: 'FROM busybox\n' }, { name: '/etc/cocoon-evil', content: 'x' }]),
        reason: /absolute|outside/i,
      },
      {
        what: 'symlink escape',
        data: await makeRawTarGz([{ name: 'Dockerfile', content: 'FROM busybox\n' }, { name: 'passwd', symlink: '../../../etc/passwd' }]),
        reason: /link|outside/i,
      },
      {
        what: 'symlink escape (zip)',
        data: await makeBundle({ Dockerfile: 'FROM busybox\n', 'data/passwd': { symlink: '/etc/passwd' } }, 'zip'),
        type: 'application/zip',
        reason: /link|outside|absolute/i,
      },
      {
        what: 'over the size bound',
        // Random bytes do not compress: a 1.5 MiB file makes a bundle over the 1 MiB bound.
        data: await makeBundle({ Dockerfile: 'FROM busybox\n', 'blob.txt': randomBytes(1536 * 1024).toString('base64') }),
        reason: /larger than the limit/i,
      },
      { what: 'empty', data: Buffer.alloc(0), reason: /empty/i },
    ];
    for (const c of cases) {
      const answer = await api.uploadBundle(c.data, c.type);
      assert.equal(answer.status, 400, `${c.what}: ${answer.text}`);
      assert.equal(answer.body.error.code, 'invalid_bundle', c.what);
      assert.match(answer.body.error.message, c.reason, c.what);
    }
    // A media type that is no bundle at all.
    const json = await api.post('/bundles', { not: 'a bundle' });
    assert.equal(json.status, 415, json.text);
    assert.deepEqual(await storedBundleFiles(), before, 'nothing was stored, not even partly');
    assert.equal((await listBundles(t.server.db, adminTenantId)).items.length, bundlesBefore, 'no bundle was recorded');
  });

  test('POST /images validates its request', async () => {
    const good = await api.uploadBundle(await makeBundle(BUSYBOX_APP));
    assert.equal(good.status, 201, good.text);
    assert.match(good.body.uri, /^cocoon:\/\/bundles\/[0-9a-f]{64}\.tar\.gz$/);
    assert.equal(typeof good.body.sizeBytes, 'number');
    assert.match(good.body.sha256, /^[0-9a-f]{64}$/);
    assert.ok(fs.existsSync(path.join(t.dataDir, 'objects', 'bundles', `${good.body.sha256}.tar.gz`)), 'stored once valid');
    busyboxUri = good.body.uri;
    const bad: Array<[Record<string, unknown>, number, string]> = [
      [{ name: 'x' }, 400, 'invalid_request'],
      [{ name: 'bad name!', bundle: busyboxUri }, 400, 'invalid_request'],
      [{ name: 'x', bundle: busyboxUri, vcpus: 17 }, 400, 'invalid_request'],
      [{ name: 'x', bundle: busyboxUri, vcpus: 0 }, 400, 'invalid_request'],
      [{ name: 'x', bundle: busyboxUri, memoryMiB: 64 }, 400, 'invalid_request'],
      [{ name: 'x', bundle: busyboxUri, memoryMiB: 32769 }, 400, 'invalid_request'],
      [{ name: 'x', bundle: busyboxUri, diskMiB: 40000 }, 400, 'invalid_request'],
      [{ name: 'x', bundle: busyboxUri, port: 70000 }, 400, 'invalid_request'],
      [{ name: 'x', bundle: busyboxUri, readiness: { timeoutSeconds: 3601 } }, 400, 'invalid_request'],
      [{ name: 'x', bundle: busyboxUri, readiness: { httpPath: 'health' } }, 400, 'invalid_request'],
      [{ name: 'x', bundle: 'http://example.com/b.tgz' }, 400, 'invalid_bundle_uri'],
      [{ name: 'x', bundle: `cocoon://bundles/${'0'.repeat(64)}.tar.gz` }, 404, 'bundle_not_found'],
      [{ name: 'x', bundle: 's3://some-bucket/app.tar.gz' }, 400, 's3_not_configured'],
    ];
    for (const [body, status, code] of bad) {
      const answer = await api.post('/images', body);
      assert.equal(answer.status, status, `${JSON.stringify(body)}: ${answer.text}`);
      assert.equal(answer.body.error.code, code, JSON.stringify(body));
    }
    // Another tenant cannot build from this tenant's bundle.
    const other = await api.post('/tenants', { name: 'other-tenant' });
    assert.equal(other.status, 201, other.text);
    const otherApi = client(t.url, other.body.apiKey);
    const stolen = await otherApi.post('/images', { name: 'x', bundle: busyboxUri });
    assert.equal(stolen.status, 404, stolen.text);
    assert.equal((await api.get('/images')).body.items.length, 0, 'no image was created by a refused request');
  });

  test('the OpenAPI document describes the bundle and image routes', async () => {
    const doc = await (await fetch(`${t.url}/api/v1/openapi.json`)).json() as { paths: Record<string, Record<string, any>> };
    assert.ok(doc.paths['/api/v1/bundles']?.post?.requestBody?.content?.['application/gzip'], 'POST /bundles takes application/gzip');
    assert.ok(doc.paths['/api/v1/bundles']?.post?.requestBody?.content?.['application/zip'], 'and application/zip');
    const create = doc.paths['/api/v1/images']?.post;
    assert.ok(create?.responses?.['202'], 'POST /images answers 202');
    const body = create.requestBody.content['application/json'].schema;
    assert.deepEqual(body.required, ['name', 'bundle']);
    assert.equal(body.properties.vcpus.maximum, 16);
    assert.equal(body.properties.memoryMiB.minimum, 128);
    assert.equal(body.properties.readiness.properties.timeoutSeconds.maximum, 3600);
    for (const route of ['/api/v1/images', '/api/v1/images/{id}', '/api/v1/images/{id}/logs']) assert.ok(doc.paths[route]?.get, `GET ${route}`);
    assert.ok(doc.paths['/api/v1/images/{id}']?.delete?.responses?.['409'], 'DELETE documents 409');
  });

  test('a busybox bundle (.tar.gz) becomes READY; its log streams; its snapshot restores and answers HTTP', BUILD, async () => {
    const created = await api.post('/images', { name: 'busybox', bundle: busyboxUri, readiness: { httpPath: '/cgi-bin/hello', timeoutSeconds: 300 } });
    assert.equal(created.status, 202, created.text);
    assert.equal(created.body.state, 'PENDING');
    assert.match(created.body.arn, /^arn:cocoon:local-1:\d{12}:microvm-image\/busybox:1$/);
    assert.equal(created.body.port, 8080);
    assert.equal(created.body.vcpus, 1);
    const id: string = created.body.id;

    // Follow the log from the start: the stream ends by itself once the build ends.
    const followed = await fetch(`${t.url}/api/v1/images/${id}/logs?follow=1`, { headers: { authorization: `Bearer ${t.adminKey}` } });
    assert.equal(followed.status, 200);
    assert.match(followed.headers.get('content-type') ?? '', /^text\/plain/);
    const text = await followed.text();
    const image = await api.waitForState(id, ['READY', 'FAILED']);
    assert.equal(image.state, 'READY', image.error);
    assert.equal(image.error, null);
    for (const line of ['fetching the bundle', 'STEP 1/6: FROM busybox', 'writing the root disk', 'booting: 1 vCPU, 256 MiB', '[console] app: starting httpd on 8080', 'the app is ready', 'state SNAPSHOTTING → READY']) {
      assert.ok(text.includes(line), `the followed log has "${line}":\n${text}`);
    }
    const plain = await api.get(`/images/${id}/logs`);
    assert.equal(plain.status, 200);
    assert.equal(plain.text, text, 'the kept log is what was streamed');

    // Timings of every phase, on the image.
    for (const phase of ['fetchMs', 'buildMs', 'diskMs', 'bootMs', 'readyMs', 'snapshotMs', 'totalMs']) {
      assert.equal(typeof image.timings[phase], 'number', `timings.${phase}`);
    }
    console.log(`# busybox tar.gz: ${JSON.stringify(image.timings)}`);
    assert.match(image.bundleSha256, /^[0-9a-f]{64}$/);

    // By URL-encoded ARN too.
    const byArn = await api.get(`/images/${encodeURIComponent(image.arn)}`);
    assert.equal(byArn.status, 200, byArn.text);
    assert.equal(byArn.body.id, id);

    // The snapshot: complete, read-only, and it restores into a VM whose app answers.
    const snapshotDir = imageSnapshotDir(t.dataDir, id);
    for (const file of ['manifest.json', 'state', 'mem', 'disk.raw']) assert.ok(fs.existsSync(path.join(snapshotDir, file)), file);
    assert.equal(fs.statSync(path.join(snapshotDir, 'mem')).mode & 0o222, 0, 'snapshot files are read-only');
    const memBefore = fs.statSync(path.join(snapshotDir, 'mem')).mtimeMs;
    const runDir = tempDir('cocoon-img-restore-');
    try {
      const vm = await QemuVm.restore({ id: 'restore-check', runDir: path.join(runDir, 'vm'), snapshotDir, network: { forwards: [{ guestPort: 8080 }] } });
      try {
        assert.equal(await httpGet(`http://127.0.0.1:${vm.hostPort(8080)}/cgi-bin/hello`), 'hello from cocoon');
      } finally {
        await vm.destroy();
      }
    } finally {
      assert.deepEqual(cleanupDir(runDir), [], 'the restored VM is gone');
    }
    assert.equal(fs.statSync(path.join(snapshotDir, 'mem')).mtimeMs, memBefore, 'a restore does not change the image');
    await assertNoLeftovers(t.dataDir, id);
    busyboxImage = { id, arn: image.arn };
  });

  test('the same app as a .zip becomes READY, as version 2 of the name', BUILD, async () => {
    const upload = await api.uploadBundle(await makeBundle(BUSYBOX_APP, 'zip'), 'application/zip');
    assert.equal(upload.status, 201, upload.text);
    assert.match(upload.body.uri, /\.zip$/);
    const hooks = { resume: { command: 'date +%s > /tmp/resumed-at', timeoutSeconds: 5 }, suspend: { command: 'sync' } };
    const created = await api.post('/images', { name: 'busybox', bundle: upload.body.uri, hooks });
    assert.equal(created.status, 202, created.text);
    assert.match(created.body.arn, /:microvm-image\/busybox:2$/);
    const image = await api.waitForState(created.body.id, ['READY', 'FAILED']);
    assert.equal(image.state, 'READY', image.error);
    assert.equal(image.port, 8080, 'the port comes from EXPOSE');
    assert.deepEqual(image.hooks, { resume: hooks.resume, suspend: { command: 'sync', timeoutSeconds: 10 } });
    // The hooks reach cocoon-init through the workload file on the image's disk.
    const workload = execFileSync('debugfs', ['-R', 'cat /.cocoon/workload', path.join(imageSnapshotDir(t.dataDir, image.id), 'disk.raw')], {
      encoding: 'utf8',
      stdio: ['ignore', 'pipe', 'ignore'],
    });
    assert.match(workload, /^hook\.resume date \+%s > \/tmp\/resumed-at$/m);
    assert.match(workload, /^hook\.suspend sync$/m);
    console.log(`# busybox zip: ${JSON.stringify(image.timings)}`);
    await assertNoLeftovers(t.dataDir, image.id);
  });

  test('GET /images lists with filters and pages; other tenants see none of it', async () => {
    const all = await api.get('/images');
    assert.equal(all.status, 200);
    assert.equal(all.body.items.length, 2);
    assert.deepEqual(all.body.items.map((i: { version: number }) => i.version), [2, 1], 'newest first');
    const page1 = await api.get('/images?limit=1');
    assert.equal(page1.body.items.length, 1);
    assert.ok(page1.body.nextCursor);
    const page2 = await api.get(`/images?limit=1&cursor=${page1.body.nextCursor}`);
    assert.equal(page2.body.items.length, 1);
    assert.notEqual(page2.body.items[0].id, page1.body.items[0].id);
    assert.equal(page2.body.nextCursor, null);
    assert.equal((await api.get('/images?state=READY&name=busybox')).body.items.length, 2);
    assert.equal((await api.get('/images?state=FAILED')).body.items.length, 0);
    assert.equal((await api.get('/images?state=FAILED&state=READY')).body.items.length, 2);
    assert.equal((await api.get('/images?name=nope')).body.items.length, 0);
    assert.equal((await api.get('/images?state=NOPE')).status, 400);

    const other = await api.post('/tenants', { name: 'isolated' });
    const otherApi = client(t.url, other.body.apiKey);
    const id = busyboxImage!.id;
    assert.equal((await otherApi.get('/images')).body.items.length, 0);
    for (const route of [`/images/${id}`, `/images/${id}/logs`, `/images/${encodeURIComponent(busyboxImage!.arn)}`]) {
      const answer = await otherApi.get(route);
      assert.equal(answer.status, 404, route);
      assert.equal(answer.body.error.code, 'image_not_found');
    }
    assert.equal((await otherApi.delete(`/images/${id}`)).status, 404);
    assert.equal((await api.get(`/images/${id}`)).status, 200, 'still there for its owner');
    assert.equal((await fetch(`${t.url}/api/v1/images`)).status, 401, 'no key, no images');
  });

  test('a multi-stage Dockerfile with ARG, ENV, WORKDIR and USER becomes READY', BUILD, async () => {
    const bundle = await makeBundle({
      Dockerfile: [
        'ARG BASE=busybox',
        'FROM ${BASE} AS builder',
        'ARG GREETING=hello-from-build-arg',
        'WORKDIR /src',
        'COPY app.sh .',
        'RUN echo "$GREETING" > greeting.txt && chmod 755 app.sh',
        '',
        'FROM busybox',
        'ARG APP_USER=web',
        'ENV APP_HOME=/app PORT=9090',
        'RUN echo "$APP_USER:x:1000:1000:$APP_USER:/app:/bin/sh" >> /etc/passwd && echo "$APP_USER:x:1000:" >> /etc/group \\',
        ' && mkdir -p /app && chown 1000:1000 /app',
        'WORKDIR $APP_HOME',
        'COPY --from=builder /src/greeting.txt /src/app.sh ./',
        'USER web',
        'EXPOSE 9090',
        'CMD ["./app.sh"]',
        '',
      ].join('\n'),
      // The app only starts when the image is what the Dockerfile says; else it exits (FAILED).
      'app.sh': {
        content: [
          '#!/bin/sh',
          'set -e',
          '[ "$(id -u)" = 1000 ] || { echo "app: wrong user $(id -u)"; exit 1; }',
          '[ "$(pwd)" = /app ] || { echo "app: wrong directory $(pwd)"; exit 1; }',
          '[ "$(cat greeting.txt)" = hello-from-build-arg ] || { echo "app: wrong greeting"; exit 1; }',
          'mkdir -p www && echo "uid=$(id -u) cwd=$(pwd) greeting=$(cat greeting.txt) port=$PORT" > www/index.html',
          'echo "app: checks passed"',
          'exec httpd -f -p "$PORT" -h /app/www',
          '',
        ].join('\n'),
        mode: 0o644,
      },
    });
    const upload = await api.uploadBundle(bundle);
    assert.equal(upload.status, 201, upload.text);
    const created = await api.post('/images', { name: 'multi-stage', bundle: upload.body.uri, vcpus: 2, memoryMiB: 192, diskMiB: 64, readiness: { httpPath: '/index.html' } });
    assert.equal(created.status, 202, created.text);
    const image = await api.waitForState(created.body.id, ['READY', 'FAILED']);
    assert.equal(image.state, 'READY', image.error);
    assert.equal(image.port, 9090, 'the port comes from EXPOSE');
    assert.equal(image.vcpus, 2);
    assert.equal(image.memoryMiB, 192);
    const logs = (await api.get(`/images/${image.id}/logs`)).text;
    assert.match(logs, /\[2\/2\] STEP/, 'both stages were built');
    assert.match(logs, /\[console\] app: checks passed/);
    assert.match(logs, /booting: 2 vCPU, 192 MiB/);
    await assertNoLeftovers(t.dataDir, image.id);
  });

  test('a debian:bookworm-slim bundle that installs a package with apt-get and serves HTTP with it becomes READY', BUILD, async () => {
    const bundle = await makeBundle({
      Dockerfile: [
        'FROM debian:bookworm-slim',
        'RUN apt-get update \\',
        ' && apt-get install -y --no-install-recommends busybox \\',
        ' && rm -rf /var/lib/apt/lists/*',
        'RUN mkdir -p /srv/www && echo "served by busybox from apt" > /srv/www/index.html',
        'CMD ["busybox", "httpd", "-f", "-v", "-p", "8080", "-h", "/srv/www"]',
        '',
      ].join('\n'),
    });
    const upload = await api.uploadBundle(bundle);
    assert.equal(upload.status, 201, upload.text);
    const created = await api.post('/images', { name: 'debian-apt', bundle: upload.body.uri, port: 8080, readiness: { httpPath: '/index.html' } });
    assert.equal(created.status, 202, created.text);
    const image = await api.waitForState(created.body.id, ['READY', 'FAILED']);
    assert.equal(image.state, 'READY', image.error);
    const logs = (await api.get(`/images/${image.id}/logs`)).text;
    assert.match(logs, /Setting up busybox/, 'apt-get installed the package');
    console.log(`# debian apt-get: ${JSON.stringify(image.timings)}`);
    await assertNoLeftovers(t.dataDir, image.id);
  });

  test('a failing RUN step ends FAILED with buildah\'s last lines, and leaves nothing', BUILD, async () => {
    const upload = await api.uploadBundle(await makeBundle({
      Dockerfile: 'FROM busybox\nRUN echo "preparing step 4711" && ls /no-such-dir-4711\nCMD ["sh"]\n',
    }));
    const created = await api.post('/images', { name: 'failing-run', bundle: upload.body.uri });
    const image = await api.waitForState(created.body.id, ['READY', 'FAILED']);
    assert.equal(image.state, 'FAILED');
    assert.match(image.error, /^build_failed: /);
    assert.match(image.error, /preparing step 4711/, 'the step\'s own output is in the error');
    assert.match(image.error, /no-such-dir-4711/);
    assert.match((await api.get(`/images/${image.id}/logs`)).text, /FAILED: build_failed/);
    await assertNoLeftovers(t.dataDir, image.id);
    assert.equal(fs.existsSync(imageSnapshotDir(t.dataDir, image.id)), false);
  });

  test('an app that never becomes ready ends FAILED with the console\'s last lines, and leaves nothing', BUILD, async () => {
    const upload = await api.uploadBundle(await makeBundle({
      Dockerfile: 'FROM busybox\nCMD ["sh", "-c", "echo app-never-listens-4712; sleep 3600"]\n',
    }));
    const created = await api.post('/images', { name: 'never-ready', bundle: upload.body.uri, readiness: { timeoutSeconds: 3 } });
    const image = await api.waitForState(created.body.id, ['READY', 'FAILED']);
    assert.equal(image.state, 'FAILED');
    assert.match(image.error, /^readiness_failed: /);
    assert.match(image.error, /port 8080/);
    assert.match(image.error, /app-never-listens-4712/, 'the app\'s output is in the error');
    assert.equal(typeof image.timings.bootMs, 'number');
    await assertNoLeftovers(t.dataDir, image.id);
  });

  test('an app that exits before it is ready ends FAILED at once, with its output', BUILD, async () => {
    const upload = await api.uploadBundle(await makeBundle({
      Dockerfile: 'FROM busybox\nCMD ["sh", "-c", "echo app-crashing-4713 >&2; exit 3"]\n',
    }));
    const created = await api.post('/images', { name: 'crashing', bundle: upload.body.uri, readiness: { timeoutSeconds: 600 } });
    const image = await api.waitForState(created.body.id, ['READY', 'FAILED']);
    assert.equal(image.state, 'FAILED');
    assert.match(image.error, /exited with status 3/);
    assert.match(image.error, /app-crashing-4713/);
    await assertNoLeftovers(t.dataDir, image.id);
  });

  test('DELETE: 409 while a microVM uses the image, 204 once none does; its files go; a build in progress is cancelled', BUILD, async () => {
    const { id } = busyboxImage!;
    const { microvm } = await createMicrovm(t.server.db, {
      tenantId: adminTenantId,
      region: 'local-1',
      imageId: id,
      idlePolicy: { autoResumeEnabled: true, maxIdleDurationSeconds: 300, suspendedDurationSeconds: null },
      maximumDurationSeconds: 600,
    });
    const refused = await api.delete(`/images/${id}`);
    assert.equal(refused.status, 409, refused.text);
    assert.equal(refused.body.error.code, 'image_in_use');
    assert.ok(fs.existsSync(imageSnapshotDir(t.dataDir, id)));
    assert.ok(await transitionMicrovm(t.server.db, microvm.id, 'PENDING', 'TERMINATED'));
    const deleted = await api.delete(`/images/${id}`);
    assert.equal(deleted.status, 204, deleted.text);
    assert.equal(fs.existsSync(path.join(t.dataDir, 'images', id)), false, 'the image\'s files are gone');
    assert.equal((await api.get(`/images/${id}`)).status, 404);
    assert.equal((await api.delete(`/images/${id}`)).status, 404);

    // Deleting an image while it builds stops the build; nothing of it remains.
    const upload = await api.uploadBundle(await makeBundle({
      Dockerfile: 'FROM busybox\nRUN echo slow-step-4714 && sleep 600\nCMD ["sh"]\n',
    }));
    const created = await api.post('/images', { name: 'deleted-while-building', bundle: upload.body.uri });
    const buildingId: string = created.body.id;
    await waitForLog(api, buildingId, 'slow-step-4714');
    const cancelled = await api.delete(`/images/${buildingId}`);
    assert.equal(cancelled.status, 204, cancelled.text);
    assert.equal(fs.existsSync(path.join(t.dataDir, 'images', buildingId)), false);
    await assertNoLeftovers(t.dataDir, buildingId);
  });
});

/** Waits until an image's build log has `text` (a build step is running). */
async function waitForLog(api: Client, id: string, text: string, timeoutMs = 300_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await api.get(`/images/${id}/logs`)).text.includes(text)) {
    if (Date.now() > deadline) assert.fail(`the log of ${id} never showed "${text}"`);
    await new Promise((r) => setTimeout(r, 200));
  }
}
