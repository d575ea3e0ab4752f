/**
 * The real thing end to end, through the surfaces: the CLI and the SDK build the busybox app
 * into an image (real buildah, real QEMU), start microVMs, reach the app through the gateway,
 * suspend, resume, terminate; then another tenant tries every route on the first tenant's ids
 * and gets 404 each time. The image parts need the images module, the rest also the microvms
 * module; what a build lacks is skipped with the reason.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { after, before, describe, it } from 'node:test';
import {
  Cocoon,
  ConflictError,
  ImageBuildFailedError,
  NotFoundError,
  type Image,
  type MicroVM,
  type StartedMicroVM,
} from '../../packages/sdk/src/index.ts';
import { wsFactory } from '../../src/cli/websocket.ts';
import { busyboxFolder, cocoon, imageRoutesMissing, startTestServer, tempDir, vmRoutesMissing, writeTree, type TestServer } from './helpers.ts';

const EXIT = { ok: 0, failure: 1, usage: 2, notFound: 3, auth: 4, conflict: 5 };
const PAGE = /Hello from a Cocoon microVM/;

let server: TestServer | undefined;
/** Why the image tests cannot run (no images module), and why the microVM ones cannot. */
let noImages: string | undefined;
let noVms: string | undefined;
let folder: string;
let tenantA: { id: string; apiKey: string };
let tenantB: { id: string; apiKey: string };
let sdkA: Cocoon;
let flagsA: string[];
/** What the SDK test leaves for the cross-tenant test. */
const shared: { image?: Image; vm?: StartedMicroVM; bundleUri?: string; tokenId?: string; keyId?: string; cliImage?: { id: string; arn: string } } = {};

before(async () => {
  server = await startTestServer();
  noImages = imageRoutesMissing(server);
  noVms = vmRoutesMissing(server);
  if (noImages) return;
  const admin = new Cocoon({ apiUrl: server.url, apiKey: server.adminKey });
  tenantA = await admin.tenants.create({ name: 'flow-a' });
  tenantB = await admin.tenants.create({ name: 'flow-b' });
  sdkA = new Cocoon({ apiUrl: server.url, apiKey: tenantA.apiKey });
  flagsA = ['--api-url', server.url, '--api-key', tenantA.apiKey];
  folder = busyboxFolder();
});

after(async () => {
  if (server && !noVms) {
    // Terminate what a failed test may have left running, then stop the server.
    for (const client of [sdkA, new Cocoon({ apiUrl: server.url, apiKey: tenantB.apiKey })]) {
      for await (const vm of client.microvms.iterate({ state: ['PENDING', 'RUNNING', 'SUSPENDING', 'SUSPENDED', 'RESUMING'] })) {
        await client.microvms.terminate(vm.id).catch(() => undefined);
      }
    }
  }
  if (folder) fs.rmSync(folder, { recursive: true, force: true });
  await server?.close();
});

/** Plain HTTP to the gateway, the way any client would (no SDK). */
async function viaGateway(vm: MicroVM, token: string | undefined, pathname = '/'): Promise<{ status: number; text: string }> {
  const url = new URL(vm.url);
  const headers: Record<string, string> = { 'x-cocoon-microvm': vm.id };
  if (token) headers['x-cocoon-token'] = token;
  const response = await fetch(`http://127.0.0.1:${url.port}${pathname}`, { headers });
  return { status: response.status, text: await response.text() };
}

describe('through the surfaces, end to end', { timeout: 60 * 60_000 }, () => {
  it('CLI: folder → bundle → image (build log, phases); list, get, logs, delete', async (t) => {
    if (noImages) return t.skip(noImages);
    // bundle push, then image create from the bundle URI; and image create from the folder with --wait.
    const pushed = await cocoon([...flagsA, 'bundle', 'push', folder, '--json']);
    assert.equal(pushed.code, EXIT.ok, pushed.stderr);
    const pending = await cocoon([...flagsA, 'image', 'create', 'web-cancelled', pushed.json.uri, '--json']);
    assert.equal(pending.code, EXIT.ok, pending.stderr);
    assert.ok(['PENDING', 'BUILDING'].includes(pending.json.state), pending.json.state);
    const deleted = await cocoon([...flagsA, 'image', 'delete', pending.json.id, '--json']);
    assert.equal(deleted.code, EXIT.ok, deleted.stderr);
    assert.deepEqual(deleted.json, { deleted: pending.json.id });
    assert.equal((await cocoon([...flagsA, 'image', 'get', pending.json.id])).code, EXIT.notFound);

    const built = await cocoon([...flagsA, 'image', 'create', 'web', folder, '--wait', '--memory', '256']);
    assert.equal(built.code, EXIT.ok, `${built.stdout}\n${built.stderr}`);
    assert.match(built.stdout, /^Uploading /m);
    assert.match(built.stdout, /^Image web:1 \(img-[0-9a-z]+\) is (PENDING|BUILDING)$/m);
    assert.match(built.stdout, /^==> (BUILDING|BOOTING|SNAPSHOTTING): /m, 'build phases are shown');
    assert.match(built.stdout, /^ {4}\S.*$/m, 'build log lines are streamed');
    assert.match(built.stdout, /✓ Image web:1 is READY\n {2}arn:cocoon:local-1:\d{12}:microvm-image\/web:1\nNext: cocoon vm start img-/);
    const imageId = /Next: cocoon vm start (img-[0-9a-z]+)/.exec(built.stdout)![1]!;

    const list = await cocoon([...flagsA, 'image', 'list', '--json']);
    assert.equal(list.code, EXIT.ok);
    assert.deepEqual(list.json.items.map((i: Image) => [i.id, i.state]), [[imageId, 'READY']]);
    const table = await cocoon([...flagsA, 'image', 'ls', '--state', 'READY']);
    assert.match(table.stdout, new RegExp(`^ID +IMAGE +STATE .*\\n${imageId} +web:1 +READY +1 +256 MiB +8080 `, 'm'));
    const got = await cocoon([...flagsA, 'image', 'get', imageId]);
    assert.match(got.stdout, /^state: +READY$/m);
    const arn = /^arn: +(\S+)$/m.exec(got.stdout)![1]!;
    const byArn = await cocoon([...flagsA, 'image', 'get', arn, '--json']);
    assert.equal(byArn.json.id, imageId);
    const log = await cocoon([...flagsA, 'image', 'logs', imageId]);
    assert.equal(log.code, EXIT.ok);
    assert.ok(log.stdout.length > 100, 'the build log is kept');
    const followed = await cocoon([...flagsA, 'image', 'logs', '-f', imageId]);
    assert.equal(followed.code, EXIT.ok, 'following a finished build ends');
    assert.equal(followed.stdout, log.stdout.endsWith('\n') ? log.stdout : `${log.stdout}\n`);
    const logJson = await cocoon([...flagsA, 'image', 'logs', imageId, '--json']);
    assert.equal(logJson.json.log, log.stdout);
    shared.cliImage = { id: imageId, arn };
  });

  it('CLI: microVMs → the app via vm curl → tokens → suspend, wake, resume, terminate', async (t) => {
    if (noImages || noVms) return t.skip(noImages ?? noVms);
    assert.ok(shared.cliImage, 'the CLI image test ran first');
    const { id: imageId, arn } = shared.cliImage;

    // vm start waits for RUNNING and says what to do next.
    const started = await cocoon([...flagsA, 'vm', 'start', imageId]);
    assert.equal(started.code, EXIT.ok, `${started.stdout}\n${started.stderr}`);
    assert.match(started.stdout, /✓ mvm-[0-9a-z]+ is RUNNING/);
    assert.match(started.stdout, /^url: +http:\/\/mvm-[0-9a-z]+\.vm\.localhost:\d+$/m);
    assert.match(started.stdout, /^token: +\S+$/m);
    assert.match(started.stdout, /Next:\n {2}cocoon vm curl mvm-[0-9a-z]+ \/\n {2}curl -H 'X-Cocoon-Token: \S+' -H 'X-Cocoon-MicroVM: mvm-[0-9a-z]+' http:\/\/127\.0\.0\.1:\d+\//);
    const vmId = /✓ (mvm-[0-9a-z]+) is RUNNING/.exec(started.stdout)![1]!;

    // An idempotent start with a lifecycle, as JSON, without waiting.
    const args = [...flagsA, 'vm', 'start', arn, '--json', '--no-wait', '--max-idle', '600', '--no-auto-resume', '--suspended-duration', '900', '--max-duration', '3600', '--client-token', 'flow-1'];
    const second = await cocoon(args);
    assert.equal(second.code, EXIT.ok, second.stderr);
    assert.ok(second.json.token);
    assert.deepEqual(second.json.idlePolicy, { autoResumeEnabled: false, maxIdleDurationSeconds: 600, suspendedDurationSeconds: 900 });
    assert.equal(second.json.maximumDurationSeconds, 3600);
    const replay = await cocoon(args);
    assert.equal(replay.json.id, second.json.id, 'the same client token starts nothing new');

    const vms = await cocoon([...flagsA, 'vm', 'list', '--json']);
    assert.deepEqual(new Set(vms.json.items.map((v: MicroVM) => v.id)), new Set([vmId, second.json.id]));
    const vmTable = await cocoon([...flagsA, 'vm', 'ls', '--image', imageId]);
    assert.match(vmTable.stdout, /^ID +IMAGE +STATE +URL +SESSION ENDS +CREATED$/m);
    const vmGet = await cocoon([...flagsA, 'vm', 'get', vmId]);
    assert.match(vmGet.stdout, /^idle policy: +suspend after 300s idle; a request wakes it; stays suspended until the session ends$/m);

    // vm curl: a fresh token each time, through the gateway.
    const page = await cocoon([...flagsA, 'vm', 'curl', vmId]);
    assert.equal(page.code, EXIT.ok, page.stderr);
    assert.match(page.stdout, PAGE);
    const cgi = await cocoon([...flagsA, 'vm', 'curl', vmId, '/cgi-bin/hello', '-i']);
    assert.match(cgi.stdout, /^HTTP\/1\.1 200 OK\r\n/);
    assert.match(cgi.stdout, /\r\n\r\nhello from cocoon\n$/);
    const missing = await cocoon([...flagsA, 'vm', 'curl', vmId, '/nope', '--fail', '--json']);
    assert.equal(missing.code, EXIT.failure);
    assert.equal(missing.json.status, 404);

    // Tokens: make, use with plain HTTP, list, revoke.
    const token = await cocoon([...flagsA, 'vm', 'token', vmId, '--expiration-minutes', '5', '--port', '8080', '--json']);
    assert.equal(token.code, EXIT.ok, token.stderr);
    assert.deepEqual(token.json.allowedPorts, [8080]);
    const vm = (await cocoon([...flagsA, 'vm', 'get', vmId, '--json'])).json as MicroVM;
    assert.match((await viaGateway(vm, token.json.token)).text, PAGE);
    assert.ok([401, 403].includes((await viaGateway(vm, undefined)).status), 'no token, no entry');
    const tokens = await cocoon([...flagsA, 'vm', 'token', vmId, '--list', '--json']);
    assert.ok(tokens.json.items.some((t: { id: string }) => t.id === token.json.id));
    const revoke = await cocoon([...flagsA, 'vm', 'token', vmId, '--revoke', token.json.id]);
    assert.equal(revoke.code, EXIT.ok, revoke.stderr);
    assert.ok([401, 403].includes((await viaGateway(vm, token.json.token)).status), 'a revoked token is refused at once');
    const withRevoked = await cocoon([...flagsA, 'vm', 'curl', vmId, '--token', token.json.token, '--fail']);
    assert.equal(withRevoked.code, EXIT.failure);

    // Suspend; a request wakes it (autoResumeEnabled); suspend and resume through the CLI.
    const suspended = await cocoon([...flagsA, 'vm', 'suspend', vmId]);
    assert.equal(suspended.code, EXIT.ok, suspended.stderr);
    assert.match(suspended.stdout, /^Snapshotting mvm-[0-9a-z]+…\n✓ mvm-[0-9a-z]+ is SUSPENDED\nWake it: cocoon vm resume/);
    const woken = await cocoon([...flagsA, 'vm', 'curl', vmId, '/cgi-bin/hello']);
    assert.equal(woken.stdout, 'hello from cocoon\n', 'a request wakes a suspended microVM');
    assert.equal((await cocoon([...flagsA, 'vm', 'suspend', vmId, '--json'])).json.state, 'SUSPENDED');
    const resumed = await cocoon([...flagsA, 'vm', 'resume', vmId, '--json']);
    assert.equal(resumed.code, EXIT.ok, resumed.stderr);
    assert.equal(resumed.json.state, 'RUNNING');
    if (server!.has('GET', '/api/v1/microvms/:id/logs')) {
      const vmLog = await cocoon([...flagsA, 'vm', 'logs', vmId]);
      assert.equal(vmLog.code, EXIT.ok, vmLog.stderr);
      assert.match(vmLog.stdout, /response:200/, "the app's own output (busybox httpd -v) is in the log");
    }

    // The image stays while microVMs use it.
    const inUse = await cocoon([...flagsA, 'image', 'delete', imageId, '--json']);
    assert.equal(inUse.code, EXIT.conflict);
    assert.equal(inUse.error.status, 409);

    // Terminate both; the gateway then answers 410; the image can go.
    const terminated = await cocoon([...flagsA, 'vm', 'terminate', vmId]);
    assert.equal(terminated.code, EXIT.ok, terminated.stderr);
    assert.match(terminated.stdout, /✓ mvm-[0-9a-z]+ is TERMINATED/);
    assert.equal((await cocoon([...flagsA, 'vm', 'terminate', second.json.id, '--json'])).json.state, 'TERMINATED');
    const gone = await cocoon([...flagsA, 'vm', 'curl', vmId, '--json']);
    assert.ok([404, 410].includes(gone.json?.status) || gone.code !== EXIT.ok, `${gone.stdout} ${gone.stderr}`);
    assert.equal((await cocoon([...flagsA, 'image', 'delete', imageId])).code, EXIT.ok);
  });

  it('CLI: a failing build exits 1 and points at the log; a folder without Dockerfile exits 2', async (t) => {
    if (noImages) return t.skip(noImages);
    const broken = tempDir();
    const empty = tempDir();
    try {
      writeTree(broken, { Dockerfile: 'FROM busybox\nRUN echo "about to fail" && exit 3\n' });
      const failed = await cocoon([...flagsA, 'image', 'create', 'broken', broken, '--wait']);
      assert.equal(failed.code, EXIT.failure, failed.stdout);
      assert.match(failed.stderr, /^cocoon: image img-[0-9a-z]+ failed to build: /);
      assert.match(failed.stderr, /→ read the build log: cocoon image logs img-/);
      assert.match(failed.stdout, /about to fail/, 'the log showed why');
      const json = await cocoon([...flagsA, 'image', 'list', '--state', 'FAILED', '--json']);
      assert.equal(json.json.items[0].name, 'broken');
      assert.ok(json.json.items[0].error);
      const noDockerfile = await cocoon([...flagsA, 'image', 'create', 'x', empty, '--json']);
      assert.equal(noDockerfile.code, EXIT.usage);
      const badBundle = await cocoon([...flagsA, 'image', 'create', 'x', '--bundle', `cocoon://bundles/${'0'.repeat(64)}.tar.gz`, '--json']);
      assert.equal(badBundle.code, EXIT.notFound, badBundle.stderr);
      if (!noVms) {
        const fromFailed = await cocoon([...flagsA, 'vm', 'start', json.json.items[0].id, '--json']);
        assert.ok([EXIT.usage, EXIT.conflict].includes(fromFailed.code), `a FAILED image starts nothing: ${fromFailed.stderr}`);
      }
    } finally {
      fs.rmSync(broken, { recursive: true, force: true });
      fs.rmSync(empty, { recursive: true, force: true });
    }
  });

  it('SDK: push a folder, follow the build log line by line, wait until READY, list', async (t) => {
    if (noImages) return t.skip(noImages);
    const bundle = await sdkA.bundles.push(folder);
    shared.bundleUri = bundle.uri;
    const created = await sdkA.images.create({ name: 'sdk-web', bundle: bundle.uri, readiness: { httpPath: '/' } });
    assert.equal(created.name, 'sdk-web');
    const lines: string[] = [];
    for await (const line of sdkA.images.logs(created.id, { follow: true })) lines.push(line);
    assert.ok(lines.length > 3, 'the build log streamed line by line');
    const phases: string[] = [];
    const image = await sdkA.images.waitUntilReady(created.id, { onState: (i) => phases.push(i.state) });
    assert.equal(image.state, 'READY');
    assert.equal(phases.at(-1), 'READY');
    shared.image = image;
    const listed = [];
    for await (const i of sdkA.images.iterate({ limit: 1, state: 'READY' })) listed.push(i.id);
    assert.ok(listed.includes(image.id));
    const keyA = await sdkA.apiKeys.create({ name: 'cross-tenant-target' });
    shared.keyId = keyA.id;
  });

  it('SDK: start, fetch through the gateway, tokens, suspend and wake', async (t) => {
    if (noImages || noVms) return t.skip(noImages ?? noVms);
    assert.ok(shared.image, 'the SDK image test ran first');
    const image = shared.image;
    const vm = await sdkA.microvms.start({ image: image.arn, idlePolicy: { maxIdleDurationSeconds: 3600 } });
    shared.vm = vm;
    assert.match(vm.arn, /^arn:cocoon:local-1:\d{12}:microvm\/mvm-/);
    assert.ok(vm.token);
    const running = await sdkA.microvms.waitForState(vm.id, 'RUNNING');
    assert.equal(running.state, 'RUNNING');
    const answer = await sdkA.microvms.fetch(running, '/');
    assert.equal(answer.status, 200);
    assert.match(await answer.text(), PAGE);
    assert.match(await (await sdkA.microvms.fetch(vm.id, '/cgi-bin/hello', { token: vm.token! })).text(), /hello from cocoon/);

    const issued = await sdkA.tokens.create(vm.id, { expirationMinutes: 1, allowedPorts: [8080] });
    shared.tokenId = issued.id;
    assert.equal((await sdkA.microvms.fetch(vm, '/', { token: issued.token })).status, 200);
    const refused = await sdkA.microvms.fetch(vm, '/', { token: issued.token, port: 9999 });
    assert.equal(refused.status, 403, 'the token allows only its ports');
    assert.ok((await sdkA.tokens.list(vm.id)).some((x) => x.id === issued.id));
    const other = await sdkA.tokens.create(vm.id);
    await sdkA.tokens.revoke(vm.id, other.id);
    assert.ok([401, 403].includes((await sdkA.microvms.fetch(vm, '/', { token: other.token })).status));

    const suspended = await sdkA.microvms.suspend(vm.id);
    assert.equal((await sdkA.microvms.waitForState(suspended.id, 'SUSPENDED')).state, 'SUSPENDED');
    assert.equal((await sdkA.microvms.fetch(vm, '/')).status, 200, 'a request wakes it');
    assert.equal((await sdkA.microvms.get(vm.id)).state, 'RUNNING');
    await assert.rejects(sdkA.images.delete(image.id), ConflictError);
  });

  it('SDK: a build that fails rejects waitUntilReady with ImageBuildFailedError', async (t) => {
    if (noImages) return t.skip(noImages);
    const broken = tempDir();
    try {
      writeTree(broken, { Dockerfile: 'FROM busybox\nRUN exit 7\n' });
      const image = await sdkA.images.create({ name: 'sdk-broken', bundle: (await sdkA.bundles.push(broken)).uri });
      await assert.rejects(sdkA.images.waitUntilReady(image.id), (e: unknown) => e instanceof ImageBuildFailedError && e.image.id === image.id && Boolean(e.image.error));
    } finally {
      fs.rmSync(broken, { recursive: true, force: true });
    }
  });

  it("cross-tenant: every route answers 404 for another tenant's ids, and changes nothing", async (t) => {
    if (noImages) return t.skip(noImages);
    assert.ok(shared.image && shared.keyId && shared.bundleUri, 'the SDK image test ran first');
    if (!noVms) assert.ok(shared.vm && shared.tokenId, 'the SDK microVM test ran first');
    const image = shared.image;
    // Without the microVM module its routes are absent and their cases are left out below.
    const vm = shared.vm ?? ({ id: 'mvm-00000000000000000000000000', arn: 'arn:cocoon:local-1:000000000000:microvm/none' } as StartedMicroVM);
    const b = (method: string, url: string, body?: unknown, raw?: string) =>
      fetch(`${server!.url}/api/v1${url}`, {
        method,
        headers: {
          authorization: `Bearer ${tenantB.apiKey}`,
          ...(body !== undefined ? { 'content-type': 'application/json' } : {}),
          ...(raw !== undefined ? { 'content-type': 'application/octet-stream' } : {}),
        },
        ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
        ...(raw !== undefined ? { body: raw } : {}),
      });
    const enc = encodeURIComponent;
    // One case per route that takes an id (or refers to another tenant's resource in its body).
    const cases: Array<{ route: string; method: string; url: string; body?: unknown; raw?: string }> = [
      { route: 'GET /api/v1/images/:id', method: 'GET', url: `/images/${image.id}` },
      { route: 'GET /api/v1/images/:id', method: 'GET', url: `/images/${enc(image.arn)}` },
      { route: 'GET /api/v1/images/:id/logs', method: 'GET', url: `/images/${image.id}/logs` },
      { route: 'GET /api/v1/images/:id/logs', method: 'GET', url: `/images/${image.id}/logs?follow=1` },
      { route: 'DELETE /api/v1/images/:id', method: 'DELETE', url: `/images/${image.id}` },
      { route: 'POST /api/v1/images', method: 'POST', url: '/images', body: { name: 'stolen', bundle: shared.bundleUri } },
      { route: 'POST /api/v1/microvms', method: 'POST', url: '/microvms', body: { image: image.id } },
      { route: 'POST /api/v1/microvms', method: 'POST', url: '/microvms', body: { image: image.arn } },
      { route: 'GET /api/v1/microvms/:id', method: 'GET', url: `/microvms/${vm.id}` },
      { route: 'GET /api/v1/microvms/:id', method: 'GET', url: `/microvms/${enc(vm.arn)}` },
      { route: 'POST /api/v1/microvms/:id/suspend', method: 'POST', url: `/microvms/${vm.id}/suspend` },
      { route: 'POST /api/v1/microvms/:id/resume', method: 'POST', url: `/microvms/${vm.id}/resume` },
      { route: 'POST /api/v1/microvms/:id/fork', method: 'POST', url: `/microvms/${vm.id}/fork`, body: { count: 1 } },
      { route: 'POST /api/v1/microvms/:id/checkpoint', method: 'POST', url: `/microvms/${vm.id}/checkpoint`, body: {} },
      { route: 'DELETE /api/v1/microvms/:id', method: 'DELETE', url: `/microvms/${vm.id}` },
      { route: 'GET /api/v1/microvms/:id/logs', method: 'GET', url: `/microvms/${vm.id}/logs` },
      { route: 'POST /api/v1/microvms/:id/tokens', method: 'POST', url: `/microvms/${vm.id}/tokens`, body: {} },
      { route: 'GET /api/v1/microvms/:id/tokens', method: 'GET', url: `/microvms/${vm.id}/tokens` },
      { route: 'DELETE /api/v1/microvms/:id/tokens/:tokenId', method: 'DELETE', url: `/microvms/${vm.id}/tokens/${shared.tokenId}` },
      { route: 'DELETE /api/v1/api-keys/:id', method: 'DELETE', url: `/api-keys/${shared.keyId}` },
      // Inside the microVM: exec, processes, files.
      { route: 'POST /api/v1/microvms/:id/exec', method: 'POST', url: `/microvms/${vm.id}/exec`, body: { command: ['rm', '-rf', '/www'] } },
      { route: 'POST /api/v1/microvms/:id/exec', method: 'POST', url: `/microvms/${vm.id}/exec`, body: { command: ['sleep', '600'], background: true } },
      { route: 'GET /api/v1/microvms/:id/processes', method: 'GET', url: `/microvms/${vm.id}/processes` },
      { route: 'GET /api/v1/microvms/:id/processes/:pid/output', method: 'GET', url: `/microvms/${vm.id}/processes/1/output` },
      { route: 'POST /api/v1/microvms/:id/processes/:pid/stdin', method: 'POST', url: `/microvms/${vm.id}/processes/1/stdin`, raw: 'x' },
      { route: 'POST /api/v1/microvms/:id/processes/:pid/signal', method: 'POST', url: `/microvms/${vm.id}/processes/1/signal`, body: { signal: 'SIGKILL' } },
      { route: 'POST /api/v1/microvms/:id/processes/:pid/resize', method: 'POST', url: `/microvms/${vm.id}/processes/1/resize`, body: { cols: 80, rows: 24 } },
      { route: 'PUT /api/v1/microvms/:id/files', method: 'PUT', url: `/microvms/${vm.id}/files?path=/www/index.html`, raw: 'defaced' },
      { route: 'GET /api/v1/microvms/:id/files', method: 'GET', url: `/microvms/${vm.id}/files?path=/www/index.html` },
      { route: 'GET /api/v1/microvms/:id/files/stat', method: 'GET', url: `/microvms/${vm.id}/files/stat?path=/www` },
      { route: 'GET /api/v1/microvms/:id/files/list', method: 'GET', url: `/microvms/${vm.id}/files/list?path=/www` },
      { route: 'GET /api/v1/microvms/:id/files/watch', method: 'GET', url: `/microvms/${vm.id}/files/watch?path=/www` },
      { route: 'POST /api/v1/microvms/:id/files/mkdir', method: 'POST', url: `/microvms/${vm.id}/files/mkdir`, body: { path: '/www/stolen' } },
      { route: 'POST /api/v1/microvms/:id/files/remove', method: 'POST', url: `/microvms/${vm.id}/files/remove`, body: { path: '/www', recursive: true } },
      { route: 'POST /api/v1/microvms/:id/files/rename', method: 'POST', url: `/microvms/${vm.id}/files/rename`, body: { from: '/www/index.html', to: '/tmp/taken' } },
      { route: 'POST /api/v1/microvms/:id/files/chmod', method: 'POST', url: `/microvms/${vm.id}/files/chmod`, body: { path: '/www', mode: '0000' } },
    ];
    const covered = new Set<string>();
    for (const c of cases) {
      if (!server!.has(c.method, c.route.split(' ')[1]!)) continue;
      const response = await b(c.method, c.url, c.body, c.raw);
      const body = (await response.json().catch(() => undefined)) as { error?: { code: string; message: string } } | undefined;
      assert.equal(response.status, 404, `${c.method} ${c.url} as another tenant: ${JSON.stringify(body)}`);
      assert.match(body?.error?.code ?? '', /not_found$/, `${c.method} ${c.url}`);
      assert.ok(!JSON.stringify(body).includes(tenantA.id), 'the answer names nothing of the owner');
      covered.add(c.route);
    }
    // The exec WebSocket: the upgrade happens, then the start is refused with not found.
    if (server!.has('GET', '/api/v1/microvms/:id/exec/ws')) {
      const asB = new Cocoon({ apiUrl: server!.url, apiKey: tenantB.apiKey, webSocket: wsFactory });
      await assert.rejects(asB.exec.session(vm.id, { command: ['rm', '-rf', '/www'] }), (e: unknown) => e instanceof NotFoundError && /not_found$/.test(e.code));
      await assert.rejects(asB.pty.open(vm.id), NotFoundError);
      covered.add('GET /api/v1/microvms/:id/exec/ws');
    }
    // Every route with an id (and every create that refers to one) has a case: new routes must be added here.
    const needing = server!.routes
      .filter((r) => r.method !== 'HEAD' && r.url.startsWith('/api/v1/') && (r.url.includes(':') || r.url === '/api/v1/microvms' && r.method === 'POST' || r.url === '/api/v1/images' && r.method === 'POST'))
      .filter((r) => !r.url.startsWith('/api/v1/tenants/'))
      .map((r) => `${r.method} ${r.url}`);
    assert.deepEqual(needing.filter((r) => !covered.has(r)), [], 'every route that takes an id is tried across tenants');

    // B's lists show nothing of A's.
    const sdkB = new Cocoon({ apiUrl: server!.url, apiKey: tenantB.apiKey });
    assert.deepEqual((await sdkB.images.list()).items, []);
    if (!noVms) assert.deepEqual((await sdkB.microvms.list()).items, []);
    assert.ok(!(await sdkB.apiKeys.list()).items.some((k) => k.id === shared.keyId));
    // The same through the CLI: not found, exit 3.
    const flagsB = ['--api-url', server!.url, '--api-key', tenantB.apiKey];
    const cliCases = [['image', 'get', image.id], ['image', 'logs', image.id], ['image', 'delete', image.id]];
    if (!noVms) cliCases.push(['vm', 'get', vm.id], ['vm', 'suspend', vm.id], ['vm', 'terminate', vm.id], ['vm', 'curl', vm.id], ['vm', 'token', vm.id]);
    for (const args of cliCases) {
      const result = await cocoon([...flagsB, ...args, '--json']);
      assert.equal(result.code, EXIT.notFound, `${args.join(' ')}: ${result.stderr}`);
    }
    // Nothing of A's changed: its image is READY, its key works, the microVM still runs and answers.
    assert.equal((await sdkA.images.get(image.id)).state, 'READY');
    assert.ok((await sdkA.apiKeys.list()).items.find((k) => k.id === shared.keyId && !k.revokedAt));
    if (!noVms) {
      assert.equal((await sdkA.microvms.get(vm.id)).state, 'RUNNING');
      assert.ok((await sdkA.tokens.list(vm.id)).find((x) => x.id === shared.tokenId && !x.revokedAt));
      assert.equal((await sdkA.microvms.fetch(vm, '/')).status, 200);
      if (server!.has('POST', '/api/v1/microvms/:id/exec')) {
        assert.match(await sdkA.files.read(vm.id, '/www/index.html'), /Hello from a Cocoon microVM/, 'the page is untouched');
        assert.deepEqual(await sdkA.exec.list(vm.id), [], 'no process was started for B');
      }
      await sdkA.microvms.terminate(vm.id);
      assert.equal((await sdkA.microvms.get(vm.id)).state, 'TERMINATED');
    }
    await sdkA.images.delete(image.id);
  });
});

