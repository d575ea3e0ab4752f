import assert from 'node:assert/strict';
import { test } from 'node:test';
import { CocoonError } from '../../src/common/errors.ts';
import { errorCode, request, sleep, startGateway, startGuest } from './helpers.ts';

test('20 concurrent requests to a suspended microVM cause exactly one wake and 20 correct answers', async (t) => {
  const guest = await startGuest(t);
  const f = await startGateway(t);
  f.directory.wakeDelayMs = 300;
  f.directory.add({ id: 'sleepy', state: 'SUSPENDED', ports: new Map([[8080, guest.port]]) });
  const { token } = await f.token('sleepy');

  const started = Date.now();
  const answers = await Promise.all(
    Array.from({ length: 20 }, (_, i) =>
      request(f.port, { path: `/r/${i}`, headers: { host: 'sleepy.vm.localhost', 'x-cocoon-token': token } }),
    ),
  );
  assert.ok(Date.now() - started >= 290, 'the answers waited for the wake');
  assert.equal(f.directory.ensureRunningCalls, 1, 'one wake for 20 requests');
  answers.forEach((a, i) => {
    assert.equal(a.status, 200, a.body);
    assert.equal((JSON.parse(a.body) as { url: string }).url, `/r/${i}`);
  });
  assert.equal(guest.received.length, 20);
  assert.equal(f.directory.started, 20);
  assert.equal(f.directory.finished, 20);

  // Once RUNNING, no more wakes.
  const again = await request(f.port, { headers: { host: 'sleepy.vm.localhost', 'x-cocoon-token': token } });
  assert.equal(again.status, 200);
  assert.equal(f.directory.ensureRunningCalls, 1);
});

test('a wake longer than the bound answers 503 with Retry-After; the wake goes on and a retry succeeds', async (t) => {
  const guest = await startGuest(t);
  const f = await startGateway(t, { wakeTimeoutMs: 150, retryAfterSeconds: 3 });
  f.directory.wakeDelayMs = 600;
  f.directory.add({ id: 'slow', state: 'SUSPENDED', ports: new Map([[8080, guest.port]]) });
  const { token } = await f.token('slow');
  const headers = { host: 'slow.vm.localhost', 'x-cocoon-token': token };

  const a = await request(f.port, { headers });
  assert.equal(a.status, 503);
  assert.equal(errorCode(a), 'wake_timeout');
  assert.equal(a.headers['retry-after'], '3');
  assert.equal(guest.received.length, 0);
  assert.equal(f.gateway.stats().pendingWakes, 1, 'the wake was not cancelled');

  const b = await request(f.port, { headers });
  assert.equal(b.status, 503, 'still waking');
  assert.equal(f.directory.ensureRunningCalls, 1, 'the retry joined the pending wake');

  await sleep(500);
  const c = await request(f.port, { headers });
  assert.equal(c.status, 200, c.body);
  assert.equal(f.directory.ensureRunningCalls, 1);
  assert.equal(f.directory.started, f.directory.finished);
});

test('a failed wake: CocoonError keeps its status and code, anything else is 502; the next request tries again', async (t) => {
  const guest = await startGuest(t);
  const f = await startGateway(t);
  f.directory.add({ id: 'vm1', state: 'SUSPENDED', ports: new Map([[8080, guest.port]]) });
  const { token } = await f.token('vm1');
  const headers = { host: 'vm1.vm.localhost', 'x-cocoon-token': token };

  f.directory.wakeError = new CocoonError('microvm_terminated', 'terminated while waking', { status: 410 });
  const a = await request(f.port, { headers });
  assert.equal(a.status, 410);
  assert.equal(errorCode(a), 'microvm_terminated');

  f.directory.wakeError = new Error('qemu exploded');
  const b = await request(f.port, { headers });
  assert.equal(b.status, 502);
  assert.equal(errorCode(b), 'wake_failed');
  assert.ok(!b.body.includes('qemu'), 'internal error text stays in the log');

  f.directory.wakeError = undefined;
  const c = await request(f.port, { headers });
  assert.equal(c.status, 200);
  assert.equal(f.directory.ensureRunningCalls, 3);
});

test('a client that leaves while its microVM wakes is released; the wake completes', async (t) => {
  const guest = await startGuest(t);
  const f = await startGateway(t);
  f.directory.wakeDelayMs = 300;
  f.directory.add({ id: 'vm1', state: 'SUSPENDED', ports: new Map([[8080, guest.port]]) });
  const { token } = await f.token('vm1');
  const ac = new AbortController();
  const http = await import('node:http');
  const req = http.request({ host: '127.0.0.1', port: f.port, headers: { host: 'vm1.vm.localhost', 'x-cocoon-token': token }, signal: ac.signal, agent: false });
  req.on('error', () => {});
  req.end();
  await sleep(50);
  ac.abort();
  await sleep(50);
  assert.equal(f.gateway.stats().inFlight, 0, 'the abandoned request no longer counts');
  assert.equal(f.directory.finished, 1);
  await sleep(400);
  assert.equal(guest.received.length, 0, 'nothing was proxied for the departed client');
  assert.equal(f.directory.vms.get('vm1')!.state, 'RUNNING');
});
