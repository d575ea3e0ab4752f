import assert from 'node:assert/strict';
import { test } from 'node:test';
import { errorCode, rawExchange, request, startGateway, startGuest } from './helpers.ts';

const HOST = (id: string) => `${id}.vm.localhost`;

test('a valid token proxies; the guest never sees the token header, the gateway cookie or the routing headers', async (t) => {
  const guest = await startGuest(t);
  const f = await startGateway(t);
  f.directory.add({ id: 'vm1', ports: new Map([[8080, guest.port]]) });
  const { token } = await f.token('vm1');

  const a = await request(f.port, {
    method: 'POST',
    path: '/hello?x=1&y=two',
    headers: {
      host: `${HOST('vm1')}:7071`,
      'x-cocoon-token': token,
      'x-cocoon-microvm': 'vm1',
      'x-cocoon-port': '8080',
      cookie: `a=1; cocoon_token=${token}; b=2`,
      'x-forwarded-for': '6.6.6.6',
      'content-type': 'text/plain',
    },
    body: 'payload',
  });
  assert.equal(a.status, 200, a.body);
  assert.equal(a.headers['x-guest'], 'yes');
  assert.equal(guest.received.length, 1);
  const got = guest.received[0]!;
  assert.equal(got.method, 'POST');
  assert.equal(got.url, '/hello?x=1&y=two');
  assert.equal(got.bodyBytes, 7);
  assert.equal(got.headers['x-cocoon-token'], undefined);
  assert.equal(got.headers['x-cocoon-port'], undefined);
  assert.equal(got.headers['x-cocoon-microvm'], undefined);
  assert.equal(got.headers.cookie, 'a=1; b=2');
  assert.equal(got.headers.host, `${HOST('vm1')}:7071`);
  assert.equal(got.headers['x-forwarded-for'], '127.0.0.1', 'an untrusted X-Forwarded-For is replaced');
  assert.equal(got.headers['x-forwarded-proto'], 'http');
  assert.equal(got.headers['x-forwarded-host'], `${HOST('vm1')}:7071`);
  assert.ok(!got.rawHeaders.join('\n').includes(token), 'the token appears nowhere in what the guest received');
  assert.equal(f.directory.ensureRunningCalls, 0, 'a RUNNING microVM is not woken');
  assert.equal(f.directory.started, 1);
  assert.equal(f.directory.finished, 1);
});

test('routing: Host or X-Cocoon-MicroVM, strictly', async (t) => {
  const guest = await startGuest(t);
  const f = await startGateway(t);
  f.directory.add({ id: 'vm1', ports: new Map([[8080, guest.port]]) });
  f.directory.add({ id: 'vm1-b', ports: new Map([[8080, guest.port]]) });
  const { token } = await f.token('vm1');
  const auth = { 'x-cocoon-token': token };

  const ok = async (headers: Record<string, string>) => {
    const a = await request(f.port, { headers: { ...auth, ...headers } });
    assert.equal(a.status, 200, `${JSON.stringify(headers)} → ${a.status} ${a.body}`);
  };
  await ok({ host: 'vm1.vm.localhost' });
  await ok({ host: 'VM1.VM.LocalHost' });
  await ok({ host: 'vm1.vm.localhost.' });
  await ok({ host: 'vm1.vm.localhost.:8443' });
  await ok({ host: 'example.com', 'x-cocoon-microvm': 'vm1' });
  await ok({ host: '127.0.0.1:7071', 'x-cocoon-microvm': 'vm1' });
  await ok({ host: 'vm1.vm.localhost', 'x-cocoon-microvm': 'vm1' });
  const proxied = guest.received.length;

  const bad = async (headers: Record<string, string>, status: number, code: string) => {
    const a = await request(f.port, { headers: { ...auth, ...headers } });
    assert.equal(a.status, status, `${JSON.stringify(headers)} → ${a.status} ${a.body}`);
    assert.equal(errorCode(a), code, JSON.stringify(headers));
    assert.match(a.headers['content-type'] ?? '', /application\/json/);
  };
  await bad({ host: 'x.vm1.vm.localhost' }, 400, 'invalid_microvm_id');
  await bad({ host: '-vm1.vm.localhost' }, 400, 'invalid_microvm_id');
  await bad({ host: `${'a'.repeat(64)}.vm.localhost` }, 400, 'invalid_microvm_id');
  await bad({ host: 'vm1.vm.localhost..' }, 400, 'invalid_host');
  await bad({ host: 'vm1_x.vm.localhost' }, 400, 'invalid_host');
  await bad({ host: 'vm1.vm.localhost@evil.com' }, 400, 'invalid_host');
  await bad({ host: 'vm1.vm.localhost.evil.com' }, 404, 'microvm_not_specified');
  await bad({ host: 'vm1vm.localhost' }, 404, 'microvm_not_specified');
  await bad({ host: 'vm.localhost' }, 404, 'microvm_not_specified');
  await bad({ host: '[::1]:7071' }, 404, 'microvm_not_specified');
  await bad({ host: 'example.com', 'x-cocoon-microvm': 'VM1' }, 400, 'invalid_microvm_id');
  await bad({ host: 'example.com', 'x-cocoon-microvm': 'vm1.vm.localhost' }, 400, 'invalid_microvm_id');
  await bad({ host: 'example.com', 'x-cocoon-microvm': '../vm1' }, 400, 'invalid_microvm_id');
  await bad({ host: 'vm1-b.vm.localhost', 'x-cocoon-microvm': 'vm1' }, 400, 'microvm_mismatch');

  // Two Host headers, and two X-Cocoon-MicroVM headers.
  const twoHosts = await rawExchange(f.port, `GET / HTTP/1.1\r\nHost: vm1.vm.localhost\r\nHost: vm1-b.vm.localhost\r\nX-Cocoon-Token: ${token}\r\nConnection: close\r\n\r\n`);
  assert.match(twoHosts, /^HTTP\/1.1 400 /);
  const twoIds = await request(f.port, { headers: { ...auth, host: 'x.com', 'x-cocoon-microvm': ['vm1', 'vm1'] } });
  assert.equal(twoIds.status, 400);

  assert.equal(guest.received.length, proxied, 'no refused request reached the guest');
  assert.equal(f.directory.ensureRunningCalls, 0);
});

test('401/403: missing, malformed, unknown, expired, revoked, other-microVM, port not allowed; nothing reaches the guest, nothing wakes', async (t) => {
  const guest = await startGuest(t);
  const f = await startGateway(t);
  f.directory.add({ id: 'vm1', state: 'SUSPENDED', ports: new Map([[8080, guest.port], [9000, guest.port]]) });
  f.directory.add({ id: 'vm2', ports: new Map([[8080, guest.port]]) });
  const good = await f.token('vm1', { allowedPorts: [8080] });
  const other = await f.token('vm2');
  const revoked = await f.token('vm1');
  await f.revoke('vm1', revoked.id);
  const expiring = await f.token('vm1', { expirationMinutes: 1 });
  const host = HOST('vm1');

  const cases: Array<[string, Record<string, string>, number, string]> = [
    ['missing', {}, 401, 'token_missing'],
    ['empty', { 'x-cocoon-token': '' }, 401, 'token_missing'],
    ['malformed', { 'x-cocoon-token': 'hello' }, 401, 'token_malformed'],
    ['malformed secret', { 'x-cocoon-token': good.token.slice(0, -1) + '!' }, 401, 'token_malformed'],
    ['unknown id', { 'x-cocoon-token': good.token.replace(/^cocoon_tk_[0-9a-z]{26}/, `cocoon_tk_${'0'.repeat(26)}`) }, 401, 'token_invalid'],
    ['wrong secret', { 'x-cocoon-token': good.token.slice(0, -2) + (good.token.endsWith('AA') ? 'AQ' : 'AA') }, 401, 'token_invalid'],
    ['revoked', { 'x-cocoon-token': revoked.token }, 401, 'token_revoked'],
    ['other microVM', { 'x-cocoon-token': other.token }, 403, 'token_wrong_microvm'],
    ['port not allowed', { 'x-cocoon-token': good.token, 'x-cocoon-port': '9000' }, 403, 'port_not_allowed'],
    ['malformed cookie', { cookie: 'cocoon_token=nope' }, 401, 'token_malformed'],
    ['other microVM cookie', { cookie: `cocoon_token=${other.token}` }, 403, 'token_wrong_microvm'],
  ];
  for (const [name, headers, status, code] of cases) {
    const a = await request(f.port, { headers: { host, ...headers } });
    assert.equal(a.status, status, `${name}: ${a.body}`);
    assert.equal(errorCode(a), code, name);
    if (status === 401) assert.ok(a.headers['www-authenticate'], `${name}: 401 carries WWW-Authenticate`);
    for (const tok of [good.token, other.token, revoked.token]) assert.ok(!a.body.includes(tok.slice(37)), `${name}: the answer echoes no secret`);
  }

  // Expired: move the verifier's clock past the expiry.
  f.now.ms = Date.now() + 61_000;
  const expired = await request(f.port, { headers: { host, 'x-cocoon-token': expiring.token } });
  assert.equal(expired.status, 401);
  assert.equal(errorCode(expired), 'token_expired');
  const expiredCookie = await request(f.port, { headers: { host, cookie: `cocoon_token=${expiring.token}` } });
  assert.equal(expiredCookie.status, 401);
  assert.match(String(expiredCookie.headers['set-cookie']), /^cocoon_token=; Max-Age=0; Path=\/; HttpOnly/, 'a stale cookie is cleared');
  f.now.ms = undefined;

  assert.equal(guest.received.length, 0, 'the guest received nothing');
  assert.equal(f.directory.ensureRunningCalls, 0, 'no request without a valid token woke the microVM');
  assert.equal(f.directory.started, 0, 'refused requests are not activity');
  const logged = f.logLines.join('');
  for (const tok of [good.token, other.token, revoked.token, expiring.token]) assert.ok(!logged.includes(tok.slice(37)), 'no secret in the log');
});

test('cookie flow: ?cocoon_token= → 303 with an HttpOnly cookie and a clean URL; the cookie then authenticates and is stripped', async (t) => {
  const guest = await startGuest(t);
  const f = await startGateway(t);
  f.directory.add({ id: 'vm1', ports: new Map([[8080, guest.port]]) });
  const { token } = await f.token('vm1', { expirationMinutes: 10 });
  const host = HOST('vm1');

  const login = await request(f.port, { path: `/app/page?a=1&cocoon_token=${token}&b=%20x`, headers: { host } });
  assert.equal(login.status, 303);
  assert.equal(login.headers.location, '/app/page?a=1&b=%20x');
  const cookie = String(login.headers['set-cookie']);
  assert.match(cookie, new RegExp(`^cocoon_token=${token}; `));
  assert.match(cookie, /; HttpOnly/);
  assert.match(cookie, /; SameSite=Lax/);
  assert.match(cookie, /; Path=\//);
  assert.doesNotMatch(cookie, /Domain=/i, 'host-only: scoped to this microVM\'s host');
  const maxAge = Number(/Max-Age=(\d+)/.exec(cookie)?.[1]);
  assert.ok(maxAge > 590 && maxAge <= 600, `Max-Age ${maxAge} follows the token's expiry`);
  assert.equal(guest.received.length, 0, 'the login request itself is not proxied');

  const onlyParam = await request(f.port, { path: `/?cocoon_token=${token}`, headers: { host } });
  assert.equal(onlyParam.headers.location, '/');
  const sneaky = await request(f.port, { path: `//evil.com/?cocoon_token=${token}`, headers: { host } });
  assert.equal(sneaky.headers.location, '/.//evil.com/', 'never a scheme-relative Location');
  const encoded = await request(f.port, { path: `/?%63ocoon_token=${token}`, headers: { host } });
  assert.equal(encoded.status, 303, 'an encoded parameter name is recognised too');

  const bad = await request(f.port, { path: '/?cocoon_token=cocoon_tk_nope', headers: { host } });
  assert.equal(bad.status, 401);
  assert.equal(bad.headers['set-cookie'], undefined);

  const a = await request(f.port, { path: '/app/page?a=1', headers: { host, cookie: `theme=dark; cocoon_token=${token}` } });
  assert.equal(a.status, 200, a.body);
  assert.equal(guest.received.length, 1);
  assert.equal(guest.received[0]!.headers.cookie, 'theme=dark');
  assert.equal(guest.received[0]!.url, '/app/page?a=1');

  // A planted foreign cookie alongside the real one does not lock the visitor out.
  const other = await f.token('vm2');
  const both = await request(f.port, { headers: { host, cookie: `cocoon_token=${other.token}; cocoon_token=${token}` } });
  assert.equal(both.status, 200);
  assert.equal(guest.received[1]!.headers.cookie, undefined, 'nothing left of the cookie header');
  assert.ok(f.logLines.length > 0, 'the gateway logged (debug level)');
  const logged = f.logLines.join('');
  assert.ok(!logged.includes(token.slice(37)) && !logged.includes(other.token.slice(37)), 'no token or cookie value reached the log');
});

test('guest Set-Cookie: the gateway cookie cannot be planted and Domain is removed', async (t) => {
  const guest = await startGuest(t, (_req, res) => {
    res.writeHead(200, {
      'set-cookie': ['sid=1; Path=/; HttpOnly', 'cocoon_token=evil; Path=/', 'wide=1; Domain=vm.localhost; Path=/'],
      connection: 'x-secret',
      'x-secret': 'hop',
    });
    res.end('ok');
  });
  const f = await startGateway(t);
  f.directory.add({ id: 'vm1', ports: new Map([[8080, guest.port]]) });
  const { token } = await f.token('vm1');
  const a = await request(f.port, { headers: { host: HOST('vm1'), 'x-cocoon-token': token } });
  assert.equal(a.status, 200);
  assert.deepEqual(a.headers['set-cookie'], ['sid=1; Path=/; HttpOnly', 'wide=1; Path=/']);
  assert.equal(a.headers['x-secret'], undefined, 'headers named in Connection are hop-by-hop');
});

test('X-Cocoon-Port selects another guest port the token allows', async (t) => {
  const app = await startGuest(t, (_req, res) => res.end('app'));
  const admin = await startGuest(t, (_req, res) => res.end('admin'));
  const f = await startGateway(t);
  f.directory.add({ id: 'vm1', appPort: 8080, ports: new Map([[8080, app.port], [9000, admin.port]]) });
  const all = await f.token('vm1');
  const only9000 = await f.token('vm1', { allowedPorts: [9000] });
  const host = HOST('vm1');

  assert.equal((await request(f.port, { headers: { host, 'x-cocoon-token': all.token } })).body, 'app');
  assert.equal((await request(f.port, { headers: { host, 'x-cocoon-token': all.token, 'x-cocoon-port': '9000' } })).body, 'admin');
  assert.equal((await request(f.port, { headers: { host, 'x-cocoon-token': only9000.token, 'x-cocoon-port': '9000' } })).body, 'admin');
  const defaultPort = await request(f.port, { headers: { host, 'x-cocoon-token': only9000.token } });
  assert.equal(defaultPort.status, 403, 'the default app port is not in allowedPorts');
  assert.equal(errorCode(defaultPort), 'port_not_allowed');
  const notExposed = await request(f.port, { headers: { host, 'x-cocoon-token': all.token, 'x-cocoon-port': '7777' } });
  assert.equal(notExposed.status, 404);
  assert.equal(errorCode(notExposed), 'port_not_exposed');
  for (const v of ['0', '65536', '08080', 'abc', '80, 81', '+80']) {
    const r = await request(f.port, { headers: { host, 'x-cocoon-token': all.token, 'x-cocoon-port': v } });
    assert.equal(r.status, 400, `port ${JSON.stringify(v)}`);
  }
});

test('microVM states: unknown 404, SUSPENDED without autoResume 409, TERMINATED 410, FAILED 502, guest down 502', async (t) => {
  const f = await startGateway(t);
  f.directory.add({ id: 'asleep', state: 'SUSPENDED', autoResumeEnabled: false, ports: new Map() });
  f.directory.add({ id: 'gone', state: 'TERMINATED', ports: new Map() });
  f.directory.add({ id: 'broken', state: 'FAILED', ports: new Map() });
  f.directory.add({ id: 'down', ports: new Map([[8080, 1]]) });
  const expect = async (id: string, status: number, code: string) => {
    const { token } = await f.token(id);
    const a = await request(f.port, { headers: { host: HOST(id), 'x-cocoon-token': token } });
    assert.equal(a.status, status, `${id}: ${a.body}`);
    assert.equal(errorCode(a), code, id);
    const parsed = JSON.parse(a.body) as { error: { code: string; message: string } };
    assert.equal(typeof parsed.error.message, 'string');
  };
  await expect('ghost', 404, 'microvm_not_found');
  await expect('asleep', 409, 'microvm_suspended');
  await expect('gone', 410, 'microvm_terminated');
  await expect('broken', 502, 'microvm_failed');
  await expect('down', 502, 'upstream_unreachable');
  assert.equal(f.directory.ensureRunningCalls, 0);
  assert.equal(f.directory.started, f.directory.finished, 'every started request was reported finished');
});

test('the node:http upstream client proxies the same way', async (t) => {
  const guest = await startGuest(t);
  const f = await startGateway(t, { upstreamClient: 'node' });
  f.directory.add({ id: 'vm1', ports: new Map([[8080, guest.port]]) });
  const { token } = await f.token('vm1');
  for (let i = 0; i < 3; i++) {
    const a = await request(f.port, { method: 'PUT', path: `/n/${i}`, headers: { host: HOST('vm1'), 'x-cocoon-token': token, cookie: `cocoon_token=${token}` }, body: 'abc' });
    assert.equal(a.status, 200);
    assert.deepEqual(JSON.parse(a.body), { method: 'PUT', url: `/n/${i}`, bodyBytes: 3 });
  }
  assert.equal(guest.received[0]!.headers['x-cocoon-token'], undefined);
  assert.equal(guest.received[0]!.headers.cookie, undefined);
});

test('a dependency failure (verifier throws) answers 503, never 200', async (t) => {
  const guest = await startGuest(t);
  const f = await startGateway(t, {
    tokens: {
      verify() {
        throw new Error('database is down');
      },
    },
  });
  f.directory.add({ id: 'vm1', ports: new Map([[8080, guest.port]]) });
  const a = await request(f.port, { headers: { host: HOST('vm1'), 'x-cocoon-token': 'whatever' } });
  assert.equal(a.status, 503);
  assert.equal(errorCode(a), 'gateway_unavailable');
  assert.ok(a.headers['retry-after']);
  assert.equal(guest.received.length, 0);
});
