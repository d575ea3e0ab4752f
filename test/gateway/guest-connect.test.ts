/**
 * New connections to a guest (upstream.ts guestConnector): at most `pendingPerUpstream` wait for
 * the guest's listener at once; a connect still queued when its request's client goes away is
 * dropped, never opened (issue 12: queued connects of requests wrk had abandoned held the
 * pending slots and stalled the requests behind them).
 *
 * The guest here is a raw TCP server that counts connections and answers each one only when
 * the test says so: a held answer keeps the one pending slot taken (pendingHoldMs is long).
 */
import assert from 'node:assert/strict';
import net from 'node:net';
import { test, type TestContext } from 'node:test';
import { request, sleep, startGateway } from './helpers.ts';

interface HeldGuest {
  port: number;
  /** Connections accepted, in order. */
  connections: net.Socket[];
  /** Whether a connection's request head has arrived. */
  requested: WeakSet<net.Socket>;
  answer(socket: net.Socket, body: string): void;
}

async function heldGuest(t: TestContext): Promise<HeldGuest> {
  const connections: net.Socket[] = [];
  const requested = new WeakSet<net.Socket>();
  const server = net.createServer((socket) => {
    connections.push(socket);
    let head = '';
    socket.on('data', (c: Buffer) => {
      head += c.toString('latin1');
      if (head.includes('\r\n\r\n')) requested.add(socket);
    });
    socket.on('error', () => {});
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(async () => {
    for (const s of connections) s.destroy();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  });
  return {
    port: (server.address() as net.AddressInfo).port,
    connections,
    requested,
    answer(socket, body) {
      socket.end(`HTTP/1.1 200 OK\r\nContent-Length: ${body.length}\r\nConnection: close\r\n\r\n${body}`);
    },
  };
}

/** Polls `check` until it holds (the test's own timeout bounds the wait). */
async function until(check: () => boolean): Promise<void> {
  while (!check()) await sleep(5);
}

test('a queued guest connect whose client went away is dropped; the next request gets the slot', { timeout: 60_000 }, async (t) => {
  const guest = await heldGuest(t);
  const f = await startGateway(t, { guestConnect: { pendingPerUpstream: 1, pendingHoldMs: 600_000 } });
  f.directory.add({ id: 'vm1', ports: new Map([[8080, guest.port]]) });
  const { token } = await f.token('vm1');
  const headers = { host: 'vm1.vm.localhost', 'x-cocoon-token': token };

  // A takes the one pending slot: its connection is open, its answer held.
  const a = request(f.port, { headers });
  await until(() => guest.connections.length === 1 && guest.requested.has(guest.connections[0]!));

  // B is admitted, its connect queued behind A's; then its client goes away.
  const b = net.connect(f.port, '127.0.0.1');
  b.on('error', () => {});
  b.write(`GET /b HTTP/1.1\r\nHost: vm1.vm.localhost\r\nX-Cocoon-Token: ${token}\r\n\r\n`);
  await until(() => f.gateway.stats().inFlight === 2);
  b.destroy();
  await until(() => f.gateway.stats().inFlight === 1);

  // C is queued behind A too; A's answer frees the slot, and C (not B's dead request) gets it.
  const c = request(f.port, { headers, path: '/c' });
  await until(() => f.gateway.stats().inFlight === 2);
  guest.answer(guest.connections[0]!, 'a');
  assert.equal((await a).body, 'a');
  const forC = (): net.Socket | undefined => guest.connections.slice(1).find((s) => guest.requested.has(s));
  await until(() => forC() !== undefined);
  guest.answer(forC()!, 'c');
  const answered = await c;
  assert.equal(answered.status, 200);
  assert.equal(answered.body, 'c');
  // No connection was ever opened for B.
  assert.equal(guest.connections.length, 2, 'the abandoned request opened no guest connection');
  await until(() => f.gateway.stats().inFlight === 0);
  assert.equal(f.directory.started, f.directory.finished);
});

test('connects beyond the pending bound wait, and each opens once a slot frees', { timeout: 60_000 }, async (t) => {
  const guest = await heldGuest(t);
  const f = await startGateway(t, { guestConnect: { pendingPerUpstream: 2, pendingHoldMs: 600_000 } });
  f.directory.add({ id: 'vm1', ports: new Map([[8080, guest.port]]) });
  const { token } = await f.token('vm1');
  const headers = { host: 'vm1.vm.localhost', 'x-cocoon-token': token };
  const answers = [1, 2, 3, 4].map((i) => request(f.port, { headers, path: `/${i}` }));
  await until(() => f.gateway.stats().inFlight === 4 && guest.connections.length === 2);
  // Only two connections while both are pending, however long the others wait.
  await sleep(50);
  assert.equal(guest.connections.length, 2);
  for (let i = 0; i < 4; i++) {
    await until(() => guest.connections.length > i && guest.requested.has(guest.connections[i]!));
    guest.answer(guest.connections[i]!, `r${i}`);
  }
  const bodies = (await Promise.all(answers)).map((x) => x.body).sort();
  assert.deepEqual(bodies, ['r0', 'r1', 'r2', 'r3']);
  assert.equal(guest.connections.length, 4);
});

test('a route whose ports queue more (upstreamBacklog 256) gets MAX_PENDING_CONNECTS (4) new connections at once, not 2', { timeout: 60_000 }, async (t) => {
  const guest = await heldGuest(t);
  const f = await startGateway(t, { guestConnect: { pendingHoldMs: 600_000 } });
  // QEMU with cocoon-listen.so: backlog 256 (1 allows 2, as the test above shows).
  f.directory.add({ id: 'vm1', ports: new Map([[8080, guest.port]]), backlog: 256 });
  const { token } = await f.token('vm1');
  const headers = { host: 'vm1.vm.localhost', 'x-cocoon-token': token };
  // pendingConnectsFor(256) = MAX_PENDING_CONNECTS (4): the guest app's own queue bounds it too.
  const answers = Array.from({ length: 6 }, (_, i) => request(f.port, { headers, path: `/${i}` }));
  await until(() => guest.connections.length === 4 && guest.connections.every((s) => guest.requested.has(s)));
  await sleep(50);
  assert.equal(guest.connections.length, 4, 'four at once, not two and not six');
  for (let i = 0; i < 6; i++) {
    await until(() => guest.connections.length > i && guest.requested.has(guest.connections[i]!));
    guest.answer(guest.connections[i]!, `r${i}`);
  }
  assert.equal((await Promise.all(answers)).filter((x) => x.status === 200).length, 6);
});
