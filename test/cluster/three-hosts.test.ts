/**
 * Issue 15's acceptance on one machine: a cluster of three Cocoon host processes (the local
 * cluster module: Debian's PostgreSQL, s3rver, `cocoon serve` × 3) with real QEMU.
 *
 *  1. an image built through host A (bundle upload, buildah, boot, snapshot, S3 upload);
 *  2. a microVM started through host B, served by all three gateways (HTTP and WebSocket; the
 *     two that do not run it forward to the one that does), exec'd through all three APIs;
 *  3. suspended (through host C's API: forwarded to its owner), its generation committed to S3;
 *  4. host A and the host that ran the microVM SIGKILLed together with their QEMUs;
 *  5. a request through the last host wakes it there (declared the dead hosts dead, took the
 *     lease, downloaded image snapshot and generation from S3) with its memory (the app's
 *     counter), files and processes (a background process started before) intact.
 *
 * Every process it starts (PostgreSQL, s3rver, hosts, QEMUs) is stopped in `after`, and by the
 * cluster's watchdog if this process dies first.
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { WebSocket } from 'ws';
import { clusterDown, clusterUp, type LocalCluster } from '../../src/cluster/local/cluster.ts';
import { client, type Client } from '../images/helpers.ts';
import { request } from '../support/server.ts';
import { testAppBundle } from '../support/fixtures.ts';

const SLOW = { timeout: 1_200_000 };

/** Runs a command through an API's exec (ndjson): its stdout and exit code. */
async function exec(apiUrl: string, key: string, id: string, command: string[]): Promise<{ stdout: string; exitCode: number | null }> {
  const response = await fetch(`${apiUrl}/api/v1/microvms/${id}/exec`, {
    method: 'POST',
    headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
    body: JSON.stringify({ command }),
  });
  const text = await response.text();
  assert.equal(response.status, 200, text);
  let stdout = '';
  let exitCode: number | null = null;
  for (const line of text.split('\n').filter(Boolean)) {
    const event = JSON.parse(line) as { type: string; data?: string; exitCode?: number; error?: unknown };
    if (event.type === 'stdout') stdout += Buffer.from(event.data!, 'base64').toString('utf8');
    if (event.type === 'exit') exitCode = event.exitCode ?? null;
    if (event.type === 'error') assert.fail(`exec failed: ${JSON.stringify(event.error)}`);
  }
  return { stdout, exitCode };
}

async function waitState(api: Client, id: string, state: string, timeoutMs = 300_000): Promise<any> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const vm = await api.get(`/microvms/${id}`);
    assert.equal(vm.status, 200, vm.text);
    if (vm.body.state === state) return vm.body;
    if (['FAILED', 'TERMINATED'].includes(vm.body.state)) assert.fail(`microVM ${id} is ${vm.body.state}: ${vm.body.error}`);
    if (Date.now() > deadline) assert.fail(`microVM ${id} still ${vm.body.state} after ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

describe('three hosts on one machine: build on A, start on B, serve everywhere, lose two hosts, wake on the third', SLOW, () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cocoon-cluster-'));
  const scratch = fs.mkdtempSync(path.join(os.tmpdir(), 'cocoon-cluster-bundle-'));
  let cluster: LocalCluster;
  const api: Record<string, Client> = {};
  let imageId: string;
  let microvmId: string;
  let token: string;
  let owner: string;
  let counter = 0;
  let sleeperPid: string;

  const gateway = (name: string) => Number(new URL(cluster.host(name).gatewayUrl).port);
  const viaGateway = (name: string, route: string) =>
    request(gateway(name), { path: route, headers: { host: `${microvmId}.vm.localhost`, 'x-cocoon-token': token } });

  before(async () => {
    cluster = await clusterUp({
      dir,
      hosts: 3,
      tiedToProcess: true,
      // Fast host-loss detection for the test (docs/cluster.md: dead after 3 s of silence).
      env: { COCOON_HEARTBEAT_INTERVAL: '1', COCOON_HOST_DEAD_AFTER: '3', COCOON_LOG_LEVEL: 'info' },
    });
    for (const name of ['a', 'b', 'c']) api[name] = client(cluster.host(name).apiUrl, cluster.adminKey);
  });
  after(async () => {
    await clusterDown(dir, { purge: true });
    fs.rmSync(scratch, { recursive: true, force: true });
  });

  test('an image built through host A', SLOW, async () => {
    const upload = await api.a!.uploadBundle(testAppBundle(scratch, { secondPort: 8081 }));
    assert.equal(upload.status, 201, upload.text);
    const created = await api.a!.post('/images', { name: 'cluster-app', bundle: upload.body.uri, port: 8080, readiness: { httpPath: '/', timeoutSeconds: 300 } });
    assert.equal(created.status, 202, created.text);
    imageId = created.body.id;
    const image = await api.a!.waitForState(imageId, ['READY', 'FAILED'], 900_000);
    assert.equal(image.state, 'READY', JSON.stringify(image));
    // Every host's API sees it: one database.
    for (const name of ['b', 'c']) assert.equal((await api[name]!.get(`/images/${imageId}`)).body.state, 'READY');
  });

  test('a microVM started through host B is served by all three gateways and exec\'d through all three APIs', SLOW, async () => {
    const started = await api.b!.post('/microvms', { image: imageId, idlePolicy: { maxIdleDurationSeconds: 3600 } });
    assert.equal(started.status, 201, started.text);
    microvmId = started.body.id;
    token = started.body.token;
    await waitState(api.b!, microvmId, 'RUNNING');
    const lease = await cluster.lease(microvmId);
    owner = lease.hostId!;
    assert.ok(['host-a', 'host-b', 'host-c'].includes(owner), `owned by ${owner}`);

    for (const name of ['a', 'b', 'c']) {
      const r = await viaGateway(name, '/count');
      assert.equal(r.status, 200, `through host ${name}: ${r.body}`);
      assert.equal(Number(r.body.trim()), ++counter, `one app, one memory, through host ${name}`);
      // A WebSocket through each gateway.
      const ws = new WebSocket(`ws://127.0.0.1:${gateway(name)}/ws`, { headers: { host: `${microvmId}.vm.localhost`, 'x-cocoon-token': token } });
      ws.on('error', () => {});
      await once(ws, 'open');
      ws.send(`hello via ${name}`);
      const [data] = (await once(ws, 'message')) as [Buffer];
      assert.equal(data.toString(), `hello via ${name}`);
      ws.close();
      await once(ws, 'close');
    }
    // Exec through every host's API (the non-owners forward to the owner's API).
    for (const name of ['a', 'b', 'c']) {
      const out = await exec(cluster.host(name).apiUrl, cluster.adminKey, microvmId, ['sh', '-c', `mkdir -p /data && echo from-${name} >> /data/marker`]);
      assert.equal(out.exitCode, 0);
    }
    const marker = await exec(cluster.host('c').apiUrl, cluster.adminKey, microvmId, ['cat', '/data/marker']);
    assert.equal(marker.stdout, 'from-a\nfrom-b\nfrom-c\n');
    const sleeper = await api.a!.post(`/microvms/${microvmId}/exec`, { command: ['sleep', '100000'], background: true });
    assert.equal(sleeper.status, 201, sleeper.text);
    sleeperPid = String(sleeper.body.pid);
  });

  test('suspended through host C (forwarded to its owner)', SLOW, async () => {
    const suspended = await api.c!.post(`/microvms/${microvmId}/suspend`);
    assert.ok(suspended.status === 200 || suspended.status === 202, suspended.text);
    await waitState(api.c!, microvmId, 'SUSPENDED');
  });

  test('host A and the owner killed with their QEMUs; a request through the last host wakes it there, intact', SLOW, async () => {
    const killed = [...new Set(['host-a', owner])];
    for (const id of killed) await cluster.killHost(id);
    const survivor = ['host-a', 'host-b', 'host-c'].find((id) => !killed.includes(id))!;
    const name = survivor.slice('host-'.length);
    // Until the survivor declares the dead hosts dead (3 s), the wake may be refused: retry.
    const deadline = Date.now() + 120_000;
    let answer = await viaGateway(name, '/count');
    while (answer.status !== 200 && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 500));
      answer = await viaGateway(name, '/count');
    }
    assert.equal(answer.status, 200, answer.body);
    assert.equal(Number(answer.body.trim()), ++counter, 'memory intact: the counter went on');
    assert.equal((await cluster.lease(microvmId)).hostId, survivor, `${survivor} runs it now`);
    const marker = await exec(cluster.host(name).apiUrl, cluster.adminKey, microvmId, ['cat', '/data/marker']);
    assert.equal(marker.stdout, 'from-a\nfrom-b\nfrom-c\n', 'files intact');
    const alive = await exec(cluster.host(name).apiUrl, cluster.adminKey, microvmId, ['sh', '-c', `cat /proc/${sleeperPid}/cmdline | tr '\\0' ' '`]);
    assert.equal(alive.stdout.trim(), 'sleep 100000', 'processes intact');
  });
});
