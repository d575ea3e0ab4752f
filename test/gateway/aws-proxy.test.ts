/**
 * The gateway's AWS Lambda MicroVMs data plane in front of a real microVM (busybox httpd on
 * 8080, the C test app on 8081): X-aws-proxy-auth / X-aws-proxy-port, 403 for a port the token
 * does not allow or an expired token (and nothing reaches the guest), no x-aws-proxy-* header
 * reaching the guest, and the WebSocket subprotocols lambda-microvms(.authentication.<token>,
 * .port.<n>): taken by the gateway, stripped before the guest, the base one echoed when the app
 * picks none. One test image for the file.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { WebSocket } from 'ws';
import type { Image } from '../../src/store/images.ts';
import { createTestImage, TESTAPP_PORT } from '../support/image.ts';
import { request, startTestServer, stopTestServer, type TestServer } from '../support/server.ts';
import { tempDir } from '../support/vm.ts';

describe('gateway: X-aws-proxy-* credentials and lambda-microvms WebSocket subprotocols', () => {
  const dataDir = tempDir('cocoon-aws-proxy-');
  let s: TestServer;
  let image: Image;
  let vm: { id: string; token: string };

  before(async () => {
    s = await startTestServer({ dataDir });
    image = await createTestImage({ db: s.server.db, dataDir, tenantId: s.adminTenantId });
    const answer = await s.api('POST', '/microvms', { image: image.id, idlePolicy: { maxIdleDurationSeconds: 600 } });
    assert.equal(answer.status, 201, JSON.stringify(answer.body));
    vm = { id: answer.body.id, token: answer.body.token };
    // Up: the test app answers through the gateway.
    assert.equal(await s.get(vm.id, vm.token, '/', { port: TESTAPP_PORT }), 'hello from testapp');
  });
  after(async () => {
    const leaked = await stopTestServer(s, dataDir);
    assert.deepEqual(leaked, [], 'a test left QEMU processes running');
  });

  const host = () => `${vm.id}.vm.localhost:${s.gatewayPort}`;
  const awsGet = (route: string, headers: Record<string, string>) => request(s.gatewayPort, { method: 'GET', path: route, headers: { host: host(), ...headers } });
  const issue = async (body: Record<string, unknown>) => {
    const answer = await s.api('POST', `/microvms/${vm.id}/tokens`, body);
    assert.equal(answer.status, 201, JSON.stringify(answer.body));
    return answer.body as { id: string; token: string; allowedPorts: unknown };
  };
  const guestLog = () => s.get(vm.id, vm.token, '/log', { port: TESTAPP_PORT });

  test('X-aws-proxy-auth and X-aws-proxy-port reach the chosen guest port; no x-aws-proxy-* header reaches the guest', async () => {
    const answer = await awsGet('/headers', {
      'X-aws-proxy-auth': vm.token,
      'X-aws-proxy-port': String(TESTAPP_PORT),
      'X-Aws-Proxy-Anything': 'secret-ish',
      'x-app-header': 'kept',
    });
    assert.equal(answer.status, 200, answer.body);
    assert.match(answer.body, /^x-app-header: kept\r?$/m);
    assert.doesNotMatch(answer.body, /x-aws-proxy/i, 'no x-aws-proxy-* header reaches the guest');
    assert.doesNotMatch(answer.body, /cocoon_tk_/, 'the token does not reach the guest');
    // Without X-aws-proxy-port: the image's app port (busybox httpd on 8080).
    const app = await awsGet('/', { 'X-aws-proxy-auth': vm.token });
    assert.equal(app.status, 200);
    assert.doesNotMatch(app.body, /hello from testapp/);
  });

  test('a port the token does not allow, an expired, revoked or unknown token: 403, and nothing reaches the guest', async () => {
    const only8080 = await issue({ allowedPorts: [8080] });
    const range = await issue({ allowedPorts: [{ from: 8081, to: 8090 }] });
    assert.deepEqual(range.allowedPorts, [{ from: 8081, to: 8090 }]);
    const expired = await issue({ expirationMinutes: 1 });
    await s.server.db.run('UPDATE tokens SET expires_at = ? WHERE id = ?', [new Date(Date.now() - 1000).toISOString(), expired.id]);
    const revoked = await issue({});
    assert.equal((await s.api('DELETE', `/microvms/${vm.id}/tokens/${revoked.id}`)).status, 204);
    const before = await guestLog();

    const port = String(TESTAPP_PORT);
    const refused: Array<[Record<string, string>, string]> = [
      [{ 'X-aws-proxy-auth': only8080.token, 'X-aws-proxy-port': port }, 'port_not_allowed'],
      [{ 'X-aws-proxy-auth': range.token }, 'port_not_allowed'], // the app port 8080 is outside 8081-8090
      [{ 'X-aws-proxy-auth': expired.token, 'X-aws-proxy-port': port }, 'token_expired'],
      [{ 'X-aws-proxy-auth': revoked.token, 'X-aws-proxy-port': port }, 'token_revoked'],
      [{ 'X-aws-proxy-auth': 'cocoon_tk_not-a-token', 'X-aws-proxy-port': port }, 'token_malformed'],
    ];
    for (const [headers, code] of refused) {
      const answer = await awsGet('/refused-aws', headers);
      assert.equal(answer.status, 403, `${code}: ${answer.body}`);
      assert.equal(JSON.parse(answer.body).error.code, code);
    }
    // Cocoon's own header keeps its 401 for an expired token.
    assert.equal((await awsGet('/refused-aws', { 'X-Cocoon-Token': expired.token, 'X-Cocoon-Port': port })).status, 401);
    assert.equal((await awsGet('/refused-aws', { 'X-aws-proxy-auth': vm.token, 'X-aws-proxy-port': '0' })).status, 400);

    const allowed = await awsGet('/count', { 'X-aws-proxy-auth': range.token, 'X-aws-proxy-port': port });
    assert.equal(allowed.status, 200, 'a port inside the range');
    const after = await guestLog();
    assert.equal(after.slice(before.length).includes('/refused-aws'), false, 'no refused request reached the guest');
  });

  test('X-aws-proxy-port to a port nothing forwards yet: forwarded on demand, and again after a suspend and resume', async () => {
    const EXTRA = 8099;
    const before = await awsGet('/', { 'X-aws-proxy-auth': vm.token, 'X-aws-proxy-port': String(EXTRA) });
    assert.equal(before.status, 502, `nothing listens on ${EXTRA} yet: ${before.body}`);
    const started = await s.api('POST', `/microvms/${vm.id}/exec`, { command: ['/bin/testapp', String(EXTRA)], background: true });
    assert.equal(started.status, 201, JSON.stringify(started.body));
    let answer = before;
    for (let i = 0; i < 100 && answer.status !== 200; i++) {
      await new Promise((r) => setTimeout(r, 100));
      answer = await awsGet('/', { 'X-aws-proxy-auth': vm.token, 'X-aws-proxy-port': String(EXTRA) });
    }
    assert.equal(answer.status, 200, answer.body);
    assert.equal(answer.body, 'hello from testapp\n');
    // A token that allows only 8080 still cannot open it.
    const only8080 = await issue({ allowedPorts: [8080] });
    assert.equal((await awsGet('/', { 'X-aws-proxy-auth': only8080.token, 'X-aws-proxy-port': String(EXTRA) })).status, 403);
    // The snapshot records the forward: after a suspend and resume the port answers at once.
    assert.equal((await s.api('POST', `/microvms/${vm.id}/suspend`)).status, 200);
    const again = await awsGet('/count', { 'X-aws-proxy-auth': vm.token, 'X-aws-proxy-port': String(EXTRA) });
    assert.equal(again.status, 200, again.body);
  });

  function openWs(protocols: string[], headers: Record<string, string> = {}): Promise<{ ws: WebSocket } | { status: number }> {
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(`ws://127.0.0.1:${s.gatewayPort}/ws`, protocols, { headers: { host: host(), ...headers } });
      ws.once('open', () => resolve({ ws }));
      ws.once('unexpected-response', (_req, res) => {
        resolve({ status: res.statusCode ?? 0 });
        res.resume();
      });
      ws.once('error', reject);
    });
  }

  async function echo(ws: WebSocket, text: string): Promise<string> {
    const got = new Promise<string>((resolve) => ws.once('message', (data) => resolve(String(data))));
    ws.send(text);
    return got;
  }

  test('WebSocket: token and port as lambda-microvms subprotocols, stripped before the guest; the base one echoed when the app picks none', async () => {
    const creds = [`lambda-microvms.authentication.${vm.token}`, `lambda-microvms.port.${TESTAPP_PORT}`];
    const plain = await openWs(['lambda-microvms', ...creds]);
    assert.ok('ws' in plain, `refused: ${JSON.stringify(plain)}`);
    assert.equal(plain.ws.protocol, 'lambda-microvms', 'the app picked none: the gateway answers the base subprotocol');
    assert.equal(await echo(plain.ws, 'hello'), 'hello');
    plain.ws.close();

    // The app picks its own subprotocol ("chat") among what reaches it.
    const chat = await openWs(['lambda-microvms', ...creds, 'chat']);
    assert.ok('ws' in chat, `refused: ${JSON.stringify(chat)}`);
    assert.equal(chat.ws.protocol, 'chat');
    assert.equal(await echo(chat.ws, 'again'), 'again');
    chat.ws.close();

    // X-aws-proxy-auth works on a WebSocket too (clients that can set headers).
    const viaHeader = await openWs(['lambda-microvms'], { 'X-aws-proxy-auth': vm.token, 'X-aws-proxy-port': String(TESTAPP_PORT) });
    assert.ok('ws' in viaHeader);
    viaHeader.ws.close();

    const wsLines = (await guestLog()).split('\n').filter((l) => l.startsWith('GET /ws'));
    assert.equal(wsLines.length, 3, wsLines.join('\n'));
    assert.deepEqual(wsLines.map((l) => /protocols=(\S+)/.exec(l)?.[1] ?? null), [null, 'chat', null], 'only the app\'s own subprotocol reaches the guest');
    for (const line of wsLines) assert.doesNotMatch(line, /lambda-microvms|cocoon_tk_|x-aws/i);

    // A wrong token or a port the token does not allow: 403 before the guest.
    const bad = await openWs(['lambda-microvms', 'lambda-microvms.authentication.cocoon_tk_nope', `lambda-microvms.port.${TESTAPP_PORT}`]);
    assert.deepEqual(bad, { status: 403 });
    const only8080 = await issue({ allowedPorts: [8080] });
    const notAllowed = await openWs(['lambda-microvms', `lambda-microvms.authentication.${only8080.token}`, `lambda-microvms.port.${TESTAPP_PORT}`]);
    assert.deepEqual(notAllowed, { status: 403 });
  });
});
