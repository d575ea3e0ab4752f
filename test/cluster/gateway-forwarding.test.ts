/**
 * Gateway forwarding between hosts, with two real gateways and no QEMU: host B's directory says
 * that host A runs the microVM (`route.peer`), so B forwards to A's gateway, which checks the
 * token again and proxies to the guest (a real HTTP/WebSocket server). Covers HTTP, streamed
 * bodies both ways, keep-alive between the hosts, WebSockets, what the guest sees (the client's
 * address, no credentials, no X-Cocoon-Peer), one hop at most, a dead owner, and X-Cocoon-Peer
 * from outside (tampered, replayed, expired, for another host) refused with 401.
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import http from 'node:http';
import { test, type TestContext } from 'node:test';
import { WebSocket, WebSocketServer } from 'ws';
import { PeerAuth } from '../../src/cluster/peer-auth.ts';
import { createTokenVerifier } from '../../src/gateway/tokens.ts';
import type { MicroVMDirectory, MicroVMRoute } from '../../src/gateway/types.ts';
import { errorCode, request, sleep, startGateway, startGuest, type Fixture } from '../gateway/helpers.ts';

const SECRET = 's'.repeat(43);

class PeerDirectory implements MicroVMDirectory {
  lookups = 0;
  activity = 0;
  readonly owner: { hostId: string; port: number };
  constructor(owner: { hostId: string; port: number }) {
    this.owner = owner;
  }
  #route(id: string): MicroVMRoute {
    return {
      id, state: 'RUNNING', appPort: 8080, autoResumeEnabled: true, upstreamHost: '127.0.0.1',
      upstreamPortFor: () => null,
      peer: { hostId: this.owner.hostId, host: '127.0.0.1', port: this.owner.port },
    };
  }
  lookup(id: string): MicroVMRoute {
    this.lookups++;
    return this.#route(id);
  }
  async ensureRunning(id: string): Promise<MicroVMRoute> {
    return this.#route(id);
  }
  requestStarted(): void { this.activity++; }
  requestFinished(): void {}
  webSocketOpened(): void { this.activity++; }
  webSocketClosed(): void {}
}

interface Pair {
  a: Fixture;
  b: Fixture;
  bDirectory: PeerDirectory;
  authA: PeerAuth;
  authB: PeerAuth;
  guestPort: number;
  guestSeen: http.IncomingHttpHeaders[];
  /** Connections the owner's gateway accepted (from host B). */
  connectionsToA: () => number;
  token: string;
}

async function twoHosts(t: TestContext): Promise<Pair> {
  const guestSeen: http.IncomingHttpHeaders[] = [];
  const guest = await startGuest(t, (req, res, record) => {
    guestSeen.push(req.headers);
    req.on('data', (c: Buffer) => (record.bodyBytes += c.length));
    req.on('end', () => {
      if (req.url === '/big') {
        // A streamed answer larger than any buffer.
        res.writeHead(200, { 'content-type': 'application/octet-stream' });
        for (let i = 0; i < 64; i++) res.write(Buffer.alloc(64 * 1024, i));
        res.end();
        return;
      }
      res.writeHead(200, { 'content-type': 'application/json', 'x-guest': 'yes' });
      res.end(JSON.stringify({ url: req.url, bodyBytes: record.bodyBytes }));
    });
  });
  const wss = new WebSocketServer({ server: guest.server });
  wss.on('connection', (ws) => ws.on('message', (data, isBinary) => ws.send(data, { binary: isBinary })));
  t.after(() => {
    for (const c of wss.clients) c.terminate();
    wss.close();
  });
  const authA = new PeerAuth({ hostId: 'host-a', secret: SECRET });
  const authB = new PeerAuth({ hostId: 'host-b', secret: SECRET });
  const surface = (name: string) => ({
    claims: (req: http.IncomingMessage) => req.headers['x-test-surface'] !== undefined,
    microvmOf: () => 'vm1',
    handle: (_req: http.IncomingMessage, res: http.ServerResponse) => res.end(`surface on ${name}`),
  });
  const a = await startGateway(t, { peers: authA, surfaces: [surface('a')] });
  a.directory.add({ id: 'vm1', ports: new Map([[8080, guest.port]]) });
  let connections = 0;
  a.gateway.server.on('connection', () => connections++);
  const bDirectory = new PeerDirectory({ hostId: 'host-a', port: a.port });
  // B reads tokens from the same database as A (one cluster, one store).
  const b = await startGateway(t, { peers: authB, directory: bDirectory, tokens: createTokenVerifier(a.db), surfaces: [surface('b')] });
  const { token } = await a.token('vm1');
  return { a, b, bDirectory, authA, authB, guestPort: guest.port, guestSeen, connectionsToA: () => connections, token };
}

test('HTTP through host B reaches the guest on host A: bodies streamed, keep-alive between hosts, the guest sees the client', async (t) => {
  const p = await twoHosts(t);
  const headers = { host: 'vm1.vm.localhost', 'x-cocoon-token': p.token };
  const first = await request(p.b.port, { path: '/hello?x=1', headers });
  assert.equal(first.status, 200, first.body);
  assert.equal(first.headers['x-guest'], 'yes');
  assert.deepEqual(JSON.parse(first.body), { url: '/hello?x=1', bodyBytes: 0 });
  const seen = p.guestSeen.at(-1)!;
  assert.equal(seen['x-cocoon-token'], undefined, 'credentials never reach the guest');
  assert.equal(seen['x-cocoon-peer'], undefined, 'nor the hosts\' header');
  assert.equal(seen['x-forwarded-for'], '127.0.0.1', 'the client address as host B saw it');
  assert.equal(seen.host, 'vm1.vm.localhost');
  // The owner counted the request for the idle timer; host B only forwarded.
  assert.equal(p.a.directory.started, 1);
  assert.equal(p.bDirectory.activity, 0);

  // A 3 MiB upload and a 4 MiB download, streamed through both gateways.
  const upload = Buffer.alloc(3 * 1024 * 1024, 7);
  const up = await request(p.b.port, { method: 'POST', path: '/upload', headers: { ...headers, 'content-type': 'application/octet-stream' }, body: upload });
  assert.equal(up.status, 200);
  assert.equal(JSON.parse(up.body).bodyBytes, upload.length);
  const down = await new Promise<Buffer>((resolve, reject) => {
    http.get({ host: '127.0.0.1', port: p.b.port, path: '/big', headers, agent: false }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c)).on('end', () => resolve(Buffer.concat(chunks))).on('error', reject);
    }).on('error', reject);
  });
  assert.equal(down.length, 64 * 64 * 1024);
  assert.equal(down[down.length - 1], 63);

  // Sequential requests reuse B's pooled connection to A.
  const before = p.connectionsToA();
  for (let i = 0; i < 10; i++) assert.equal((await request(p.b.port, { path: `/n${i}`, headers })).status, 200);
  assert.ok(p.connectionsToA() - before <= 1, `host B reused its connection to A (${p.connectionsToA() - before} new)`);
});

test('the token is checked on both hosts: a bad one is refused by B, before anything is forwarded', async (t) => {
  const p = await twoHosts(t);
  const seen = p.guestSeen.length;
  const missing = await request(p.b.port, { path: '/', headers: { host: 'vm1.vm.localhost' } });
  assert.equal(missing.status, 401);
  assert.equal(errorCode(missing), 'token_missing');
  const wrong = await request(p.b.port, { path: '/', headers: { host: 'vm1.vm.localhost', 'x-cocoon-token': `cocoon_tk_${'x'.repeat(43)}` } });
  assert.equal(wrong.status, 401);
  assert.equal(p.guestSeen.length, seen);
  assert.equal(p.a.directory.lookups, 0, 'host A never heard of them');
});

test('WebSocket through host B to the guest on host A', async (t) => {
  const p = await twoHosts(t);
  const ws = new WebSocket(`ws://127.0.0.1:${p.b.port}/socket`, { headers: { host: 'vm1.vm.localhost', 'x-cocoon-token': p.token } });
  ws.on('error', () => {});
  t.after(() => ws.terminate());
  await once(ws, 'open');
  for (const msg of ['hello', 'y'.repeat(300_000)]) {
    ws.send(msg);
    const [data] = (await once(ws, 'message')) as [Buffer];
    assert.equal(data.toString(), msg);
  }
  assert.equal(p.a.directory.wsOpened, 1, 'host A runs the tunnel and counts it');
  ws.close();
  await once(ws, 'close');
  await sleep(50);
  assert.equal(p.a.directory.wsClosed, 1);
});

test('X-Cocoon-Peer from outside: missing is a client request, tampered, replayed, expired or for another host is 401', async (t) => {
  const p = await twoHosts(t);
  const headers = { host: 'vm1.vm.localhost', 'x-cocoon-token': p.token };
  const claims = { clientIp: '198.51.100.9', proto: 'http' } as const;
  // A correctly signed one (as host B would send it) is accepted, once; the guest sees the claimed client.
  const valid = p.authB.sign('GET', '/p', 'host-a', claims);
  const ok = await request(p.a.port, { path: '/p', headers: { ...headers, 'x-cocoon-peer': valid } });
  assert.equal(ok.status, 200, ok.body);
  assert.equal(p.guestSeen.at(-1)!['x-forwarded-for'], '198.51.100.9');
  assert.equal(p.guestSeen.at(-1)!['x-cocoon-peer'], undefined);
  const seen = p.guestSeen.length;
  const refusals: Record<string, string> = {
    replayed: valid,
    tampered: p.authB.sign('GET', '/p', 'host-a', claims).replace('c=198.51.100.9', 'c=10.0.0.1'),
    'other target': p.authB.sign('GET', '/other', 'host-a', claims),
    'other host': p.authB.sign('GET', '/p', 'host-c', claims),
    expired: new PeerAuth({ hostId: 'host-b', secret: SECRET, now: () => Date.now() - 60_000 }).sign('GET', '/p', 'host-a', claims),
    'other key': new PeerAuth({ hostId: 'host-b', secret: 'o'.repeat(43) }).sign('GET', '/p', 'host-a', claims),
    garbage: 'v1;h=host-b;trust=me',
  };
  for (const [name, header] of Object.entries(refusals)) {
    const r = await request(p.a.port, { path: '/p', headers: { ...headers, 'x-cocoon-peer': header } });
    assert.equal(r.status, 401, name);
    assert.equal(errorCode(r), 'peer_auth_failed', name);
  }
  // A client that sends it to the forwarding host gets the same.
  const atB = await request(p.b.port, { path: '/p', headers: { ...headers, 'x-cocoon-peer': 'v1;h=host-a' } });
  assert.equal(atB.status, 401);
  assert.equal(errorCode(atB), 'peer_auth_failed');
  // A WebSocket handshake too.
  const upgrade = await request(p.a.port, {
    path: '/socket',
    headers: { ...headers, connection: 'upgrade', upgrade: 'websocket', 'sec-websocket-version': '13', 'sec-websocket-key': 'dGhlIHNhbXBsZSBub25jZQ==', 'x-cocoon-peer': refusals.tampered! },
  });
  assert.equal(upgrade.status, 401);
  assert.equal(errorCode(upgrade), 'peer_auth_failed');
  assert.equal(p.guestSeen.length, seen, 'none of them reached the guest');
});

test('one hop at most: a forwarded request that finds the microVM elsewhere again answers 503 microvm_moved', async (t) => {
  const p = await twoHosts(t);
  // Host B believes host A runs vm1; a request A forwards to B (validly signed) must not bounce back.
  const header = p.authA.sign('GET', '/', 'host-b', { clientIp: '127.0.0.1', proto: 'http' });
  const r = await request(p.b.port, { path: '/', headers: { host: 'vm1.vm.localhost', 'x-cocoon-token': p.token, 'x-cocoon-peer': header } });
  assert.equal(r.status, 503);
  assert.equal(errorCode(r), 'microvm_moved');
  assert.ok(r.headers['retry-after']);
});

test('an owner that does not answer: 502 peer_unreachable', async (t) => {
  const p = await twoHosts(t);
  await p.a.gateway.close();
  const r = await request(p.b.port, { path: '/', headers: { host: 'vm1.vm.localhost', 'x-cocoon-token': p.token } });
  assert.equal(r.status, 502);
  assert.equal(errorCode(r), 'peer_unreachable');
});

test('a surface request (E2B envd) for a microVM host A runs is answered by host A\'s surface', async (t) => {
  const p = await twoHosts(t);
  const r = await request(p.b.port, { path: '/envd', headers: { host: 'whatever', 'x-test-surface': '1' } });
  assert.equal(r.status, 200);
  assert.equal(r.body, 'surface on a');
  const local = await request(p.a.port, { path: '/envd', headers: { host: 'whatever', 'x-test-surface': '1' } });
  assert.equal(local.body, 'surface on a');
});
