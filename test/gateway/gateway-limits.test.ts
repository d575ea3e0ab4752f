import assert from 'node:assert/strict';
import http from 'node:http';
import net from 'node:net';
import { test } from 'node:test';
import { errorCode, rawExchange, request, sleep, startGateway, startGuest } from './helpers.ts';

/** Connects, runs `drive` on the socket, answers what came back and when the server closed. */
function slowClient(port: number, drive: (s: net.Socket) => void, giveUpMs = 5000): Promise<{ data: string; closedAfterMs: number }> {
  return new Promise((resolve, reject) => {
    const started = Date.now();
    const s = net.connect(port, '127.0.0.1');
    const chunks: Buffer[] = [];
    const timer = setTimeout(() => {
      s.destroy();
      reject(new Error('the gateway never cut the slow client off'));
    }, giveUpMs);
    s.on('data', (c: Buffer) => chunks.push(c));
    s.on('error', () => {});
    s.on('close', () => {
      clearTimeout(timer);
      resolve({ data: Buffer.concat(chunks).toString('utf8'), closedAfterMs: Date.now() - started });
    });
    s.on('connect', () => drive(s));
  });
}

test('a client that sends its headers too slowly is cut off (slowloris)', async (t) => {
  const guest = await startGuest(t);
  const f = await startGateway(t, { headersTimeoutMs: 400 });
  f.directory.add({ id: 'vm1', ports: new Map([[8080, guest.port]]) });
  let ticker: NodeJS.Timeout | undefined;
  t.after(() => clearInterval(ticker));
  const r = await slowClient(f.port, (s) => {
    s.write('GET / HTTP/1.1\r\nHost: vm1.vm.localhost\r\n');
    ticker = setInterval(() => {
      if (!s.destroyed) s.write('X-Drip: 1\r\n');
    }, 50);
  });
  clearInterval(ticker);
  assert.ok(r.closedAfterMs >= 350 && r.closedAfterMs < 2000, `closed after ${r.closedAfterMs} ms`);
  assert.match(r.data, /^HTTP\/1.1 408 /);
  assert.equal(guest.received.length, 0);
});

test('a client that stalls while sending its body is cut off with 408', async (t) => {
  const guest = await startGuest(t);
  const f = await startGateway(t, { bodyIdleTimeoutMs: 300 });
  f.directory.add({ id: 'vm1', ports: new Map([[8080, guest.port]]) });
  const { token } = await f.token('vm1');
  const r = await slowClient(f.port, (s) => {
    s.write(`POST /upload HTTP/1.1\r\nHost: vm1.vm.localhost\r\nX-Cocoon-Token: ${token}\r\nContent-Length: 100000\r\n\r\n`);
    s.write('x'.repeat(1000));
  });
  assert.ok(r.closedAfterMs >= 250 && r.closedAfterMs < 2000, `closed after ${r.closedAfterMs} ms`);
  assert.match(r.data, /^HTTP\/1.1 408 /);
  assert.match(r.data, /request_body_timeout/);
  await sleep(50);
  assert.equal(f.directory.started, f.directory.finished);
});

test('a slow but steady body is not cut off, nor is a slow guest', async (t) => {
  const guest = await startGuest(t, (req, res) => {
    req.resume();
    req.on('end', () => setTimeout(() => res.end('done'), 400));
  });
  const f = await startGateway(t, { bodyIdleTimeoutMs: 300 });
  f.directory.add({ id: 'vm1', ports: new Map([[8080, guest.port]]) });
  const { token } = await f.token('vm1');
  const answer = await new Promise<number>((resolve, reject) => {
    const req = http.request({ host: '127.0.0.1', port: f.port, method: 'POST', agent: false, headers: { host: 'vm1.vm.localhost', 'x-cocoon-token': token } }, (res) => {
      res.resume();
      resolve(res.statusCode ?? 0);
    });
    req.on('error', reject);
    let n = 0;
    const tick = setInterval(() => {
      req.write('y'.repeat(100));
      if (++n === 8) {
        clearInterval(tick);
        req.end();
      }
    }, 100);
  });
  assert.equal(answer, 200);
});

test('request body limit: Content-Length over the limit → 413 at once; a chunked body over it → 413', async (t) => {
  const guest = await startGuest(t);
  const f = await startGateway(t, { maxBodyBytes: 1024 * 1024 });
  f.directory.add({ id: 'vm1', ports: new Map([[8080, guest.port]]) });
  const { token } = await f.token('vm1');
  const headers = { host: 'vm1.vm.localhost', 'x-cocoon-token': token };

  const declared = await rawExchange(f.port, `POST / HTTP/1.1\r\nHost: vm1.vm.localhost\r\nX-Cocoon-Token: ${token}\r\nContent-Length: 2000000\r\n\r\n`);
  assert.match(declared, /^HTTP\/1.1 413 /);
  assert.match(declared, /request_body_too_large/);
  assert.equal(guest.received.length, 0, 'a declared oversize body never reaches the guest');

  const chunked = await new Promise<{ status: number; body: string } | 'reset'>((resolve) => {
    const req = http.request({ host: '127.0.0.1', port: f.port, method: 'POST', agent: false, headers }, (res) => {
      let body = '';
      res.on('data', (c: Buffer) => (body += c.toString()));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
    });
    req.on('error', () => resolve('reset'));
    const chunk = Buffer.alloc(64 * 1024);
    let sent = 0;
    const pump = (): void => {
      while (sent < 2 * 1024 * 1024) {
        sent += chunk.length;
        if (!req.write(chunk)) return void req.once('drain', pump);
      }
      req.end();
    };
    pump();
  });
  assert.notEqual(chunked, 'reset', 'the client got an answer');
  if (chunked !== 'reset') {
    assert.equal(chunked.status, 413);
    assert.match(chunked.body, /request_body_too_large/);
  }
  await sleep(50);
  assert.ok((guest.received[0]?.bodyBytes ?? 0) <= 1024 * 1024, 'the guest got at most the limit');
});

test('request head larger than maxHeaderBytes → 431', async (t) => {
  const f = await startGateway(t, { maxHeaderBytes: 4096 });
  const r = await rawExchange(f.port, `GET / HTTP/1.1\r\nHost: vm1.vm.localhost\r\nX-Big: ${'a'.repeat(8000)}\r\n\r\n`);
  assert.match(r, /^HTTP\/1.1 431 /);
});

test('in-flight requests per microVM are bounded: beyond → 503 with Retry-After', async (t) => {
  const release: Array<() => void> = [];
  const guest = await startGuest(t, (_req, res) => release.push(() => res.end('ok')));
  const f = await startGateway(t, { maxInFlightPerMicroVM: 2 });
  f.directory.add({ id: 'vm1', ports: new Map([[8080, guest.port]]) });
  const { token } = await f.token('vm1');
  const headers = { host: 'vm1.vm.localhost', 'x-cocoon-token': token };
  const first = [request(f.port, { headers }), request(f.port, { headers })];
  while (release.length < 2) await sleep(10);
  const third = await request(f.port, { headers });
  assert.equal(third.status, 503);
  assert.equal(errorCode(third), 'microvm_busy');
  assert.ok(third.headers['retry-after']);
  for (const r of release) r();
  for (const a of await Promise.all(first)) assert.equal(a.status, 200);
  assert.equal(f.gateway.stats().inFlight, 0);
  const after = request(f.port, { headers });
  while (release.length < 3) await sleep(10);
  release[2]!();
  assert.equal((await after).status, 200);
});

test('a guest that does not answer in time → 504; a guest that dies mid-response → connection reset', async (t) => {
  const guest = await startGuest(t, (req, res) => {
    if (req.url === '/hang') return; // never answers
    res.writeHead(200, { 'content-length': '1000' });
    res.write('partial');
    setTimeout(() => res.destroy(), 20);
  });
  const f = await startGateway(t, { upstreamHeadersTimeoutMs: 200 });
  f.directory.add({ id: 'vm1', ports: new Map([[8080, guest.port]]) });
  const { token } = await f.token('vm1');
  const headers = { host: 'vm1.vm.localhost', 'x-cocoon-token': token };
  const slow = await request(f.port, { path: '/hang', headers });
  assert.equal(slow.status, 504);
  assert.equal(errorCode(slow), 'upstream_timeout');
  await assert.rejects(request(f.port, { path: '/die', headers }), 'the client sees the truncation, not a clean end');
});

test('upstream connections are kept alive and reused', async (t) => {
  for (const upstreamClient of ['adaptive', 'undici', 'node'] as const) {
    let connections = 0;
    const guest = await startGuest(t);
    guest.server.on('connection', () => connections++);
    const f = await startGateway(t, { upstreamClient });
    f.directory.add({ id: 'vm1', ports: new Map([[8080, guest.port]]) });
    const { token } = await f.token('vm1');
    for (let i = 0; i < 20; i++) {
      const a = await request(f.port, { headers: { host: 'vm1.vm.localhost', 'x-cocoon-token': token } });
      assert.equal(a.status, 200);
    }
    assert.equal(connections, 1, `${upstreamClient}: 20 sequential requests used one upstream connection`);
  }
});

test('Expect: 100-continue is answered only after the token check', async (t) => {
  const guest = await startGuest(t);
  const f = await startGateway(t);
  f.directory.add({ id: 'vm1', ports: new Map([[8080, guest.port]]) });
  const { token } = await f.token('vm1');
  const refused = await rawExchange(f.port, 'PUT / HTTP/1.1\r\nHost: vm1.vm.localhost\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n');
  assert.match(refused, /^HTTP\/1.1 401 /, 'no 100 Continue for a request without a token');
  assert.match(refused, /connection: close/i);

  const answer = await new Promise<{ continued: boolean; status: number; body: string }>((resolve, reject) => {
    let continued = false;
    const req = http.request({ host: '127.0.0.1', port: f.port, method: 'PUT', agent: false, headers: { host: 'vm1.vm.localhost', 'x-cocoon-token': token, expect: '100-continue', 'content-length': '5' } }, (res) => {
      let body = '';
      res.on('data', (c: Buffer) => (body += c.toString()));
      res.on('end', () => resolve({ continued, status: res.statusCode ?? 0, body }));
    });
    req.on('continue', () => {
      continued = true;
      req.end('hello');
    });
    req.on('error', reject);
  });
  assert.ok(answer.continued);
  assert.equal(answer.status, 200);
  assert.equal(JSON.parse(answer.body).bodyBytes, 5);
  assert.equal(guest.received[0]!.headers.expect, undefined, 'Expect is hop-by-hop here: the gateway handled it');
});
