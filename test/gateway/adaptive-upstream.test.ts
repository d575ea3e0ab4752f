/**
 * The adaptive upstream client (upstream.ts AdaptiveUpstreamClient, the gateway's default): an
 * upstream that answers `Connection: close` gets its next requests on connections of their own
 * (node:http, one exchange each, no pool), one in 64 through undici again; what the guest and the
 * client see is the same either way, the pending-connect bound and the retry on reset hold on
 * both paths, and an app that turns to keep-alive is pooled again.
 */
import assert from 'node:assert/strict';
import http from 'node:http';
import net from 'node:net';
import { test, type TestContext } from 'node:test';
import { request, sleep, startGateway, startGuest } from './helpers.ts';

/** Polls `check` until it holds (the test's own timeout bounds the wait). */
async function until(check: () => boolean): Promise<void> {
  while (!check()) await sleep(5);
}

test('an upstream that closes every connection: later requests go one per connection, answered the same', { timeout: 60_000 }, async (t) => {
  let connections = 0;
  const guest = await startGuest(t, (req, res, record) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => {
      chunks.push(c);
      record.bodyBytes += c.length;
    });
    req.on('end', () => {
      const body = req.url === '/big' ? Buffer.alloc(3 * 1024 * 1024, 'b') : Buffer.from(JSON.stringify({ method: req.method, url: req.url, body: Buffer.concat(chunks).toString() }));
      res.writeHead(200, { 'content-type': 'application/json', 'content-length': body.length, connection: 'close', 'x-guest': 'yes' });
      res.end(body);
    });
  });
  guest.server.on('connection', () => connections++);
  const f = await startGateway(t);
  f.directory.add({ id: 'vm1', ports: new Map([[8080, guest.port]]) });
  const { token } = await f.token('vm1');
  const headers = { host: 'vm1.vm.localhost', 'x-cocoon-token': token };

  // The client's own connection stays alive through all of them (the guest's close is hop-by-hop).
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  t.after(() => agent.destroy());
  let clientConnections = 0;
  const viaAgent = (o: { method?: string; path: string; body?: string }): Promise<{ status: number; headers: http.IncomingHttpHeaders; body: Buffer }> =>
    new Promise((resolve, reject) => {
      const req = http.request({ host: '127.0.0.1', port: f.port, agent, method: o.method ?? 'GET', path: o.path, headers }, (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks) }));
        res.on('error', reject);
      });
      req.on('socket', (s) => {
        if (!(s as net.Socket & { counted?: boolean }).counted) {
          (s as net.Socket & { counted?: boolean }).counted = true;
          clientConnections++;
        }
      });
      req.on('error', reject);
      req.end(o.body);
    });

  for (let i = 0; i < 10; i++) {
    const a = await viaAgent({ path: `/get/${i}?q=${i}` });
    assert.equal(a.status, 200);
    assert.deepEqual(JSON.parse(a.body.toString()), { method: 'GET', url: `/get/${i}?q=${i}`, body: '' });
    assert.equal(a.headers['x-guest'], 'yes');
    assert.notEqual(a.headers['connection'], 'close', 'the guest\'s Connection: close does not reach the client');
  }
  const posted = await viaAgent({ method: 'POST', path: '/post', body: 'hello body' });
  assert.deepEqual(JSON.parse(posted.body.toString()), { method: 'POST', url: '/post', body: 'hello body' });
  const big = await viaAgent({ path: '/big' });
  assert.equal(big.body.length, 3 * 1024 * 1024);
  assert.ok(big.body.every((b) => b === 0x62));

  assert.equal(clientConnections, 1, 'one client connection for all twelve requests');
  assert.equal(connections, 12, 'one guest connection per request');
  // The first went through undici (keep-alive offered); once the guest said close, one-shot.
  assert.notEqual(guest.received[0]!.headers.connection, 'close');
  for (const r of guest.received.slice(1)) assert.equal(r.headers.connection, 'close', `${r.url} was sent on a connection of its own`);
  // The headers the guest sees are otherwise the same on both paths.
  const names = (h: http.IncomingHttpHeaders) => Object.keys(h).filter((k) => k !== 'connection').sort();
  assert.deepEqual(names(guest.received[1]!.headers), names(guest.received[0]!.headers));
  assert.equal(guest.received[1]!.headers['x-cocoon-token'], undefined, 'the token never reaches the guest');
  await until(() => f.gateway.stats().inFlight === 0);
  assert.equal(f.directory.started, f.directory.finished);
});

test('an upstream that turns to keep-alive is pooled again after the next probe', { timeout: 60_000 }, async (t) => {
  let close = true;
  let connections = 0;
  const guest = await startGuest(t, (_req, res) => {
    res.writeHead(200, close ? { 'content-length': 2, connection: 'close' } : { 'content-length': 2 });
    res.end('ok');
  });
  guest.server.on('connection', () => connections++);
  const f = await startGateway(t);
  f.directory.add({ id: 'vm1', ports: new Map([[8080, guest.port]]) });
  const { token } = await f.token('vm1');
  const headers = { host: 'vm1.vm.localhost', 'x-cocoon-token': token };
  for (let i = 0; i < 3; i++) assert.equal((await request(f.port, { headers })).status, 200);
  close = false;
  // At most 64 requests until the probe through undici sees keep-alive; after it, one pooled connection.
  for (let i = 0; i < 70; i++) assert.equal((await request(f.port, { headers })).status, 200);
  const before = connections;
  for (let i = 0; i < 10; i++) assert.equal((await request(f.port, { headers })).status, 200);
  assert.equal(connections, before, 'ten more requests opened no new guest connection');
  // The one-shot connections the guest answered with keep-alive were closed by the gateway, not left open.
  const open = await new Promise<number>((resolve, reject) => guest.server.getConnections((e, n) => (e ? reject(e) : resolve(n))));
  assert.equal(open, 1, 'only the pooled connection is still open');
});

test('one-shot connections keep the pending bound, drop abandoned connects, and retry a reset GET', { timeout: 60_000 }, async (t) => {
  const connections: net.Socket[] = [];
  const requested = new WeakSet<net.Socket>();
  let resetNext = false;
  const server = net.createServer((socket) => {
    connections.push(socket);
    let head = '';
    socket.on('data', (c: Buffer) => {
      head += c.toString('latin1');
      if (!head.includes('\r\n\r\n')) return;
      if (resetNext) {
        resetNext = false;
        socket.resetAndDestroy();
        return;
      }
      requested.add(socket);
      if (head.startsWith('GET /now ')) answer(socket, 'now');
    });
    socket.on('error', () => {});
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(async () => {
    for (const s of connections) s.destroy();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  });
  const answer = (socket: net.Socket, body: string): void => {
    socket.end(`HTTP/1.1 200 OK\r\nContent-Length: ${body.length}\r\nConnection: close\r\n\r\n${body}`);
  };
  const f = await startGateway(t, { guestConnect: { pendingPerUpstream: 1, pendingHoldMs: 600_000 } });
  f.directory.add({ id: 'vm1', ports: new Map([[8080, (server.address() as net.AddressInfo).port]]) });
  const { token } = await f.token('vm1');
  const headers = { host: 'vm1.vm.localhost', 'x-cocoon-token': token };

  // The first answer says close: from now on, one-shot.
  assert.equal((await request(f.port, { headers, path: '/now' })).body, 'now');
  await until(() => connections.length === 1 && connections[0]!.destroyed);

  // A reset before any response byte: a GET is sent again on a new connection.
  resetNext = true;
  const retried = await request(f.port, { headers, path: '/now' });
  assert.equal(retried.status, 200);
  assert.equal(retried.body, 'now');
  assert.equal(connections.length, 3);

  // A holds the one pending slot; B's connect waits, then B's client leaves: B never connects.
  const a = request(f.port, { headers, path: '/a' });
  await until(() => connections.length === 4 && requested.has(connections[3]!));
  const b = net.connect(f.port, '127.0.0.1');
  b.on('error', () => {});
  b.write(`GET /b HTTP/1.1\r\nHost: vm1.vm.localhost\r\nX-Cocoon-Token: ${token}\r\n\r\n`);
  await until(() => f.gateway.stats().inFlight === 2);
  await sleep(50);
  assert.equal(connections.length, 4, 'B waits for the pending slot');
  b.destroy();
  await until(() => f.gateway.stats().inFlight === 1);
  const c = request(f.port, { headers, path: '/c' });
  await until(() => f.gateway.stats().inFlight === 2);
  answer(connections[3]!, 'a');
  assert.equal((await a).body, 'a');
  await until(() => connections.length === 5 && requested.has(connections[4]!));
  answer(connections[4]!, 'c');
  assert.equal((await c).body, 'c');
  assert.equal(connections.length, 5, 'the abandoned request opened no guest connection');
  await until(() => f.gateway.stats().inFlight === 0);
  assert.equal(f.directory.started, f.directory.finished);
});
