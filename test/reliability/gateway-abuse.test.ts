/**
 * Abuse of the gateway with exact bytes on raw sockets (node:net), against the real gateway and
 * real recording guests on loopback (test/gateway/helpers.ts): request smuggling shapes, Host
 * and DNS-rebinding tricks, and token replays the gateway tests do not already try.
 *
 * For each case: the gateway answers 4xx or closes the connection (a 2xx only for a request
 * that is valid and admitted), no guest receives anything it should not (never a smuggled
 * second request, never a request for another microVM), and a normal request afterwards is
 * still served.
 *
 * Already covered elsewhere, not repeated here: oversized heads (431), slow heads and bodies
 * (slowloris, 408), body limits (413) and Expect: 100-continue in test/gateway/gateway-limits.test.ts;
 * two Host headers, look-alike domains (`<id>.<domain>.evil.com`), userinfo in Host, `[::1]`,
 * X-Cocoon-MicroVM conflicts, and missing/malformed/unknown/expired/revoked/other-microVM
 * tokens in test/gateway/gateway-http.test.ts.
 */
import assert from 'node:assert/strict';
import net from 'node:net';
import { test, type TestContext } from 'node:test';
import { errorCode, request, startGateway, startGuest, type Fixture, type Guest, type GuestHandler, type Received } from '../gateway/helpers.ts';

const HOST = (id: string) => `${id}.vm.localhost`;

interface Exchange {
  /** Status of every response on the connection, in order. */
  statuses: number[];
  raw: string;
  /** The server closed the connection (rather than the exchange timing out). */
  closed: boolean;
}

/** Writes exact bytes on a fresh connection; reads until the server closes or `waitMs` passes. */
function exchange(port: number, data: string | Buffer, waitMs = 3000): Promise<Exchange> {
  return new Promise((resolve) => {
    const socket = net.connect(port, '127.0.0.1');
    const chunks: Buffer[] = [];
    let closed = false;
    const done = () => {
      clearTimeout(timer);
      const raw = Buffer.concat(chunks).toString('latin1');
      resolve({ statuses: [...raw.matchAll(/(?:^|\r\n)HTTP\/1\.1 (\d{3}) /g)].map((m) => Number(m[1])), raw, closed });
    };
    const timer = setTimeout(() => {
      socket.destroy();
      done();
    }, waitMs);
    socket.on('data', (c: Buffer) => chunks.push(c));
    socket.on('error', () => {});
    socket.on('close', () => {
      closed = true;
      done();
    });
    socket.write(typeof data === 'string' ? Buffer.from(data, 'latin1') : data);
  });
}

interface World {
  f: Fixture;
  vm1: Guest;
  vm2: Guest;
  token1: string;
  token2: string;
}

/** Requests whose body the guest read to its end (a request cut mid-body is not complete). */
const completed = new WeakSet<Received>();
/** Requests the guest is done with (read whole, or cut off). */
const settled = new WeakSet<Received>();

/** Waits (bounded) until the guest is done with every request in `records`. */
async function guestSettled(records: Received[]): Promise<void> {
  for (let i = 0; i < 300 && !records.every((r) => settled.has(r)); i++) await new Promise((r) => setTimeout(r, 10));
  assert.ok(records.every((r) => settled.has(r)), 'the guest is still reading a request the client is done with');
}

/** The helpers' echo guest, also noting which requests arrived whole. */
const noting: GuestHandler = (req, res, record) => {
  req.on('data', (c: Buffer) => (record.bodyBytes += c.length));
  req.on('error', () => {});
  req.on('close', () => settled.add(record));
  req.on('end', () => {
    completed.add(record);
    res.writeHead(200, { 'content-type': 'application/json', 'x-guest': 'yes' });
    res.end(JSON.stringify({ method: record.method, url: record.url, bodyBytes: record.bodyBytes }));
  });
};

async function world(t: TestContext): Promise<World> {
  const vm1 = await startGuest(t, noting);
  const vm2 = await startGuest(t, noting);
  // Short keep-alive: a connection left open by a case ends soon after its last answer.
  const f = await startGateway(t, { keepAliveTimeoutMs: 300 });
  f.directory.add({ id: 'vm1', ports: new Map([[8080, vm1.port]]) });
  f.directory.add({ id: 'vm2', ports: new Map([[8080, vm2.port]]) });
  return { f, vm1, vm2, token1: (await f.token('vm1')).token, token2: (await f.token('vm2')).token };
}

/** A normal request to vm1 on a fresh connection is served. */
async function stillServes(w: World, label: string): Promise<void> {
  const before = w.vm1.received.length;
  const a = await request(w.f.port, { path: '/after', headers: { host: HOST('vm1'), 'x-cocoon-token': w.token1 } });
  assert.equal(a.status, 200, `after ${label}: ${a.status} ${a.body}`);
  assert.equal(w.vm1.received.length, before + 1);
  w.vm1.received.pop();
}

test('request smuggling shapes: refused or framed once; a smuggled request never reaches a guest', async (t) => {
  const w = await world(t);
  const head = (extra: string) => `POST /first HTTP/1.1\r\nHost: ${HOST('vm1')}\r\nX-Cocoon-Token: ${w.token1}\r\n${extra}`;
  // What a smuggler hides in the body: a request for vm2, without a token, that a guest must never see.
  const smuggled = `GET /smuggled HTTP/1.1\r\nHost: ${HOST('vm2')}\r\nX-Cocoon-MicroVM: vm2\r\nConnection: close\r\n\r\n`;
  const chunk = (s: string) => `${Buffer.byteLength(s).toString(16)}\r\n${s}\r\n`;

  // [name, bytes, refused]: 'head': nothing is proxied; 'body': the head was fine and may have
  // been sent on (the gateway streams), but the body's framing is broken: the guest must not
  // receive a complete request; false: valid, proxied once.
  const cases: Array<[string, string, 'head' | 'body' | false]> = [
    ['Content-Length and Transfer-Encoding', head(`Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n${smuggled}`), 'head'],
    ['Transfer-Encoding then Content-Length', head(`Transfer-Encoding: chunked\r\nContent-Length: ${5 + smuggled.length}\r\n\r\n0\r\n\r\n${smuggled}`), 'head'],
    ['two differing Content-Length', head(`Content-Length: 0\r\nContent-Length: ${smuggled.length}\r\n\r\n${smuggled}`), 'head'],
    ['Content-Length list', head(`Content-Length: 0, ${smuggled.length}\r\n\r\n${smuggled}`), 'head'],
    ['Content-Length with a sign', head(`Content-Length: +${smuggled.length}\r\n\r\n${smuggled}`), 'head'],
    ['Transfer-Encoding: xchunked', head(`Transfer-Encoding: xchunked\r\n\r\n${chunk(smuggled)}0\r\n\r\n`), 'head'],
    ['Transfer-Encoding: chunked, identity', head(`Transfer-Encoding: chunked, identity\r\n\r\n${chunk(smuggled)}0\r\n\r\n`), 'head'],
    ['Transfer-Encoding: identity', head(`Transfer-Encoding: identity\r\n\r\n${smuggled}`), 'head'],
    ['Transfer-Encoding with a space before the colon', head(`Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n${smuggled}`), 'head'],
    ['Transfer-Encoding as an obs-fold line', head(`X-A: a\r\n Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n${smuggled}`), 'head'],
    ['Transfer-Encoding folded onto the next line', head(`Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n${smuggled}`), 'head'],
    ['two Transfer-Encoding headers', head(`Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n${smuggled}`), 'head'],
    ['Transfer-Encoding with a vertical tab', head(`Transfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\n${smuggled}`), 'head'],
    ['invalid chunk size', head(`Transfer-Encoding: chunked\r\n\r\nzz\r\n${smuggled}\r\n0\r\n\r\n`), 'body'],
    ['negative chunk size', head(`Transfer-Encoding: chunked\r\n\r\n-1\r\n${smuggled}\r\n0\r\n\r\n`), 'body'],
    ['chunk size with 0x', head(`Transfer-Encoding: chunked\r\n\r\n0x10\r\n${smuggled}\r\n0\r\n\r\n`), 'body'],
    ['overflowing chunk size', head(`Transfer-Encoding: chunked\r\n\r\nffffffffffffffffff1\r\n${smuggled}\r\n0\r\n\r\n`), 'body'],
    ['chunk data longer than its size', head(`Transfer-Encoding: chunked\r\n\r\n1\r\nx${smuggled}\r\n0\r\n\r\n`), 'body'],
    ['chunk size with a bare LF', head(`Transfer-Encoding: chunked\r\n\r\n0\n\r\n${smuggled}`), 'body'],
    ['bare LF line endings', `POST /first HTTP/1.1\nHost: ${HOST('vm1')}\nX-Cocoon-Token: ${w.token1}\nContent-Length: 0\n\n${smuggled}`, 'head'],
    ['bare CR line endings', `POST /first HTTP/1.1\rHost: ${HOST('vm1')}\rX-Cocoon-Token: ${w.token1}\rContent-Length: 0\r\r${smuggled}`, 'head'],
    ['NUL in a header value', head(`X-A: a\x00b\r\nContent-Length: 0\r\n\r\n${smuggled}`), 'head'],
    ['CR inside a header value', head(`X-A: a\rContent-Length: 0\r\n\r\n${smuggled}`), 'head'],
    ['LF inside a header value', head(`X-A: a\nContent-Length: 0\r\n\r\n${smuggled}`), 'head'],
    ['NUL in the request target', `GET /first\x00/x HTTP/1.1\r\nHost: ${HOST('vm1')}\r\nX-Cocoon-Token: ${w.token1}\r\n\r\n`, 'head'],
    ['space in a header name', head(`Content Length: 0\r\n\r\n${smuggled}`), 'head'],
    // RFC 9112 §6.1: framing faulty, but it may be forwarded if the connection closes after it.
    ['HTTP/1.0 with Transfer-Encoding', `POST /first HTTP/1.0\r\nHost: ${HOST('vm1')}\r\nX-Cocoon-Token: ${w.token1}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n${smuggled}`, false],
    ['GET with a body and a second request', `GET /first HTTP/1.1\r\nHost: ${HOST('vm1')}\r\nX-Cocoon-Token: ${w.token1}\r\nContent-Length: ${smuggled.length}\r\n\r\n${smuggled}`, false],
    // Valid framing: the "smuggled" bytes are body bytes; the gateway sends them as the body, framed.
    ['a request whose body is a request', head(`Content-Length: ${smuggled.length}\r\n\r\n${smuggled}`), false],
    ['a chunked body that is a request', head(`Transfer-Encoding: chunked\r\n\r\n${chunk(smuggled)}0\r\n\r\n`), false],
    ['a chunked body with extensions and trailers', head(`Transfer-Encoding: chunked\r\n\r\n${Buffer.byteLength(smuggled).toString(16)};ext=1\r\n${smuggled}\r\n0\r\nX-Trailer: ${smuggled.split('\r\n')[0]}\r\n\r\n`), false],
    // A second request pipelined after a valid one, without a token: refused on its own.
    ['a pipelined second request', head(`Content-Length: 0\r\n\r\n${smuggled}`), false],
  ];

  for (const [name, bytes, refused] of cases) {
    const before1 = w.vm1.received.length;
    const before2 = w.vm2.received.length;
    const ex = await exchange(w.f.port, bytes);
    assert.ok(ex.closed || ex.statuses.length > 0, `${name}: neither an answer nor a close`);
    for (const status of ex.statuses) {
      assert.ok(status < 500, `${name}: ${status}\n${ex.raw.slice(0, 400)}`);
      if (refused) assert.ok(status >= 400, `${name}: an ambiguous request was answered ${status}\n${ex.raw.slice(0, 400)}`);
    }
    const got1 = w.vm1.received.slice(before1);
    const got2 = w.vm2.received.slice(before2);
    await guestSettled(got1);
    assert.deepEqual(got2, [], `${name}: vm2's guest received a request`);
    if (refused === 'head') assert.deepEqual(got1.map((r) => r.url), [], `${name}: vm1's guest received a request`);
    if (refused === 'body') assert.deepEqual(got1.filter((r) => completed.has(r)).map((r) => r.url), [], `${name}: vm1's guest received a complete request from a broken body`);
    if (!refused) assert.ok(got1.every((r) => completed.has(r)), `${name}: a valid request arrived cut`);
    for (const r of got1) {
      assert.equal(r.url, '/first', `${name}: vm1's guest received ${r.method} ${r.url}`);
      assert.equal(r.headers['transfer-encoding'] !== undefined && r.headers['content-length'] !== undefined, false, `${name}: both framings sent upstream`);
    }
    // The pipelined request without a token is refused by the gateway itself.
    if (name === 'a pipelined second request') assert.deepEqual(ex.statuses, [200, 401], `${name}: ${ex.raw.slice(0, 400)}`);
    if (name === 'HTTP/1.0 with Transfer-Encoding') assert.ok(ex.closed && ex.statuses.length === 1, `${name}: the connection is closed after the first answer`);
    await stillServes(w, name);
  }
  assert.equal(w.f.directory.ensureRunningCalls, 0);
});

test('Host and DNS-rebinding tricks never reach another microVM', async (t) => {
  const w = await world(t);
  const { token1 } = w;
  // [name, raw request, status (or undefined: refused, any 4xx or a close), code]
  const cases: Array<[string, string, number | undefined, string | undefined]> = [
    ['absolute-form naming another microVM', `GET http://${HOST('vm2')}/x HTTP/1.1\r\nHost: ${HOST('vm1')}\r\nX-Cocoon-Token: ${token1}\r\nConnection: close\r\n\r\n`, 400, 'invalid_request_target'],
    ['absolute-form with a matching Host', `GET http://${HOST('vm1')}/x HTTP/1.1\r\nHost: ${HOST('vm1')}\r\nX-Cocoon-Token: ${token1}\r\nConnection: close\r\n\r\n`, 400, 'invalid_request_target'],
    ['authority-form (CONNECT)', `CONNECT ${HOST('vm2')}:80 HTTP/1.1\r\nHost: ${HOST('vm2')}:80\r\nX-Cocoon-Token: ${token1}\r\nConnection: close\r\n\r\n`, undefined, undefined],
    ['asterisk-form', `OPTIONS * HTTP/1.1\r\nHost: ${HOST('vm1')}\r\nX-Cocoon-Token: ${token1}\r\nConnection: close\r\n\r\n`, 400, 'invalid_request_target'],
    ['an IPv4 literal Host', `GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Cocoon-Token: ${token1}\r\nConnection: close\r\n\r\n`, 404, 'microvm_not_specified'],
    ['an IPv4 literal Host with vm1 first', `GET / HTTP/1.1\r\nHost: vm1.127.0.0.1\r\nX-Cocoon-Token: ${token1}\r\nConnection: close\r\n\r\n`, 404, 'microvm_not_specified'],
    ['another domain that ends like ours', `GET / HTTP/1.1\r\nHost: vm1.vm.localhost.evil.com\r\nX-Cocoon-Token: ${token1}\r\nConnection: close\r\n\r\n`, 404, 'microvm_not_specified'],
    ['a domain that contains ours as a label prefix', `GET / HTTP/1.1\r\nHost: vm1.xvm.localhost\r\nX-Cocoon-Token: ${token1}\r\nConnection: close\r\n\r\n`, 404, 'microvm_not_specified'],
    ['userinfo naming another microVM', `GET / HTTP/1.1\r\nHost: ${HOST('vm2')}@${HOST('vm1')}\r\nX-Cocoon-Token: ${token1}\r\nConnection: close\r\n\r\n`, 400, 'invalid_host'],
    ['percent-encoded Host', `GET / HTTP/1.1\r\nHost: vm2%2e${'vm.localhost'}\r\nX-Cocoon-Token: ${token1}\r\nConnection: close\r\n\r\n`, 400, 'invalid_host'],
    ['Host with a path', `GET / HTTP/1.1\r\nHost: ${HOST('vm1')}/../${HOST('vm2')}\r\nX-Cocoon-Token: ${token1}\r\nConnection: close\r\n\r\n`, 400, 'invalid_host'],
    ['Host with two ports', `GET / HTTP/1.1\r\nHost: ${HOST('vm2')}:80:${HOST('vm1')}\r\nX-Cocoon-Token: ${token1}\r\nConnection: close\r\n\r\n`, 400, 'invalid_host'],
    ['duplicate Host, same value', `GET / HTTP/1.1\r\nHost: ${HOST('vm1')}\r\nHost: ${HOST('vm1')}\r\nX-Cocoon-Token: ${token1}\r\nConnection: close\r\n\r\n`, 400, undefined],
    ['duplicate Host, differing case of the name', `GET / HTTP/1.1\r\nHost: ${HOST('vm1')}\r\nHOST: ${HOST('vm2')}\r\nX-Cocoon-Token: ${token1}\r\nConnection: close\r\n\r\n`, 400, undefined],
    ['X-Cocoon-MicroVM for vm2 with an IP Host and vm1\'s token', `GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Cocoon-MicroVM: vm2\r\nX-Cocoon-Token: ${token1}\r\nConnection: close\r\n\r\n`, 403, 'token_wrong_microvm'],
    ['two X-Cocoon-MicroVM headers', `GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Cocoon-MicroVM: vm1\r\nX-Cocoon-MicroVM: vm2\r\nX-Cocoon-Token: ${token1}\r\nConnection: close\r\n\r\n`, 400, 'invalid_microvm_id'],
    ['X-Forwarded-Host naming vm1, Host vm2', `GET / HTTP/1.1\r\nHost: ${HOST('vm2')}\r\nX-Forwarded-Host: ${HOST('vm1')}\r\nX-Cocoon-Token: ${token1}\r\nConnection: close\r\n\r\n`, 403, 'token_wrong_microvm'],
    ['Forwarded host= naming vm1, Host vm2', `GET / HTTP/1.1\r\nHost: ${HOST('vm2')}\r\nForwarded: host=${HOST('vm1')}\r\nX-Cocoon-Token: ${token1}\r\nConnection: close\r\n\r\n`, 403, 'token_wrong_microvm'],
    ['X-Original-Host / X-Host naming vm1, IP Host', `GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Original-Host: ${HOST('vm1')}\r\nX-Host: ${HOST('vm1')}\r\nX-Cocoon-Token: ${token1}\r\nConnection: close\r\n\r\n`, 404, 'microvm_not_specified'],
    ['vm1\'s token as a query credential for vm2', `GET /?cocoon_token=${token1} HTTP/1.1\r\nHost: ${HOST('vm2')}\r\nConnection: close\r\n\r\n`, 403, 'token_wrong_microvm'],
    ['vm1\'s token as a cookie for vm2', `GET / HTTP/1.1\r\nHost: ${HOST('vm2')}\r\nCookie: cocoon_token=${token1}\r\nConnection: close\r\n\r\n`, 403, 'token_wrong_microvm'],
    ['vm1\'s token as Authorization for vm2', `GET / HTTP/1.1\r\nHost: ${HOST('vm2')}\r\nAuthorization: Bearer ${token1}\r\nConnection: close\r\n\r\n`, 401, 'token_missing'],
  ];
  for (const [name, bytes, status, code] of cases) {
    const before1 = w.vm1.received.length;
    const ex = await exchange(w.f.port, bytes);
    assert.ok(ex.closed, `${name}: the connection stays open after Connection: close`);
    assert.ok(ex.statuses.length <= 1, name);
    const got = ex.statuses[0];
    if (status === undefined) assert.ok(got === undefined || (got >= 400 && got < 500), `${name}: ${got}\n${ex.raw.slice(0, 300)}`);
    else assert.equal(got, status, `${name}: ${ex.raw.slice(0, 400)}`);
    if (code !== undefined) assert.equal(errorCode({ status: got ?? 0, headers: {}, body: ex.raw.slice(ex.raw.indexOf('\r\n\r\n') + 4) }), code, name);
    assert.ok(!/set-cookie/i.test(ex.raw), `${name}: no cookie is set`);
    assert.equal(w.vm1.received.length, before1, `${name}: vm1's guest received a request`);
    assert.equal(w.vm2.received.length, 0, `${name}: vm2's guest received a request`);
    await stillServes(w, name);
  }
  // X-Forwarded-Host from the client is never passed on (the guest sees the real Host).
  const fwd = await request(w.f.port, { headers: { host: HOST('vm1'), 'x-cocoon-token': token1, 'x-forwarded-host': HOST('vm2'), forwarded: `host=${HOST('vm2')}` } });
  assert.equal(fwd.status, 200);
  const seen = w.vm1.received.at(-1)!;
  assert.equal(seen.headers['x-forwarded-host'], HOST('vm1'));
  assert.equal(seen.headers.forwarded, undefined);
  assert.equal(w.vm2.received.length, 0);
});

test('tokens: another token\'s id with this secret, one character changed, replays after revoke and after expiry', async (t) => {
  const w = await world(t);
  const { f } = w;
  const a = await f.token('vm1', { expirationMinutes: 1 });
  const b = await f.token('vm1');
  const host = HOST('vm1');
  const at = 'cocoon_tk_'.length + 26 + 1;
  const get = (headers: Record<string, string>, path = '/') => request(f.port, { path, headers: { host, ...headers } });

  // Both work to begin with.
  assert.equal((await get({ 'x-cocoon-token': a.token })).status, 200);
  assert.equal((await get({ 'x-cocoon-token': b.token })).status, 200);
  const served = w.vm1.received.length;

  const swapped = `${b.token.slice(0, at)}${a.token.slice(at)}`;
  const flips: string[] = [];
  for (const i of [at, at + 1, at + 20, a.token.length - 2]) {
    const c = a.token[i]!;
    flips.push(`${a.token.slice(0, i)}${c === 'A' ? 'B' : 'A'}${a.token.slice(i + 1)}`);
  }
  const idFlip = `${a.token.slice(0, 12)}${a.token[12] === '0' ? '1' : '0'}${a.token.slice(13)}`;
  for (const [name, tok] of [['the id of another token with this secret', swapped], ...flips.map((x, i) => [`secret character ${i} changed`, x]), ['id character changed', idFlip]] as Array<[string, string]>) {
    for (const via of ['header', 'cookie', 'query'] as const) {
      const r = via === 'header' ? await get({ 'x-cocoon-token': tok }) : via === 'cookie' ? await get({ cookie: `cocoon_token=${tok}` }) : await get({}, `/?cocoon_token=${tok}`);
      assert.equal(r.status, 401, `${name} (${via}): ${r.status} ${r.body}`);
      assert.ok(['token_invalid', 'token_malformed'].includes(errorCode(r) ?? ''), `${name} (${via}): ${errorCode(r)}`);
      assert.ok(!/cocoon_token=cocoon_tk/.test(String(r.headers['set-cookie'] ?? '')), `${name} (${via}): no cookie for a bad token`);
    }
  }

  // Logged in with a cookie, then revoked: header, cookie and query all refused at once.
  const login = await get({}, `/?cocoon_token=${b.token}`);
  assert.equal(login.status, 303);
  assert.equal((await get({ cookie: `cocoon_token=${b.token}` })).status, 200);
  await f.revoke('vm1', b.id);
  for (const r of [await get({ 'x-cocoon-token': b.token }), await get({ cookie: `cocoon_token=${b.token}` }), await get({}, `/?cocoon_token=${b.token}`)]) {
    assert.equal(r.status, 401);
    assert.equal(errorCode(r), 'token_revoked');
    assert.equal(r.headers.location, undefined, 'a revoked token is not turned into a cookie');
  }

  // Used, then expired (the verifier's clock moved past the expiry): refused everywhere.
  assert.equal((await get({ 'x-cocoon-token': a.token })).status, 200);
  f.now.ms = Date.now() + 61_000;
  for (const r of [await get({ 'x-cocoon-token': a.token }), await get({ cookie: `cocoon_token=${a.token}` }), await get({}, `/?cocoon_token=${a.token}`)]) {
    assert.equal(r.status, 401);
    assert.equal(errorCode(r), 'token_expired');
  }
  // A WebSocket handshake with the expired token is refused the same way (nothing upgraded).
  const ws = await exchange(f.port, `GET /ws HTTP/1.1\r\nHost: ${host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nX-Cocoon-Token: ${a.token}\r\n\r\n`);
  assert.deepEqual(ws.statuses, [401], ws.raw.slice(0, 300));
  f.now.ms = undefined;

  assert.equal(w.vm1.received.length, served + 2, 'only the two valid uses reached the guest');
  assert.equal(w.vm2.received.length, 0);
  await stillServes(w, 'token cases');
});
