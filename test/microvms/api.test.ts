/**
 * The microVM API (docs/contract.md): validation, idempotent starts, listing with filters and
 * pagination, tokens, and tenant isolation (another tenant's microVM is a 404, never a 403).
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { createImage, type Image } from '../../src/store/images.ts';
import { createTestImage } from '../support/image.ts';
import { apiClient, gatewayRequest, startTestServer, stopTestServer, type ApiClient, type TestServer } from '../support/server.ts';
import { tempDir } from '../support/vm.ts';

describe('microVM API', () => {
  const dataDir = tempDir('cocoon-mvm-');
  let s: TestServer;
  let image: Image;
  let other: ApiClient;
  const started: string[] = [];

  before(async () => {
    s = await startTestServer({ dataDir });
    image = await createTestImage({ db: s.server.db, dataDir, tenantId: s.adminTenantId });
    const tenant = await s.api('POST', '/tenants', { name: 'someone-else' });
    assert.equal(tenant.status, 201);
    other = apiClient(s.server.apiUrl, tenant.body.apiKey);
  });
  after(async () => {
    for (const id of started) await s.api('DELETE', `/microvms/${id}`);
    const leaked = await stopTestServer(s, dataDir);
    assert.deepEqual(leaked, [], 'a test left QEMU processes running');
  });

  async function start(body: Record<string, unknown> = {}) {
    const answer = await s.api('POST', '/microvms', { image: image.arn, idlePolicy: { maxIdleDurationSeconds: 600 }, ...body });
    assert.equal(answer.status, 201, JSON.stringify(answer.body));
    started.push(answer.body.id);
    return answer.body;
  }

  test('bad requests are refused with 400 and a stable code; images must exist and be READY', async () => {
    const bad: Array<[Record<string, unknown>, RegExp]> = [
      [{}, /image/],
      [{ image: image.arn, maximumDurationSeconds: 28_801 }, /maximumDurationSeconds/],
      [{ image: image.arn, maximumDurationSeconds: 0 }, /maximumDurationSeconds/],
      [{ image: image.arn, idlePolicy: { maxIdleDurationSeconds: 0 } }, /maxIdleDurationSeconds/],
      [{ image: image.arn, idlePolicy: { suspendedDurationSeconds: 1.5 } }, /suspendedDurationSeconds/],
      [{ image: image.arn, idlePolicy: { autoResumeEnabled: 'yes' } }, /autoResumeEnabled/],
      [{ image: image.arn, idlePolicy: { sleepy: true } }, /additional|sleepy/],
      [{ image: image.arn, colour: 'blue' }, /additional|colour/],
      [{ image: image.arn, clientToken: '' }, /clientToken/],
    ];
    for (const [body, message] of bad) {
      const answer = await s.api('POST', '/microvms', body);
      assert.equal(answer.status, 400, JSON.stringify(body));
      assert.equal(answer.body.error.code, 'invalid_request');
      assert.match(answer.body.error.message, message, JSON.stringify(body));
    }
    const missing = await s.api('POST', '/microvms', { image: 'arn:cocoon:local-1:000000000000:microvm-image/nope:1' });
    assert.equal(missing.status, 404);
    assert.equal(missing.body.error.code, 'image_not_found');
    const pending = await createImage(s.server.db, {
      tenantId: s.adminTenantId, region: 'local-1', name: 'unbuilt', bundleUri: 'cocoon://x', vcpus: 1, memoryMiB: 256, diskMiB: 64, port: 8080,
      readiness: { httpPath: null, timeoutSeconds: 60 },
    });
    const notReady = await s.api('POST', '/microvms', { image: pending.id });
    assert.equal(notReady.status, 409);
    assert.equal(notReady.body.error.code, 'image_not_ready');
    assert.equal((await s.api('GET', '/microvms/mvm-nope')).status, 404);
    assert.equal((await s.api('GET', '/microvms', undefined, 'cocoon_ak_wrong')).status, 401);
  });

  test('defaults, idempotent starts with clientToken, and a conflict for other parameters', async () => {
    const first = await start({ clientToken: 'start-once', idlePolicy: undefined });
    assert.deepEqual(first.idlePolicy, { autoResumeEnabled: true, maxIdleDurationSeconds: 300, suspendedDurationSeconds: null });
    assert.equal(first.maximumDurationSeconds, 28_800);
    assert.equal(Date.parse(first.expiresAt) - Date.parse(first.createdAt), 28_800_000);
    const again = await s.api('POST', '/microvms', { image: image.arn, clientToken: 'start-once' });
    assert.equal(again.status, 201);
    assert.equal(again.body.id, first.id, 'the same microVM');
    assert.notEqual(again.body.token, first.token, 'with a fresh token (the first one is not stored)');
    const conflict = await s.api('POST', '/microvms', { image: image.arn, clientToken: 'start-once', maximumDurationSeconds: 60 });
    assert.equal(conflict.status, 409);
    assert.equal(conflict.body.error.code, 'idempotency_conflict');
    const list = await s.api('GET', '/microvms?limit=1000');
    assert.equal(list.body.items.filter((m: { id: string }) => m.id === first.id).length, 1, 'started once');
  });

  test('list filters by state and image and pages with a cursor', async () => {
    const a = await start();
    const b = await start();
    const c = await start();
    for (const m of [a, b, c]) assert.equal((await gatewayRequest(s.gatewayPort, m.id, m.token, '/')).status, 200);
    assert.equal((await s.api('POST', `/microvms/${b.id}/suspend`)).body.state, 'SUSPENDED');

    const suspended = await s.api('GET', '/microvms?state=SUSPENDED');
    assert.deepEqual(suspended.body.items.map((m: { id: string }) => m.id), [b.id]);
    const either = await s.api('GET', '/microvms?state=SUSPENDED&state=RUNNING');
    for (const m of [a, b, c]) assert.ok(either.body.items.some((x: { id: string }) => x.id === m.id));
    assert.equal((await s.api('GET', '/microvms?state=SLEEPING')).status, 400);
    const byImage = await s.api('GET', `/microvms?image=${image.id}&limit=1000`);
    assert.ok(byImage.body.items.length >= 3);
    assert.ok(byImage.body.items.every((m: { image: string }) => m.image === image.arn));
    assert.deepEqual((await s.api('GET', '/microvms?image=img-00000000000000000000000000')).body.items, []);

    const seen: string[] = [];
    let cursor: string | null = null;
    do {
      const page: { status: number; body: { items: Array<{ id: string }>; nextCursor: string | null } } = await s.api(
        'GET',
        `/microvms?limit=2${cursor ? `&cursor=${cursor}` : ''}`,
      );
      assert.equal(page.status, 200);
      assert.ok(page.body.items.length <= 2);
      seen.push(...page.body.items.map((m) => m.id));
      cursor = page.body.nextCursor;
    } while (cursor);
    assert.deepEqual(seen, [...seen].sort().reverse(), 'newest first');
    for (const m of [a, b, c]) assert.ok(seen.includes(m.id));
    assert.equal(new Set(seen).size, seen.length, 'no microVM twice');
  });

  test('tokens: issue with ports and expiry, list without secrets, revoke at once', async () => {
    const m = await start();
    const issued = await s.api('POST', `/microvms/${m.id}/tokens`, { expirationMinutes: 5, allowedPorts: [8080, 8081, 8080] });
    assert.equal(issued.status, 201);
    assert.match(issued.body.token, /^cocoon_tk_[0-9a-z]{26}_[A-Za-z0-9_-]{43}$/);
    assert.deepEqual(issued.body.allowedPorts, [8080, 8081]);
    assert.ok(Math.abs(Date.parse(issued.body.expiresAt) - Date.now() - 5 * 60_000) < 10_000);
    const noBody = await s.api('POST', `/microvms/${m.id}/tokens`);
    assert.equal(noBody.status, 201);
    assert.equal(noBody.body.allowedPorts, null, 'every port');
    for (const body of [{ expirationMinutes: 61 }, { expirationMinutes: 0 }, { allowedPorts: [] }, { allowedPorts: [70000] }]) {
      assert.equal((await s.api('POST', `/microvms/${m.id}/tokens`, body)).status, 400, JSON.stringify(body));
    }
    const list = await s.api('GET', `/microvms/${m.id}/tokens`);
    assert.equal(list.body.items.length, 3);
    assert.ok(!JSON.stringify(list.body).includes('cocoon_tk_'), 'no secret is ever listed');

    assert.equal((await gatewayRequest(s.gatewayPort, m.id, issued.body.token, '/')).status, 200);
    assert.equal((await s.api('DELETE', `/microvms/${m.id}/tokens/${issued.body.id}`)).status, 204);
    const refused = await gatewayRequest(s.gatewayPort, m.id, issued.body.token, '/');
    assert.equal(refused.status, 401, 'revocation takes effect at once');
    assert.equal((await s.api('DELETE', `/microvms/${m.id}/tokens/tok-nope`)).status, 404);
    assert.equal((await gatewayRequest(s.gatewayPort, m.id, m.token, '/')).status, 200, 'other tokens keep working');
  });

  test("another tenant's microVMs and images answer 404, never 403", async () => {
    const m = await start();
    assert.equal((await gatewayRequest(s.gatewayPort, m.id, m.token, '/')).status, 200);
    for (const [method, route, body] of [
      ['GET', `/microvms/${m.id}`],
      ['GET', `/microvms/${encodeURIComponent(m.arn)}`],
      ['POST', `/microvms/${m.id}/suspend`],
      ['POST', `/microvms/${m.id}/resume`],
      ['DELETE', `/microvms/${m.id}`],
      ['GET', `/microvms/${m.id}/logs`],
      ['GET', `/microvms/${m.id}/tokens`],
      ['POST', `/microvms/${m.id}/tokens`, {}],
      ['DELETE', `/microvms/${m.id}/tokens/tok-x`],
    ] as Array<[string, string, unknown?]>) {
      const answer = await other(method, route, body);
      assert.equal(answer.status, 404, `${method} ${route}`);
      assert.equal(answer.body.error.code, 'microvm_not_found');
    }
    assert.deepEqual((await other('GET', '/microvms')).body.items, []);
    const theirs = await other('POST', '/microvms', { image: image.arn });
    assert.equal(theirs.status, 404, "an image of another tenant cannot be used");
    assert.equal((await s.api('GET', `/microvms/${m.id}`)).body.state, 'RUNNING', 'untouched');
    assert.equal((await s.api('GET', `/microvms/${encodeURIComponent(m.arn)}`)).body.id, m.id, 'found by ARN');
  });

  test('the OpenAPI document describes the microVM routes', async () => {
    const doc = await s.api('GET', '/openapi.json');
    for (const route of ['/api/v1/microvms', '/api/v1/microvms/{id}', '/api/v1/microvms/{id}/suspend', '/api/v1/microvms/{id}/resume', '/api/v1/microvms/{id}/tokens', '/api/v1/microvms/{id}/tokens/{tokenId}']) {
      assert.ok(doc.body.paths[route], route);
    }
  });
});
