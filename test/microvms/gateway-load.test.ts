/**
 * The gateway under load in front of apps that close every connection (issue 12): 32
 * concurrent clients for 20 s through the gateway to a microVM's busybox httpd (a static file,
 * `Connection: close` on every answer), then to another microVM's HTTP/1.0 app (a CGI script
 * that writes an `HTTP/1.0 200 OK` status line itself, no Content-Length, the body ended by the
 * close). Every
 * request must be answered by the guest (200 and the guest's own body), none with a 5xx, none
 * timing out. QEMU's forwarded ports accept with a backlog of 1; a gateway that opened guest
 * connections one at a time, or all at once, failed this with 502s and stalls of tens of seconds.
 *
 * Counts are asserted, never how fast: the test passes on a slow machine too.
 */
import assert from 'node:assert/strict';
import net from 'node:net';
import { before, describe, test } from 'node:test';
import { Client, errors as undiciErrors } from 'undici';
import { getMicrovm } from '../../src/store/microvms.ts';
import type { Image } from '../../src/store/images.ts';
import { useTestImageServer } from '../support/fixtures.ts';
import { APP_PORT } from '../support/image.ts';
import type { TestServer } from '../support/server.ts';

const CLIENTS = 32;
const SECONDS = 20;

interface Tally {
  ok: number;
  /** Answers that were not 200 with the guest's body, by "status body-prefix". */
  wrong: Map<string, number>;
  timeouts: number;
  /** Other client errors (resets, refused), by code. */
  errors: Map<string, number>;
}

const bump = (m: Map<string, number>, key: string) => m.set(key, (m.get(key) ?? 0) + 1);

/**
 * `CLIENTS` clients, each its own keep-alive connection to the gateway, sending GET `route` one
 * after another for `SECONDS`. A request not answered within 60 s counts as a timeout (the
 * gateway's own upstream connect timeout is 5 s: a stalled guest connect shows up as a 502 well
 * before that).
 */
async function load(gatewayPort: number, id: string, token: string, route: string, expect: (body: string) => boolean): Promise<Tally> {
  const tally: Tally = { ok: 0, wrong: new Map(), timeouts: 0, errors: new Map() };
  const until = Date.now() + SECONDS * 1000;
  const headers = { host: `${id}.vm.localhost`, 'x-cocoon-token': token, 'x-cocoon-port': String(APP_PORT) };
  const client = async () => {
    const c = new Client(`http://127.0.0.1:${gatewayPort}`, { headersTimeout: 60_000, bodyTimeout: 60_000 });
    try {
      while (Date.now() < until) {
        try {
          const answer = await c.request({ method: 'GET', path: route, headers });
          const body = await answer.body.text();
          if (answer.statusCode === 200 && expect(body)) tally.ok++;
          else bump(tally.wrong, `${answer.statusCode} ${body.slice(0, 80)}`);
        } catch (error) {
          if (error instanceof undiciErrors.HeadersTimeoutError || error instanceof undiciErrors.BodyTimeoutError) tally.timeouts++;
          else bump(tally.errors, String((error as { code?: unknown }).code ?? (error as Error).message));
        }
      }
    } finally {
      await c.close();
    }
  };
  await Promise.all(Array.from({ length: CLIENTS }, client));
  return tally;
}

/** What the guest app itself answers, straight to its forwarded port, up to its close. */
async function rawAnswer(port: number, route: string): Promise<string> {
  return await new Promise((resolve, reject) => {
    const s = net.connect(port, '127.0.0.1', () => s.write(`GET ${route} HTTP/1.1\r\nHost: guest\r\n\r\n`));
    let got = '';
    s.setTimeout(60_000, () => s.destroy(new Error('no answer')));
    s.on('data', (c: Buffer) => (got += c.toString('latin1')));
    s.on('end', () => resolve(got));
    s.on('error', reject);
  });
}

describe('the gateway with 32 clients for 20 s against apps that close every connection', () => {
  const fixture = useTestImageServer({ image: { idle: true } });
  let s: TestServer;
  let image: Image;
  before(() => ({ server: s, image } = fixture));

  async function start(): Promise<{ id: string; token: string; hostPort: number }> {
    const answer = await s.api('POST', '/microvms', { image: image.id, idlePolicy: { maxIdleDurationSeconds: 600 } });
    assert.equal(answer.status, 201, JSON.stringify(answer.body));
    const { id, token } = answer.body as { id: string; token: string };
    assert.equal(await s.get(id, token, '/'), 'hello from cocoon');
    const ports = (await getMicrovm(s.server.db, id))?.runtime.ports as Record<string, number> | undefined;
    const hostPort = ports?.[String(APP_PORT)];
    assert.ok(hostPort, `a forwarded port for ${id}`);
    return { id, token, hostPort };
  }

  function assertAllAnswered(t: Tally, what: string, diagnostic: (m: string) => void): void {
    const report = JSON.stringify({ ok: t.ok, wrong: [...t.wrong], timeouts: t.timeouts, errors: [...t.errors] });
    diagnostic(`${what}: ${report}`);
    assert.deepEqual([...t.wrong], [], `${what}: every answer is the guest's 200 (${report})`);
    assert.equal(t.timeouts, 0, `${what}: no request timed out (${report})`);
    assert.deepEqual([...t.errors], [], `${what}: no connection to the gateway failed (${report})`);
    // Each client completes at least one request; a gateway that stalled for the whole run fails here.
    assert.ok(t.ok >= CLIENTS, `${what}: requests answered (${report})`);
  }

  test('busybox httpd (Connection: close on every answer): every request answered by the guest', async (ctx) => {
    const vm = await start();
    // The guest's own answer closes the connection: what makes the gateway open one per request.
    const direct = await rawAnswer(vm.hostPort, '/');
    assert.match(direct, /^HTTP\/1\.[01] 200 /);
    assert.match(direct, /^connection: close\r$/im);
    const t = await load(s.gatewayPort, vm.id, vm.token, '/', (body) => body === 'hello from cocoon\n');
    assertAllAnswered(t, 'busybox httpd', (m) => ctx.diagnostic(m));
    assert.equal((await s.api('DELETE', `/microvms/${vm.id}`)).status, 204);
  });

  test('an HTTP/1.0 app (no Content-Length, body ended by the close): every request answered by the guest', async (ctx) => {
    const vm = await start();
    const direct = await rawAnswer(vm.hostPort, '/cgi-bin/http10');
    assert.equal(direct.split('\r\n')[0], 'HTTP/1.0 200 OK', 'the guest app answers in HTTP/1.0');
    assert.doesNotMatch(direct, /content-length/i, 'its body ends with the close');
    const t = await load(s.gatewayPort, vm.id, vm.token, '/cgi-bin/http10', (body) => body === 'hello over HTTP/1.0\n');
    assertAllAnswered(t, 'HTTP/1.0 app', (m) => ctx.diagnostic(m));
    assert.equal((await s.api('DELETE', `/microvms/${vm.id}`)).status, 204);
  });

  test('a forwarded port queues many connections while QEMU accepts none (cocoon-listen.so, not backlog 1)', async () => {
    const vm = await start();
    const pid = (await getMicrovm(s.server.db, vm.id))?.runtime.pid;
    assert.ok(typeof pid === 'number' && pid > 0, 'the microVM has a QEMU process');
    // A stopped QEMU accepts nothing: only the kernel's accept queue (backlog + 1) completes handshakes.
    const sockets: net.Socket[] = [];
    process.kill(pid, 'SIGSTOP');
    try {
      const connected = await new Promise<number>((resolve) => {
        let n = 0;
        const give = setTimeout(() => resolve(n), 5_000); // with backlog 1, 2 connect and the rest wait for retransmissions
        for (let i = 0; i < 16; i++) {
          const c = net.connect(vm.hostPort, '127.0.0.1');
          c.on('error', () => {});
          c.once('connect', () => {
            c.write('GET / HTTP/1.0\r\nHost: guest\r\n\r\n');
            if (++n === 16) {
              clearTimeout(give);
              resolve(n);
            }
          });
          sockets.push(c);
        }
      });
      assert.equal(connected, 16, 'all 16 connects completed while QEMU accepted none');
    } finally {
      process.kill(pid, 'SIGCONT');
      // The queued connections carry requests, and QEMU, continued, works them off before the
      // gateway's request below. Destroyed unanswered instead, they left that request waiting
      // 1.5–6 s, and about once in a dozen rounds for good (busybox's 408 after 60 s), the same
      // before issue 12's gateway work: libslirp forwarding a burst of dead connections to the
      // guest (docs/gateway.md). Not what this test is about, so it is not asserted here.
      await Promise.all(
        sockets.map(
          (c) =>
            new Promise<void>((resolve) => {
              if (c.destroyed) return resolve();
              c.once('close', () => resolve());
              c.resume();
              c.setTimeout(15_000, () => c.destroy());
            }),
        ),
      );
      for (const c of sockets) c.destroy();
    }
    assert.equal(await s.get(vm.id, vm.token, '/'), 'hello from cocoon');
    assert.equal((await s.api('DELETE', `/microvms/${vm.id}`)).status, 204);
  });
});
