/**
 * AWS-style HTTP hooks (image feature `httpHooks`), end to end with the real pipeline (buildah,
 * FROM busybox), real QEMU and the real gateway. The guest runs the C test app twice: on 8080
 * (the app) and on 9000 (the hooks listener), which logs every hook call ("<hook> <body>") and
 * answers as its TESTAPP_HOOK_<NAME> environment says (see test/support/testapp.c).
 *
 * One bundle for the file (buildah's cache makes the second and third builds cheap):
 *   - good image: ready answers 503 twice then 200 (retried), run/suspend/resume/terminate
 *     enabled, terminate sleeps past its 1 s timeout;
 *   - validate answering 500 fails the build with a clear error;
 *   - a ready hook on a port nothing listens on fails the build after its timeout.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { after, before, describe, test } from 'node:test';
import type { RunningServer } from '../../src/server.ts';
import type { MicrovmModule } from '../../src/wiring/microvms.ts';
import type { Client } from '../images/helpers.ts';
import { startPlatform, stopPlatform, testAppBundle, type Platform } from '../support/fixtures.ts';
import { gatewayRequest } from '../support/server.ts';
import { tempDir } from '../support/vm.ts';

const SLOW = { timeout: 900_000 };
const HOOKS_PORT = 9000;
const PAYLOAD = 'payload: {"job": 42}\nsecond line ü';

/** The test app on 8080 and 9000 (hooks): ready answers 503 twice then 200, validate 500, terminate sleeps 5 s. */
const HOOKS_ENV = { TESTAPP_HOOK_READY: 'unavailable=2', TESTAPP_HOOK_VALIDATE: 'status=500', TESTAPP_HOOK_TERMINATE: 'sleep=5000' };

describe('HTTP hooks (AWS Lambda MicroVMs style)', () => {
  const dataDir = tempDir('cocoon-http-hooks-');
  const scratch = tempDir('cocoon-http-hooks-bundle-');
  let platform: Platform | undefined;
  let server: RunningServer;
  let microvms: MicrovmModule;
  let api: Client;
  let bundleUri: string;
  let goodImage: any;
  const started: string[] = [];

  before(async () => {
    platform = await startPlatform({ dataDir });
    ({ server, microvms, api } = platform);
    const upload = await api.uploadBundle(testAppBundle(scratch, { secondPort: HOOKS_PORT, env: HOOKS_ENV }));
    assert.equal(upload.status, 201, upload.text);
    bundleUri = upload.body.uri;
    const created = await api.post('/images', {
      name: 'hooks',
      bundle: bundleUri,
      httpHooks: {
        port: HOOKS_PORT,
        ready: { timeoutSeconds: 120 },
        run: {},
        suspend: { timeoutSeconds: 10 },
        resume: { timeoutSeconds: 10 },
        terminate: { timeoutSeconds: 1 },
      },
    });
    assert.equal(created.status, 202, created.text);
    assert.deepEqual(created.body.httpHooks, {
      port: HOOKS_PORT,
      ready: { timeoutSeconds: 120 },
      run: { timeoutSeconds: 10 },
      suspend: { timeoutSeconds: 10 },
      resume: { timeoutSeconds: 10 },
      terminate: { timeoutSeconds: 1 },
    });
    goodImage = await api.waitForState(created.body.id, ['READY', 'FAILED'], 850_000);
    assert.equal(goodImage.state, 'READY', goodImage.error);
  }, SLOW);

  after(async () => {
    for (const id of started) await api?.delete(`/microvms/${id}`).catch(() => undefined);
    const leaked = await stopPlatform(platform, dataDir);
    fs.rmSync(scratch, { recursive: true, force: true });
    assert.deepEqual(leaked, [], 'no QEMU left');
  });

  async function waitState(id: string, state: string): Promise<any> {
    for (let i = 0; i < 3000; i++) {
      const answer = await api.get(`/microvms/${id}`);
      if (answer.body.state === state) return answer.body;
      if (['FAILED', 'TERMINATED'].includes(answer.body.state) && state !== answer.body.state) assert.fail(`microVM ${id} is ${answer.body.state}: ${answer.body.error}`);
      await new Promise((r) => setTimeout(r, 100));
    }
    assert.fail(`microVM ${id} never reached ${state}`);
  }

  async function hookLog(id: string, token: string): Promise<string[]> {
    const answer = await gatewayRequest(microvms.gatewayPort, id, token, '/aws-hooks');
    assert.equal(answer.status, 200, answer.body);
    return answer.body.split('\n').filter((l) => l !== '');
  }

  async function hookEvents(id: string): Promise<Array<{ message: string; data: any }>> {
    const rows = await server.db.all<{ message: string; data: string | null }>(
      "SELECT message, data FROM events WHERE resource_type = 'microvm' AND resource_id = ? AND type = 'hook' ORDER BY id",
      [id],
    );
    return rows.map((r) => ({ message: r.message, data: r.data ? JSON.parse(r.data) : null }));
  }

  test('the build asks ready until it answers 200 (503 twice first), before the snapshot; the build log says so', SLOW, async () => {
    const log = await api.get(`/images/${goodImage.id}/logs`);
    assert.match(log.text, /HTTP hook ready: POST \/aws\/lambda-microvms\/runtime\/v1\/ready on port 9000/);
    assert.match(log.text, /HTTP hook ready: 200 after \d+ ms/);
    assert.ok(log.text.indexOf('HTTP hook ready: 200') < log.text.indexOf('state BOOTING → SNAPSHOTTING'), 'ready before the snapshot');
  });

  test('run (with runHookPayload as its body), suspend, resume, terminate are called in order; terminate past its timeout is recorded', SLOW, async () => {
    const vm = await api.post('/microvms', { image: goodImage.id, runHookPayload: PAYLOAD });
    assert.equal(vm.status, 201, vm.text);
    assert.equal(JSON.stringify(vm.body).includes('job'), false, 'the payload is not in the answer');
    started.push(vm.body.id);
    const id = vm.body.id as string;
    const token = vm.body.token as string;
    await waitState(id, 'RUNNING');
    // The three ready calls were made during the build: the snapshot keeps their log lines.
    const escaped = PAYLOAD.replace(/\\/g, '\\\\').replace(/\n/g, '\\n');
    assert.deepEqual(await hookLog(id, token), ['ready ', 'ready ', 'ready ', `run ${escaped}`]);
    // The payload is dropped once sent.
    const kept = await server.db.get<{ run_hook_payload: string | null }>('SELECT run_hook_payload FROM microvms WHERE id = ?', [id]);
    assert.equal(kept?.run_hook_payload, null);

    assert.equal((await api.post(`/microvms/${id}/suspend`)).status, 200);
    await waitState(id, 'SUSPENDED');
    assert.equal((await api.post(`/microvms/${id}/resume`)).status, 200);
    await waitState(id, 'RUNNING');
    assert.deepEqual((await hookLog(id, token)).slice(3), [`run ${escaped}`, 'suspend ', 'resume ']);

    const microvmLog = await api.get(`/microvms/${id}/logs`);
    assert.equal(microvmLog.text.includes('job'), false, 'the payload is never logged');
    assert.match(microvmLog.text, /HTTP hook run: 200 after \d+ ms/);

    assert.equal((await api.delete(`/microvms/${id}`)).status, 204);
    await waitState(id, 'TERMINATED');
    const events = await hookEvents(id);
    assert.deepEqual(events.map((e) => [e.data.hook, e.data.status]), [['run', 200], ['suspend', 200], ['resume', 200], ['terminate', 'timeout']]);
    assert.match(events[3]!.message, /HTTP hook terminate did not answer 200 within 1 s/);
    for (const e of events) assert.equal(JSON.stringify(e).includes('job'), false, 'no payload in events');
  });

  test('runHookPayload over 4096 bytes is refused with 400', async () => {
    const answer = await api.post('/microvms', { image: goodImage.id, runHookPayload: 'ü'.repeat(2049) });
    assert.equal(answer.status, 400, answer.text);
    assert.match(answer.text, /runHookPayload/);
  });

  test('invalid httpHooks are refused with 400 (unknown hook, timeout out of range, missing port)', async () => {
    for (const httpHooks of [{ port: 9000, start: {} }, { port: 9000, run: { timeoutSeconds: 61 } }, { ready: {} }, { port: 0 }]) {
      const answer = await api.post('/images', { name: 'bad', bundle: bundleUri, httpHooks });
      assert.equal(answer.status, 400, `${JSON.stringify(httpHooks)}: ${answer.text}`);
    }
  });

  test('a validate hook that answers 500 fails the build with a clear error', SLOW, async () => {
    const created = await api.post('/images', { name: 'hooks-bad-validate', bundle: bundleUri, httpHooks: { port: HOOKS_PORT, ready: {}, validate: { timeoutSeconds: 30 } } });
    assert.equal(created.status, 202, created.text);
    const image = await api.waitForState(created.body.id, ['READY', 'FAILED'], 850_000);
    assert.equal(image.state, 'FAILED');
    assert.match(image.error, /^http_hook_failed: the validate hook \(POST \/aws\/lambda-microvms\/runtime\/v1\/validate on port 9000 in the guest\) answered HTTP 500/);
  });

  test('a ready hook that never answers 200 fails the build once its timeout has passed', SLOW, async () => {
    const created = await api.post('/images', { name: 'hooks-no-listener', bundle: bundleUri, httpHooks: { port: 9999, ready: { timeoutSeconds: 3 } } });
    assert.equal(created.status, 202, created.text);
    const image = await api.waitForState(created.body.id, ['READY', 'FAILED'], 850_000);
    assert.equal(image.state, 'FAILED');
    assert.match(image.error, /^http_hook_failed: the ready hook \(POST \/aws\/lambda-microvms\/runtime\/v1\/ready on port 9999 in the guest\) did not answer 200 within 3 s/);
  });
});
