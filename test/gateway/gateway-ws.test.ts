import assert from 'node:assert/strict';
import { once } from 'node:events';
import { test } from 'node:test';
import { WebSocket, WebSocketServer } from 'ws';
import { rawExchange, sleep, startGateway, startGuest } from './helpers.ts';

async function startEchoGuest(t: Parameters<typeof startGuest>[0]) {
  const guest = await startGuest(t, (_req, res) => res.end('plain http'));
  const wss = new WebSocketServer({ server: guest.server });
  const upgrades: import('node:http').IncomingHttpHeaders[] = [];
  wss.on('connection', (ws, req) => {
    upgrades.push(req.headers);
    ws.on('message', (data, isBinary) => ws.send(data, { binary: isBinary }));
  });
  t.after(() => {
    for (const c of wss.clients) c.terminate();
    wss.close();
  });
  return { guest, upgrades };
}

function connect(t: Parameters<typeof startGuest>[0], url: string, headers: Record<string, string>): WebSocket {
  const ws = new WebSocket(url, { headers });
  ws.on('error', () => {});
  t.after(() => ws.terminate());
  return ws;
}

test('WebSocket echo through the gateway; the guest handshake carries no token', async (t) => {
  const { guest, upgrades } = await startEchoGuest(t);
  const f = await startGateway(t);
  f.directory.add({ id: 'vm1', state: 'SUSPENDED', ports: new Map([[8080, guest.port]]) });
  f.directory.wakeDelayMs = 100;
  const { token } = await f.token('vm1');

  const ws = connect(t, `ws://127.0.0.1:${f.port}/socket?x=1`, { host: 'vm1.vm.localhost', 'x-cocoon-token': token, cookie: `cocoon_token=${token}; keep=1` });
  await once(ws, 'open');
  assert.equal(f.directory.ensureRunningCalls, 1, 'the upgrade woke the microVM');
  for (const msg of ['hello', 'x'.repeat(200_000)]) {
    ws.send(msg);
    const [data] = (await once(ws, 'message')) as [Buffer];
    assert.equal(data.toString(), msg);
  }
  ws.send(Buffer.from([1, 2, 3]));
  const [bin] = (await once(ws, 'message')) as [Buffer];
  assert.deepEqual([...bin], [1, 2, 3]);

  assert.equal(upgrades.length, 1);
  assert.equal(upgrades[0]!['x-cocoon-token'], undefined);
  assert.equal(upgrades[0]!.cookie, 'keep=1');
  assert.equal(f.directory.wsOpened, 1);
  assert.equal(f.gateway.stats().webSockets, 1);
  assert.equal(f.directory.started, 1);
  assert.equal(f.directory.finished, 1, 'the handshake counts as a request until the tunnel opens');

  ws.close();
  await once(ws, 'close');
  await sleep(50);
  assert.equal(f.directory.wsClosed, 1);
  assert.equal(f.gateway.stats().webSockets, 0);
});

test('WebSocket: routing by X-Cocoon-MicroVM and a ?cocoon_token= credential that is stripped', async (t) => {
  const { guest } = await startEchoGuest(t);
  const f = await startGateway(t);
  f.directory.add({ id: 'vm1', ports: new Map([[8080, guest.port]]) });
  const { token } = await f.token('vm1');
  const ws = connect(t, `ws://127.0.0.1:${f.port}/s?a=1&cocoon_token=${token}`, { 'x-cocoon-microvm': 'vm1' });
  await once(ws, 'open');
  ws.send('ping');
  const [data] = (await once(ws, 'message')) as [Buffer];
  assert.equal(data.toString(), 'ping');
  assert.equal(guest.received.length, 0, 'no plain HTTP request');
  ws.close();
});

test('WebSocket upgrades get the same token checks; nothing reaches the guest', async (t) => {
  const { guest, upgrades } = await startEchoGuest(t);
  const f = await startGateway(t);
  f.directory.add({ id: 'vm1', state: 'SUSPENDED', ports: new Map([[8080, guest.port], [9000, guest.port]]) });
  const other = await f.token('vm2');
  const limited = await f.token('vm1', { allowedPorts: [8080] });
  const cases: Array<[Record<string, string>, number]> = [
    [{}, 401],
    [{ 'x-cocoon-token': 'garbage' }, 401],
    [{ 'x-cocoon-token': other.token }, 403],
    [{ 'x-cocoon-token': limited.token, 'x-cocoon-port': '9000' }, 403],
  ];
  for (const [headers, status] of cases) {
    const ws = connect(t, `ws://127.0.0.1:${f.port}/`, { host: 'vm1.vm.localhost', ...headers });
    const [, res] = (await once(ws, 'unexpected-response')) as [unknown, import('node:http').IncomingMessage];
    assert.equal(res.statusCode, status, JSON.stringify(headers));
    res.resume();
  }
  assert.equal(upgrades.length, 0);
  assert.equal(f.directory.ensureRunningCalls, 0);

  // A non-WebSocket upgrade is handled as a plain request (and refused the same way).
  const h2c = await rawExchange(f.port, 'GET / HTTP/1.1\r\nHost: vm1.vm.localhost\r\nConnection: Upgrade, HTTP2-Settings, close\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n');
  assert.match(h2c, /^HTTP\/1.1 401 /);
});

test('the guest refusing the upgrade is relayed; a guest that is down gives 502', async (t) => {
  const guest = await startGuest(t, (_req, res) => {
    res.writeHead(426, { 'content-type': 'text/plain' });
    res.end('no websockets here');
  });
  const f = await startGateway(t);
  f.directory.add({ id: 'vm1', ports: new Map([[8080, guest.port]]) });
  f.directory.add({ id: 'vm2', ports: new Map([[8080, 1]]) });
  const t1 = await f.token('vm1');
  const ws = connect(t, `ws://127.0.0.1:${f.port}/`, { host: 'vm1.vm.localhost', 'x-cocoon-token': t1.token });
  const [, res] = (await once(ws, 'unexpected-response')) as [unknown, import('node:http').IncomingMessage];
  assert.equal(res.statusCode, 426);
  res.resume();

  const t2 = await f.token('vm2');
  const ws2 = connect(t, `ws://127.0.0.1:${f.port}/`, { host: 'vm2.vm.localhost', 'x-cocoon-token': t2.token });
  const [, res2] = (await once(ws2, 'unexpected-response')) as [unknown, import('node:http').IncomingMessage];
  assert.equal(res2.statusCode, 502);
  res2.resume();
  await sleep(20);
  assert.equal(f.directory.started, 2);
  assert.equal(f.directory.finished, 2);
});

test('closing the gateway closes open tunnels', async (t) => {
  const { guest } = await startEchoGuest(t);
  const f = await startGateway(t);
  f.directory.add({ id: 'vm1', ports: new Map([[8080, guest.port]]) });
  const { token } = await f.token('vm1');
  const ws = connect(t, `ws://127.0.0.1:${f.port}/`, { host: 'vm1.vm.localhost', 'x-cocoon-token': token });
  await once(ws, 'open');
  await f.gateway.close();
  await once(ws, 'close');
  assert.equal(f.directory.wsClosed, 1);
});
