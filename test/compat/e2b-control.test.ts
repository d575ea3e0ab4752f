/**
 * The E2B control plane's refusals, driven by the real `e2b` SDK, with no microVM booted (so
 * no VM lock needed): a wrong API key, an unknown template, an unknown sandbox, each raising
 * the SDK's own exception type from E2B's error body `{"code": <int>, "message"}`; both the
 * 2.51 routes and the older ones answer.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { AuthenticationError, NotFoundError, Sandbox, SandboxError, SandboxNotFoundError } from 'e2b';
import { startTestServer, type TestServer } from '../surfaces/helpers.ts';

describe('E2B control plane: refusals in E2B\'s shape', () => {
  let server: TestServer;
  let opts: { apiUrl: string; apiKey: string; sandboxUrl: string };

  before(async () => {
    server = await startTestServer();
    opts = { apiUrl: `${server.url}/e2b`, apiKey: server.adminKey, sandboxUrl: 'http://127.0.0.1:9' };
  });
  after(async () => server?.close());

  test('a wrong API key → 401 AuthenticationError; no key → 401 in E2B\'s body', async () => {
    await assert.rejects(Sandbox.create('base', { ...opts, apiKey: 'wrong' }), (e: unknown) => e instanceof AuthenticationError);
    const r = await fetch(`${server.url}/e2b/v2/sandboxes`);
    assert.equal(r.status, 401);
    const body = (await r.json()) as { code: number; message: unknown };
    assert.equal(body.code, 401);
    assert.equal(typeof body.message, 'string');
  });

  test('an unknown template → 404 (the SDK raises); an unknown sandbox → SandboxNotFoundError, kill → false', async () => {
    await assert.rejects(Sandbox.create('no-such-template', opts), (e: unknown) => e instanceof NotFoundError || e instanceof SandboxError);
    await assert.rejects(Sandbox.getInfo('mvm-00000000000000000000000000', opts), (e: unknown) => e instanceof SandboxNotFoundError);
    await assert.rejects(Sandbox.connect('mvm-00000000000000000000000000', opts), (e: unknown) => e instanceof SandboxNotFoundError);
    assert.equal(await Sandbox.kill('mvm-00000000000000000000000000', opts), false);
    assert.deepEqual(await Sandbox.list(opts).nextItems(), []);
  });

  test('old and new routes are both served (no 405 across the 2.51 switch)', async () => {
    const headers = { 'x-api-key': server.adminKey, 'content-type': 'application/json' };
    for (const [method, route] of [
      ['POST', '/sandboxes'], ['POST', '/v2/sandboxes'], ['GET', '/sandboxes'], ['GET', '/v2/sandboxes'],
      ['POST', '/sandboxes/mvm-x/connect'], ['POST', '/v2/sandboxes/mvm-x/connect'], ['POST', '/sandboxes/mvm-x/resume'],
      ['POST', '/sandboxes/mvm-x/pause'], ['POST', '/sandboxes/mvm-x/timeout'], ['DELETE', '/sandboxes/mvm-x'],
    ] as const) {
      const r = await fetch(`${server.url}/e2b${route}`, { method, headers, ...(method === 'POST' ? { body: JSON.stringify({ templateID: 'none', timeout: 10 }) } : {}) });
      assert.ok([200, 400, 404].includes(r.status), `${method} ${route}: ${r.status}`);
      if (r.status !== 200) assert.equal(((await r.json()) as { code: number }).code, r.status);
    }
  });
});
