/**
 * The microVM lifecycle with real QEMU, a real server and real HTTP through the real gateway:
 * start, idle suspend, wake on request with memory, processes and files intact, one resume for
 * many requests, explicit suspend/resume, hooks, session end and suspended-duration end.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { before, describe, test } from 'node:test';
import { readSnapshotManifest } from '../../src/vmm/snapshot.ts';
import { microvmDir } from '../../src/lifecycle/paths.ts';
import { listEvents } from '../../src/store/events.ts';
import type { Image } from '../../src/store/images.ts';
import { useTestImageServer } from '../support/fixtures.ts';
import { TESTAPP_PORT } from '../support/image.ts';
import { gatewayRequest, type TestServer } from '../support/server.ts';
import { qemuProcessesMentioning } from '../support/vm.ts';

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

function parseBackground(answer: string): { pid: number; ticks: number } {
  const match = /^running (\d+) (\d+)$/.exec(answer);
  assert.ok(match, `the background loop is not running: ${answer}`);
  return { pid: Number(match[1]), ticks: Number(match[2]) };
}

describe('microVM lifecycle through the gateway', () => {
  const fixture = useTestImageServer({
    image: {
      hooks: {
        run: { command: 'echo run >> /tmp/hooks.log', timeoutSeconds: 10 },
        suspend: { command: 'echo suspending >> /tmp/hooks.log', timeoutSeconds: 10 },
        resume: { command: 'echo "resumed $(date +%s)" >> /tmp/hooks.log', timeoutSeconds: 10 },
      },
    },
  });
  const dataDir = fixture.dataDir;
  let s: TestServer;
  let image: Image;
  before(() => ({ server: s, image } = fixture));

  async function start(body: Record<string, unknown> = {}): Promise<{ id: string; token: string; body: Record<string, unknown> }> {
    const answer = await s.api('POST', '/microvms', { image: image.arn, ...body });
    assert.equal(answer.status, 201, JSON.stringify(answer.body));
    return { id: answer.body.id, token: answer.body.token, body: answer.body };
  }

  async function waitForState(id: string, state: string, timeoutMs = 60_000): Promise<Record<string, unknown>> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const answer = await s.api('GET', `/microvms/${id}`);
      if (answer.body?.state === state) return answer.body;
      if (Date.now() > deadline) throw new Error(`microVM ${id} is ${answer.body?.state}, not ${state}, after ${timeoutMs} ms`);
      await sleep(100);
    }
  }

  async function resumeCount(id: string): Promise<number> {
    const events = await listEvents(s.server.db, { resourceType: 'microvm', resourceId: id, limit: 1000 });
    return events.filter((e) => e.type === 'state_changed' && e.toState === 'RESUMING').length;
  }

  test('start → 1 → idle → SUSPENDED without QEMU → request → RUNNING, 2, its background process and files intact', async () => {
    const { id, token, body } = await start({ idlePolicy: { maxIdleDurationSeconds: 2 } });
    assert.match(String(body.url), new RegExp(`^http://${id}\\.vm\\.localhost:${s.gatewayPort}$`));
    assert.match(String(body.arn), new RegExp(`^arn:cocoon:local-1:\\d{12}:microvm/${id}$`));
    assert.equal(body.image, image.arn);
    assert.ok(['PENDING', 'RUNNING'].includes(String(body.state)));
    assert.ok(Date.parse(String(body.tokenExpiresAt)) > Date.now() + 59 * 60_000, 'a token of 60 minutes by default');

    // The first request waits for the launch (a restore of the image's snapshot, no boot).
    assert.equal(await s.get(id, token, '/cgi-bin/count'), '1');
    assert.equal(await s.get(id, token, '/count', { port: TESTAPP_PORT }), '1', 'a counter kept in RAM');
    assert.equal(await s.get(id, token, '/cgi-bin/write?kept-across-suspend'), 'written');
    const before = parseBackground(await s.get(id, token, '/cgi-bin/bg'));
    const running = await s.api('GET', `/microvms/${id}`);
    assert.equal(running.body.state, 'RUNNING');
    assert.equal(qemuProcessesMentioning(microvmDir(dataDir, id)).length, 1);

    // No traffic for 2 s: SUSPENDED, no QEMU, memory and disk kept as files.
    const suspended = await waitForState(id, 'SUSPENDED');
    assert.ok(suspended.suspendedAt);
    assert.deepEqual(qemuProcessesMentioning(microvmDir(dataDir, id)), [], 'no QEMU process while SUSPENDED');
    const generation = path.join(microvmDir(dataDir, id), 'gen-1');
    // Its memory: the pages it changed from its image's (`mem.diff`, docs/vmm.md "Memory diffs").
    const memory = (await readSnapshotManifest(generation)).files.mem.name;
    for (const file of ['manifest.json', 'state', memory, 'disk.qcow2']) assert.ok(fs.existsSync(path.join(generation, file)), file);
    assert.equal(fs.existsSync(path.join(microvmDir(dataDir, id), 'vm', 'mem')), false, 'no RAM file of a running VM');

    // A request wakes it: answered with no error, memory, processes and files as they were.
    assert.equal(await s.get(id, token, '/cgi-bin/count'), '2');
    assert.equal((await s.api('GET', `/microvms/${id}`)).body.state, 'RUNNING');
    assert.equal(await s.get(id, token, '/count', { port: TESTAPP_PORT }), '2', 'the in-memory counter went on');
    const after = parseBackground(await s.get(id, token, '/cgi-bin/bg'));
    assert.equal(after.pid, before.pid, 'the same background process, not a new one');
    assert.ok(after.ticks >= before.ticks, `its state went on (${before.ticks} then ${after.ticks})`);
    assert.equal(await s.get(id, token, '/cgi-bin/file'), 'kept-across-suspend');
    await sleep(1000);
    assert.ok(parseBackground(await s.get(id, token, '/cgi-bin/bg')).ticks > after.ticks, 'and it is running');

    // The image's hooks ran inside the guest: run at the start, suspend before the snapshot, resume after the restore.
    const hooks = (await s.get(id, token, '/hooks', { port: TESTAPP_PORT })).split('\n');
    assert.deepEqual(hooks.slice(0, 2), ['run', 'suspending']);
    assert.match(hooks[2] ?? '', /^resumed \d+$/);
    const log = await s.api('GET', `/microvms/${id}/logs`);
    assert.equal(log.status, 200);
    assert.match(String(log.body), /hook resume ended: 0/);
    assert.equal(await resumeCount(id), 1);

    // Idle again, then a second wake: another generation, the chain works.
    await waitForState(id, 'SUSPENDED');
    assert.equal(await s.get(id, token, '/cgi-bin/count'), '3');
    assert.equal(await s.get(id, token, '/cgi-bin/file'), 'kept-across-suspend');
    assert.equal((await s.api('DELETE', `/microvms/${id}`)).status, 204);
  });

  test('a request in flight holds off the idle suspend; the suspend follows once it ends', async () => {
    const { id, token } = await start({ idlePolicy: { maxIdleDurationSeconds: 1 } });
    assert.equal(await s.get(id, token, '/'), 'hello from cocoon');
    // A 3 s request against a 1 s idle policy: the microVM stays RUNNING while it is in flight.
    const slow = gatewayRequest(s.gatewayPort, id, token, '/sleep?ms=3000', { port: TESTAPP_PORT });
    await sleep(2000);
    assert.equal((await s.api('GET', `/microvms/${id}`)).body.state, 'RUNNING');
    assert.equal((await slow).body.trim(), 'slept');
    await waitForState(id, 'SUSPENDED');
    assert.equal((await s.api('DELETE', `/microvms/${id}`)).status, 204);
  });

  test('20 concurrent requests to a SUSPENDED microVM: exactly one resume, 20 correct answers', async () => {
    const { id, token } = await start({ idlePolicy: { maxIdleDurationSeconds: 600 } });
    assert.equal(await s.get(id, token, '/'), 'hello from cocoon');
    const suspended = await s.api('POST', `/microvms/${id}/suspend`);
    assert.equal(suspended.status, 200);
    assert.equal(suspended.body.state, 'SUSPENDED');
    assert.deepEqual(qemuProcessesMentioning(microvmDir(dataDir, id)), []);
    const resumesBefore = await resumeCount(id);

    const answers = await Promise.all(
      Array.from({ length: 20 }, () => gatewayRequest(s.gatewayPort, id, token, '/count', { port: TESTAPP_PORT })),
    );
    assert.deepEqual(answers.map((a) => a.status), Array(20).fill(200), answers.map((a) => a.body).join('|'));
    const counts = answers.map((a) => Number(a.body.trim())).sort((a, b) => a - b);
    assert.deepEqual(counts, Array.from({ length: 20 }, (_, i) => i + 1), 'each answered once, by the same guest');
    assert.equal((await resumeCount(id)) - resumesBefore, 1, 'one resume for 20 requests');
    assert.equal(qemuProcessesMentioning(microvmDir(dataDir, id)).length, 1);
    assert.equal((await s.api('DELETE', `/microvms/${id}`)).status, 204);
  });

  test('explicit suspend and resume through the API; autoResumeEnabled=false answers 409 until resumed', async () => {
    const { id, token } = await start({ idlePolicy: { autoResumeEnabled: false, maxIdleDurationSeconds: 600 } });
    assert.equal(await s.get(id, token, '/cgi-bin/count'), '1');
    assert.equal((await s.api('POST', `/microvms/${id}/suspend`)).body.state, 'SUSPENDED');
    assert.equal((await s.api('POST', `/microvms/${id}/suspend`)).body.state, 'SUSPENDED', 'suspend is idempotent');

    const refused = await gatewayRequest(s.gatewayPort, id, token, '/cgi-bin/count');
    assert.equal(refused.status, 409);
    assert.equal(JSON.parse(refused.body).error.code, 'microvm_suspended');
    assert.equal((await s.api('GET', `/microvms/${id}`)).body.state, 'SUSPENDED', 'the request did not wake it');

    const resumed = await s.api('POST', `/microvms/${id}/resume`);
    assert.equal(resumed.status, 200);
    assert.equal(resumed.body.state, 'RUNNING');
    assert.equal((await s.api('POST', `/microvms/${id}/resume`)).body.state, 'RUNNING', 'resume is idempotent');
    assert.equal(await s.get(id, token, '/cgi-bin/count'), '2');

    const list = await s.api('GET', `/microvms?state=RUNNING&image=${encodeURIComponent(image.arn)}`);
    assert.ok(list.body.items.some((m: { id: string }) => m.id === id));
    assert.equal((await s.api('DELETE', `/microvms/${id}`)).status, 204);
    assert.equal((await s.api('POST', `/microvms/${id}/resume`)).status, 409, 'a terminated microVM cannot be resumed');
  });

  test('the session ends after maximumDurationSeconds: TERMINATED, files gone, the gateway answers 410', async () => {
    const { id, token, body } = await start({ maximumDurationSeconds: 5, idlePolicy: { maxIdleDurationSeconds: 600 } });
    assert.ok(Date.parse(String(body.expiresAt)) - Date.parse(String(body.createdAt)) === 5000);
    assert.equal(await s.get(id, token, '/cgi-bin/count'), '1');
    assert.ok(fs.existsSync(microvmDir(dataDir, id)));
    const ended = await waitForState(id, 'TERMINATED');
    assert.ok(ended.terminatedAt);
    assert.equal(fs.existsSync(microvmDir(dataDir, id)), false, 'its files are removed');
    assert.deepEqual(qemuProcessesMentioning(microvmDir(dataDir, id)), []);
    const gone = await gatewayRequest(s.gatewayPort, id, token, '/cgi-bin/count');
    assert.equal(gone.status, 410);
    assert.equal(JSON.parse(gone.body).error.code, 'microvm_terminated');
    assert.equal((await s.api('POST', `/microvms/${id}/tokens`, {})).status, 409, 'no new tokens');
  });

  test('a SUSPENDED microVM ends after suspendedDurationSeconds: TERMINATED, files gone, 410', async () => {
    const { id, token } = await start({ idlePolicy: { maxIdleDurationSeconds: 1, suspendedDurationSeconds: 2 } });
    assert.equal(await s.get(id, token, '/cgi-bin/count'), '1');
    await waitForState(id, 'SUSPENDED');
    const gen1 = path.join(microvmDir(dataDir, id), 'gen-1');
    assert.ok(fs.existsSync(path.join(gen1, (await readSnapshotManifest(gen1)).files.mem.name)));
    await waitForState(id, 'TERMINATED');
    assert.equal(fs.existsSync(microvmDir(dataDir, id)), false);
    assert.equal((await gatewayRequest(s.gatewayPort, id, token, '/')).status, 410);
  });
});
