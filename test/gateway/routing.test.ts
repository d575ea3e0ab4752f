import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { extractQueryToken, filterGuestSetCookies, readCookies, stripCookie } from '../../src/gateway/credentials.ts';
import { clientResponseHeaders, upstreamRequestHeaders } from '../../src/gateway/headers.ts';
import { isValidMicroVMId, normalizeDomain, parsePortHeader, resolveMicroVM } from '../../src/gateway/routing.ts';

const D = 'vm.localhost';
const route = (host: string | undefined, header?: string) => resolveMicroVM(host, host === undefined ? 0 : 1, header, D);

test('Host routing: case, trailing dot, port; extra labels, prefixes and look-alikes refused', () => {
  assert.deepEqual(route('abc.vm.localhost'), { ok: true, microvmId: 'abc', via: 'host' });
  assert.deepEqual(route('ABC.Vm.LOCALHOST.:7071'), { ok: true, microvmId: 'abc', via: 'host' });
  for (const host of ['a.abc.vm.localhost', 'abc..vm.localhost', '.vm.localhost']) {
    const r = route(host);
    assert.equal(r.ok, false, host);
  }
  for (const host of ['abc.vm.localhost.evil.com', 'abcvm.localhost', 'vm.localhost', 'localhost', 'abc.vm.localhostx', '127.0.0.1', '[::1]']) {
    const r = route(host);
    assert.ok(!r.ok && r.status === 404 && r.code === 'microvm_not_specified', host);
  }
  for (const host of ['abc.vm.localhost:', 'abc.vm.localhost:99999999', 'abc.vm.localhost/x', 'a b.vm.localhost', 'abc.vm.localhost\u0000', 'abc.vm.localhost..']) {
    const r = route(host);
    assert.ok(!r.ok && r.status === 400, host);
  }
  assert.equal(route(undefined).ok, false);
  assert.deepEqual(route(undefined, 'abc'), { ok: true, microvmId: 'abc', via: 'header' });
  assert.equal(resolveMicroVM('abc.vm.localhost', 2, undefined, D).ok, false, 'two Host headers');
});

test('a custom domain is normalised; another domain\'s names do not route', () => {
  const d = normalizeDomain('Apps.Example.COM.');
  assert.equal(d, 'apps.example.com');
  assert.deepEqual(resolveMicroVM('x1.apps.example.com', 1, undefined, d), { ok: true, microvmId: 'x1', via: 'host' });
  assert.equal(resolveMicroVM('x1.vm.localhost', 1, undefined, d).ok, false);
  assert.throws(() => normalizeDomain('bad_domain'));
  assert.throws(() => normalizeDomain(''));
});

test('microVM ids: one lowercase DNS label', () => {
  for (const id of ['a', '0', 'abc-123', 'a'.repeat(63)]) assert.ok(isValidMicroVMId(id), id);
  for (const id of ['', '-a', 'a-', 'A', 'a.b', 'a_b', 'a'.repeat(64), 'é']) assert.ok(!isValidMicroVMId(id), id);
  fc.assert(
    fc.property(fc.string({ maxLength: 80 }), fc.string({ maxLength: 80 }), (host, header) => {
      const r = resolveMicroVM(host, 1, header, D);
      return !r.ok || (isValidMicroVMId(r.microvmId) && r.microvmId.length <= 63);
    }),
  );
});

test('X-Cocoon-Port parsing', () => {
  assert.equal(parsePortHeader(undefined), undefined);
  assert.equal(parsePortHeader('8080'), 8080);
  assert.equal(parsePortHeader('65535'), 65535);
  for (const v of ['0', '65536', '080', '8080a', '', '1e3', '-1', '80, 81']) assert.equal(parsePortHeader(v), null, v);
});

test('query token extraction keeps other parameters byte for byte', () => {
  assert.deepEqual(extractQueryToken('/p?a=1&cocoon_token=T&b=%20'), { tokens: ['T'], target: '/p?a=1&b=%20' });
  assert.deepEqual(extractQueryToken('/p?cocoon_token=T'), { tokens: ['T'], target: '/p' });
  assert.deepEqual(extractQueryToken('/p?%63ocoon%5Ftoken=T'), { tokens: ['T'], target: '/p' });
  assert.deepEqual(extractQueryToken('/p?cocoon_token=A&cocoon_token=B'), { tokens: ['A', 'B'], target: '/p' });
  assert.deepEqual(extractQueryToken('/p?x=cocoon_token'), { tokens: [], target: '/p?x=cocoon_token' });
  assert.deepEqual(extractQueryToken('/p'), { tokens: [], target: '/p' });
  fc.assert(
    fc.property(fc.webPath(), fc.webQueryParameters(), fc.string(), (path, query, tok) => {
      const token = encodeURIComponent(tok);
      const r = extractQueryToken(`${path || '/'}?${query}&cocoon_token=${token}`);
      return r.tokens.at(-1) === tok && !/(^|[?&])cocoon_token=/.test(r.target);
    }),
  );
});

test('cookies: read, strip only ours, guest Set-Cookie filtering', () => {
  assert.deepEqual(readCookies('a=1; cocoon_token=X; b=2; cocoon_token="Y"'), ['X', 'Y']);
  assert.deepEqual(readCookies('xcocoon_token=1'), []);
  assert.equal(stripCookie('a=1; cocoon_token=X; b=2'), 'a=1; b=2');
  assert.equal(stripCookie('cocoon_token=X'), undefined);
  assert.equal(stripCookie('a=1;b=2'), 'a=1;b=2', 'untouched when our cookie is absent');
  assert.equal(stripCookie('my_cocoon_token=1; cocoon_token=2'), 'my_cocoon_token=1');
  assert.deepEqual(
    filterGuestSetCookies(['a=1', 'cocoon_token=x; Path=/', 'COCOON_TOKEN=y', 'b=2; Domain=.vm.localhost; Secure', 'c=3;domain=vm.localhost']),
    ['a=1', 'b=2; Secure', 'c=3'],
  );
});

test('upstream request headers: stripped, hop-by-hop removed, X-Forwarded-* set', () => {
  const raw = [
    'Host', 'vm1.vm.localhost',
    'X-Cocoon-Token', 'cct_secret',
    'x-cocoon-port', '9000',
    'X-Cocoon-MicroVM', 'vm1',
    'Cookie', 'a=1; cocoon_token=cct_secret',
    'Connection', 'keep-alive, X-Private',
    'X-Private', 'hop',
    'Keep-Alive', 'timeout=5',
    'Transfer-Encoding', 'chunked',
    'TE', 'trailers',
    'Upgrade', 'websocket',
    'X-Forwarded-For', '6.6.6.6',
    'Forwarded', 'for=6.6.6.6',
    'Accept', 'text/html',
  ];
  const out = upstreamRequestHeaders(raw, { clientIp: '10.0.0.9', proto: 'https', upgrade: false, trustForwarded: false });
  assert.deepEqual(out, [
    'Host', 'vm1.vm.localhost',
    'Cookie', 'a=1',
    'Accept', 'text/html',
    'x-forwarded-for', '10.0.0.9',
    'x-forwarded-proto', 'https',
    'x-forwarded-host', 'vm1.vm.localhost',
  ]);
  const trusted = upstreamRequestHeaders(['Host', 'h', 'X-Forwarded-For', '1.1.1.1', 'X-Forwarded-Proto', 'https'], { clientIp: '10.0.0.9', proto: 'http', upgrade: false, trustForwarded: true });
  assert.deepEqual(trusted, ['Host', 'h', 'X-Forwarded-Proto', 'https', 'x-forwarded-for', '1.1.1.1, 10.0.0.9', 'x-forwarded-host', 'h']);
  const ws = upstreamRequestHeaders(['Host', 'h', 'Connection', 'Upgrade', 'Upgrade', 'websocket', 'Sec-WebSocket-Key', 'k'], { clientIp: '1', proto: 'http', upgrade: true, trustForwarded: false });
  assert.deepEqual(ws.slice(0, 8), ['Host', 'h', 'Connection', 'Upgrade', 'Upgrade', 'websocket', 'Sec-WebSocket-Key', 'k']);
});

test('client response headers: hop-by-hop removed', () => {
  assert.deepEqual(
    clientResponseHeaders({ 'content-type': 'text/plain', connection: 'keep-alive, x-a', 'x-a': '1', 'keep-alive': 'timeout=5', 'transfer-encoding': 'chunked', 'set-cookie': ['s=1', 'cocoon_token=2'] }),
    { 'content-type': 'text/plain', 'set-cookie': ['s=1'] },
  );
});

test("E2B's getHost form <port>-<id>.<domain>: the digits before the first dash are the port", () => {
  assert.deepEqual(route('3000-mvm-abc.vm.localhost'), { ok: true, microvmId: 'mvm-abc', via: 'host', hostPort: 3000 });
  assert.deepEqual(route('49983-mvm-abc.vm.localhost:7071'), { ok: true, microvmId: 'mvm-abc', via: 'host', hostPort: 49983 });
  assert.deepEqual(route('99999-mvm-abc.vm.localhost'), { ok: true, microvmId: '99999-mvm-abc', via: 'host' }, 'not a port: a plain label');
  assert.deepEqual(route('0-mvm-abc.vm.localhost'), { ok: true, microvmId: '0-mvm-abc', via: 'host' }, 'no leading zero');
  assert.equal(route('3000-mvm-abc.vm.localhost', 'mvm-other').ok, false, 'host and header must agree');
});
