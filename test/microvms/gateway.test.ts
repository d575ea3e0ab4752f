/**
 * The gateway in front of real microVMs: tokens (what is refused never reaches the guest nor
 * wakes it, checked from inside the guest), the browser cookie flow, a WebSocket echo, and
 * 100 MiB streamed each way without the daemon's memory growing.
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import http from 'node:http';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { before, describe, test } from 'node:test';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { WebSocket } from 'ws';
import { createGateway } from '../../src/gateway/gateway.ts';
import { createTokenVerifier } from '../../src/gateway/tokens.ts';
import { microvmDir } from '../../src/lifecycle/paths.ts';
import { listEvents } from '../../src/store/events.ts';
import type { Image } from '../../src/store/images.ts';
import { useTestImageServer } from '../support/fixtures.ts';
import { TESTAPP_PORT } from '../support/image.ts';
import { gatewayRequest, request, type TestServer } from '../support/server.ts';
import { qemuProcessesMentioning } from '../support/vm.ts';

const MiB = 1024 * 1024;
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

describe('the gateway in front of real microVMs', () => {
  const fixture = useTestImageServer();
  const dataDir = fixture.dataDir;
  let s: TestServer;
  let image: Image;
  before(() => ({ server: s, image } = fixture));

  async function start(body: Record<string, unknown> = {}): Promise<{ id: string; token: string }> {
    const answer = await s.api('POST', '/microvms', { image: image.id, idlePolicy: { maxIdleDurationSeconds: 600 }, ...body });
    assert.equal(answer.status, 201, JSON.stringify(answer.body));
    return { id: answer.body.id, token: answer.body.token };
  }

  test('401/403 for missing, malformed, expired, revoked and other-microVM tokens: the guest receives nothing, nothing wakes', async () => {
    const a = await start();
    const b = await start();
    const app = { port: TESTAPP_PORT };
    // Both up: a's app log has what the image build sent and nothing else from us yet.
    assert.equal(await s.get(a.id, a.token, '/count', app), '1');
    assert.equal(await s.get(b.id, b.token, '/count', app), '1');
    const logBefore = await s.get(a.id, a.token, '/log', app);

    const issue = async (body: Record<string, unknown>) => (await s.api('POST', `/microvms/${a.id}/tokens`, body)).body;
    const revoked = await issue({});
    assert.equal((await s.api('DELETE', `/microvms/${a.id}/tokens/${revoked.id}`)).status, 204);
    const expired = await issue({ expirationMinutes: 1 });
    await s.server.db.run('UPDATE tokens SET expires_at = ? WHERE id = ?', [new Date(Date.now() - 1000).toISOString(), expired.id]);
    const only9999 = await issue({ allowedPorts: [9999] });
    assert.deepEqual(only9999.allowedPorts, [9999]);

    const suspended = await s.api('POST', `/microvms/${a.id}/suspend`);
    assert.equal(suspended.body.state, 'SUSPENDED');
    const cases: Array<[string, string | undefined, number, string]> = [
      ['missing', undefined, 401, 'token_missing'],
      ['malformed', 'hello', 401, 'token_malformed'],
      ['unknown', a.token.slice(0, -8) + 'AAAAAAAA', 401, 'token_invalid'],
      ['expired', expired.token, 401, 'token_expired'],
      ['revoked', revoked.token, 401, 'token_revoked'],
      ['other microVM', b.token, 403, 'token_wrong_microvm'],
      ['port not allowed', only9999.token, 403, 'port_not_allowed'],
    ];
    for (const [name, token, status, code] of cases) {
      for (const [route, port] of [['/count', TESTAPP_PORT], ['/cgi-bin/count', undefined]] as const) {
        const answer = await gatewayRequest(s.gatewayPort, a.id, token, route, port ? { port } : {});
        assert.equal(answer.status, status, `${name} ${route}: ${answer.body}`);
        assert.equal(JSON.parse(answer.body).error.code, code, name);
      }
    }
    // Nothing woke it: still SUSPENDED, no QEMU, no resume.
    assert.equal((await s.api('GET', `/microvms/${a.id}`)).body.state, 'SUSPENDED');
    assert.deepEqual(qemuProcessesMentioning(microvmDir(dataDir, a.id)), []);
    const events = await listEvents(s.server.db, { resourceType: 'microvm', resourceId: a.id, limit: 1000 });
    assert.equal(events.filter((e) => e.toState === 'RESUMING').length, 0, 'no request without a valid token woke the microVM');

    // From inside the guest: the refused requests never arrived; the valid one carries no token.
    assert.equal(await s.get(a.id, a.token, '/count', app), '2', 'the in-guest counter saw only valid requests');
    assert.equal(await s.get(a.id, a.token, '/cgi-bin/count'), '1');
    const logAfter = await s.get(a.id, a.token, '/log', app);
    const newLines = logAfter.slice(logBefore.length).trim().split('\n');
    assert.deepEqual(newLines, ['GET /count -', 'GET /log -'], 'the guest saw only the two valid requests, without X-Cocoon-* headers');
    const headers = await s.get(a.id, a.token, '/headers', app);
    assert.doesNotMatch(headers, /x-cocoon-/i, 'the token header never reaches the guest');
    assert.ok(!headers.includes(a.token.slice(37)), 'nor the secret anywhere');
    assert.match(headers, /^x-forwarded-for: /im);

    for (const id of [a.id, b.id]) assert.equal((await s.api('DELETE', `/microvms/${id}`)).status, 204);
  });

  test('browser flow: ?cocoon_token= once, then the HttpOnly cookie; the guest never sees either', async () => {
    const { id, token } = await start();
    const login = await request(s.gatewayPort, { path: `/count?a=1&cocoon_token=${token}`, headers: { host: `${id}.vm.localhost`, 'x-cocoon-port': String(TESTAPP_PORT) } });
    assert.equal(login.status, 303);
    assert.equal(login.headers.location, '/count?a=1');
    const cookie = String(login.headers['set-cookie']).split(';')[0]!;
    assert.match(cookie, /^cocoon_token=cocoon_tk_/);
    const headers = { host: `${id}.vm.localhost`, cookie: `${cookie}; theme=dark`, 'x-cocoon-port': String(TESTAPP_PORT) };
    const seen = await request(s.gatewayPort, { path: '/headers', headers });
    assert.equal(seen.status, 200);
    assert.match(seen.body, /^cookie: theme=dark\r?$/im, 'other cookies pass, the token cookie does not');
    assert.ok(!seen.body.includes(token.slice(37)));
    assert.equal((await s.api('DELETE', `/microvms/${id}`)).status, 204);
  });

  test('WebSocket echo through the gateway, waking a SUSPENDED microVM; an open WebSocket keeps it awake', async () => {
    const { id, token } = await start({ idlePolicy: { maxIdleDurationSeconds: 1 } });
    assert.equal(await s.get(id, token, '/'), 'hello from cocoon');
    assert.equal((await s.api('POST', `/microvms/${id}/suspend`)).body.state, 'SUSPENDED');

    const ws = new WebSocket(`ws://127.0.0.1:${s.gatewayPort}/ws`, {
      headers: { host: `${id}.vm.localhost`, 'x-cocoon-token': token, 'x-cocoon-port': String(TESTAPP_PORT) },
    });
    ws.on('error', () => undefined);
    try {
      await once(ws, 'open');
      for (const message of ['hello', 'x'.repeat(100_000)]) {
        ws.send(message);
        const [data, binary] = (await once(ws, 'message')) as [Buffer, boolean];
        assert.equal(binary, false);
        assert.equal(data.toString(), message);
      }
      ws.send(Buffer.from([1, 2, 3]));
      const [bin] = (await once(ws, 'message')) as [Buffer];
      assert.deepEqual([...bin], [1, 2, 3]);
      // Longer than maxIdleDurationSeconds with the WebSocket open: still RUNNING.
      await sleep(2500);
      assert.equal((await s.api('GET', `/microvms/${id}`)).body.state, 'RUNNING');
      ws.send('still there');
      assert.equal(String(((await once(ws, 'message')) as [Buffer])[0]), 'still there');
    } finally {
      ws.close();
    }
    await once(ws, 'close');
    // Closed: idle from now on, suspended after a second.
    const deadline = Date.now() + 30_000;
    while ((await s.api('GET', `/microvms/${id}`)).body.state !== 'SUSPENDED') {
      assert.ok(Date.now() < deadline, 'suspended once the WebSocket closed');
      await sleep(100);
    }
    assert.equal((await s.api('DELETE', `/microvms/${id}`)).status, 204);
  });

  test('a wake that cannot finish within its bound answers 503 with Retry-After; the resume goes on and the retry is answered', async (t) => {
    const { id, token } = await start();
    assert.equal(await s.get(id, token, '/'), 'hello from cocoon');
    assert.equal((await s.api('POST', `/microvms/${id}/suspend`)).body.state, 'SUSPENDED');
    // A second gateway on the same lifecycle, with a wake bound no restore can meet.
    const impatient = createGateway({ directory: s.module.engine, tokens: createTokenVerifier(s.server.db), wakeTimeoutMs: 1, retryAfterSeconds: 1 });
    const { port } = await impatient.listen(0);
    t.after(() => impatient.close());
    const answer = await gatewayRequest(port, id, token, '/');
    assert.equal(answer.status, 503);
    assert.equal(JSON.parse(answer.body).error.code, 'wake_timeout');
    assert.equal(answer.headers['retry-after'], '1');
    const deadline = Date.now() + 30_000;
    while ((await s.api('GET', `/microvms/${id}`)).body.state !== 'RUNNING') {
      assert.ok(Date.now() < deadline, 'the resume went on');
      await sleep(50);
    }
    assert.equal((await gatewayRequest(port, id, token, '/')).status, 200, 'the retry is answered');
    assert.equal((await s.api('DELETE', `/microvms/${id}`)).status, 204);
  });

  test('100 MiB upload and download streamed through the gateway, memory growing by a few MiB at most', async (t) => {
    const { id, token } = await start();
    assert.equal(await s.get(id, token, '/'), 'hello from cocoon');
    const headers = { host: `${id}.vm.localhost`, 'x-cocoon-token': token, 'x-cocoon-port': String(TESTAPP_PORT) };
    const upload = (total: number) =>
      new Promise<string>((resolve, reject) => {
        const req = http.request({ host: '127.0.0.1', port: s.gatewayPort, method: 'POST', path: '/upload', headers: { ...headers, 'content-length': String(total) }, agent: false }, (res) => {
          let body = '';
          res.setEncoding('utf8');
          res.on('data', (c: string) => (body += c));
          res.on('end', () => (res.statusCode === 200 ? resolve(body.trim()) : reject(new Error(`upload: ${res.statusCode} ${body}`))));
        });
        req.on('error', reject);
        pipeline(source(total), req).catch(reject);
      });
    const download = (total: number) =>
      new Promise<number>((resolve, reject) => {
        const req = http.request({ host: '127.0.0.1', port: s.gatewayPort, path: `/download?bytes=${total}`, headers, agent: false }, (res) => {
          let bytes = 0;
          let ok = true;
          res.on('data', (c: Buffer) => {
            for (let i = 0; i < c.length; i += 4099) if (c[i] !== (bytes + i) % 251) ok = false;
            bytes += c.length;
          });
          res.on('end', () => (ok && res.statusCode === 200 ? resolve(bytes) : reject(new Error(`download: ${res.statusCode}, content ok ${ok}`))));
          res.on('error', reject);
        });
        req.on('error', reject);
        req.end();
      });

    // Warm-up (allocator, pools), then measure.
    assert.match(await upload(8 * MiB), /^8388608 [0-9a-f]{16}$/);
    assert.equal(await download(8 * MiB), 8 * MiB);
    const sampler = memorySampler();
    const [uploaded, downloaded] = [await upload(100 * MiB), await download(100 * MiB)];
    const growth = sampler.stop();
    t.diagnostic(`server RSS growth while streaming 2 × 100 MiB: ${(growth.rss / MiB).toFixed(1)} MiB`);
    assert.match(uploaded, new RegExp(`^${100 * MiB} ${expectedFnv(100 * MiB)}$`), 'the guest received all 100 MiB, in order');
    assert.equal(downloaded, 100 * MiB);
    assert.ok(growth.rss <= 16 * MiB, `RSS grew by ${(growth.rss / MiB).toFixed(1)} MiB while moving 200 MiB`);
    assert.equal((await s.api('DELETE', `/microvms/${id}`)).status, 204);
  });
});

// ---- streaming helpers ----------------------------------------------------------------------------

const CHUNK = 64 * 1024;
const PATTERN = Buffer.from(Array.from({ length: CHUNK }, (_, i) => (i * 31) & 0xff));

/** `total` bytes made of one reused 64 KiB chunk (the source itself costs no memory). */
function source(total: number): Readable {
  let sent = 0;
  return new Readable({
    read() {
      if (sent >= total) return void this.push(null);
      const n = Math.min(CHUNK, total - sent);
      sent += n;
      this.push(n === CHUNK ? PATTERN : PATTERN.subarray(0, n));
    },
  });
}

/** FNV-1a 64 of `total` bytes of the source (what the test app answers), in 32-bit halves. */
function expectedFnv(total: number): string {
  let hi = 0xcbf29ce4;
  let lo = 0x84222325;
  for (let sent = 0; sent < total; sent += CHUNK) {
    const n = Math.min(CHUNK, total - sent);
    for (let i = 0; i < n; i++) {
      lo = (lo ^ PATTERN[i]!) >>> 0;
      // (hi:lo) * (2^40 + 0x1b3) mod 2^64
      const low = lo * 0x1b3;
      const carry = Math.floor(low / 4294967296);
      hi = (Math.imul(hi, 0x1b3) + carry + (lo << 8)) >>> 0;
      lo = low >>> 0;
    }
  }
  return hi.toString(16).padStart(8, '0') + lo.toString(16).padStart(8, '0');
}

setFlagsFromString('--expose-gc');
const gc = runInNewContext('gc') as () => void;

/**
 * Peak RSS growth of this process (the whole server: API, lifecycle, gateway). A full GC runs
 * before each sample: every socket read allocates a Buffer that V8 frees lazily, so without it
 * the RSS shows garbage awaiting collection rather than memory something holds (see
 * test/gateway/gateway-stream.test.ts).
 */
function memorySampler(): { stop(): { rss: number } } {
  gc();
  const base = process.memoryUsage().rss;
  let peak = base;
  const timer = setInterval(() => {
    gc();
    peak = Math.max(peak, process.memoryUsage().rss);
  }, 50);
  return {
    stop() {
      clearInterval(timer);
      gc();
      peak = Math.max(peak, process.memoryUsage().rss);
      return { rss: peak - base };
    },
  };
}
