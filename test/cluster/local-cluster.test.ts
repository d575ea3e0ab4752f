/**
 * The local cluster (src/cluster/local/cluster.ts, `cocoon cluster up|down`): PostgreSQL,
 * s3rver and two Cocoon host processes on one machine, without microVMs. Up answers hosts whose
 * APIs share one database (the admin key made by the first works on the second), killHost ends
 * a host's process group, startHost brings it back, `down` stops every process it started and
 * is harmless twice, and the CLI's `cluster up` twice keeps what runs.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { promisify } from 'node:util';
import pg from 'pg';
import { clusterDown, clusterUp, processAlive, readClusterState, type LocalCluster } from '../../src/cluster/local/cluster.ts';

const run = promisify(execFile);
const CLI = path.resolve(import.meta.dirname, '../../bin/cocoon');
let dir: string;
let cluster: LocalCluster;

before(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cocoon-cluster-'));
  cluster = await clusterUp({ dir, hosts: 2, tiedToProcess: true, env: { COCOON_ACCEL: 'tcg', COCOON_LOG_LEVEL: 'warn' } });
});
after(async () => {
  await clusterDown(dir, { purge: true });
});

async function api(url: string, key: string, method = 'GET', body?: unknown): Promise<{ status: number; body: any }> {
  const response = await fetch(`${url}/api/v1${method === 'GET' ? '/tenants' : '/tenants'}`, {
    method,
    headers: { authorization: `Bearer ${key}`, ...(body ? { 'content-type': 'application/json' } : {}) },
    ...(body ? { body: JSON.stringify(body) } : {}),
  });
  return { status: response.status, body: await response.json() };
}

test('up: two hosts with their own ids and ports on one database and one bucket', async () => {
  const [a, b] = cluster.state.hosts;
  assert.ok(a && b);
  assert.deepEqual([a.id, b.id], ['host-a', 'host-b']);
  assert.notEqual(a.apiPort, b.apiPort);
  assert.notEqual(a.gatewayPort, b.gatewayPort);
  assert.match(cluster.adminKey, /^cocoon_ak_/);
  // A tenant made through A is listed through B: one database.
  assert.equal((await api(a.apiUrl, cluster.adminKey, 'POST', { name: 'shared' })).status, 201);
  const listed = await api(b.apiUrl, cluster.adminKey);
  assert.equal(listed.status, 200);
  assert.deepEqual(listed.body.items.map((t: { name: string }) => t.name).sort(), ['admin', 'shared']);
  // Both hosts run with the cluster's settings (and the one seal key).
  assert.equal(cluster.hostEnv('b').COCOON_DATABASE_URL, cluster.state.databaseUrl);
  assert.equal(cluster.hostEnv('b').COCOON_S3_ENDPOINT, cluster.state.s3.endpoint);
  assert.equal(
    fs.readFileSync(path.join(a.dataDir, 'secrets-seal.key'), 'utf8'),
    fs.readFileSync(path.join(b.dataDir, 'secrets-seal.key'), 'utf8'),
  );
  // Each registered itself with the URLs the others reach it at.
  const client = new pg.Client({ connectionString: cluster.state.databaseUrl });
  await client.connect();
  try {
    const { rows } = await client.query<{ id: string; api_url: string; gateway_url: string; state: string }>('SELECT id, api_url, gateway_url, state FROM hosts ORDER BY id');
    assert.deepEqual(rows, [
      { id: 'host-a', api_url: a.apiUrl, gateway_url: a.gatewayUrl, state: 'LIVE' },
      { id: 'host-b', api_url: b.apiUrl, gateway_url: b.gatewayUrl, state: 'LIVE' },
    ]);
  } finally {
    await client.end();
  }
  const s3 = await fetch(`${cluster.state.s3.endpoint}/`);
  assert.equal(s3.status < 500, true);
  await s3.body?.cancel();
});

test('killHost ends the host, startHost brings it back with its data; cluster up again keeps what runs', async () => {
  const b = cluster.host('b');
  const pid = b.pid;
  await cluster.killHost('b');
  assert.equal(processAlive(pid), false);
  await assert.rejects(fetch(`${b.apiUrl}/api/v1/health`));
  await cluster.startHost('b');
  assert.notEqual(b.pid, pid);
  assert.equal((await api(b.apiUrl, cluster.adminKey)).status, 200);

  const before = readClusterState(dir)!;
  const { stdout } = await run(CLI, ['cluster', 'up', '--hosts', '2', '--dir', dir, '--json'], { timeout: 120_000 });
  const again = JSON.parse(stdout);
  assert.deepEqual(again.hosts.map((h: { pid: number }) => h.pid), before.hosts.map((h) => h.pid), 'the running hosts were kept');
  assert.equal(again.adminKey, cluster.adminKey);
});

test('down stops every process it started, and twice is harmless', async () => {
  const state = readClusterState(dir)!;
  const pids = [...state.hosts.map((h) => h.pid), state.s3.pid];
  const { stdout } = await run(CLI, ['cluster', 'down', '--dir', dir, '--json'], { timeout: 120_000 });
  assert.deepEqual(JSON.parse(stdout).stopped.sort(), ['host-a', 'host-b', 'postgresql', 's3']);
  for (const pid of pids) assert.equal(processAlive(pid), false, `pid ${pid} is gone`);
  assert.equal(fs.existsSync(path.join(dir, 'postgres', 'data', 'postmaster.pid')), false);
  const twice = await run(CLI, ['cluster', 'down', '--dir', dir, '--json'], { timeout: 120_000 });
  assert.deepEqual(JSON.parse(twice.stdout).stopped, []);
});
