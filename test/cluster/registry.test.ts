// The host registry (src/cluster/registry.ts): heartbeats, the sweep that declares a silent host
// dead once, self-fencing when heartbeats stop reaching the database, and the server module
// that registers a host in a cluster (PostgreSQL) and does nothing with SQLite. No VM boots.
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { HostRegistry, type RegistryHooks } from '../../src/cluster/registry.ts';
import { loadConfig } from '../../src/config/config.ts';
import { startServer } from '../../src/server.ts';
import { getHost, listHosts, type HostLoss } from '../../src/store/hosts.ts';
import { acquireMicrovmLease } from '../../src/store/leases.ts';
import { createMicrovm, getMicrovm, transitionMicrovm } from '../../src/store/microvms.ts';
import type { Db } from '../../src/store/sql.ts';
import { clusterModule } from '../../src/wiring/cluster.ts';
import { PostgresServer } from '../support/postgres.ts';
import { quiet, readyImage, someTenant, tempDb } from '../store/helpers.ts';

const SETTINGS = { heartbeatIntervalMs: 1000, deadAfterMs: 5000, capacity: { vcpus: 4, memoryMiB: 4096, diskMiB: 10_000 } };

/** A registry on a stepped clock: `advance(ms)` moves both its monotonic and its wall clock. */
function steppedRegistry(db: Db, hostId: string, clock: { ms: number }, hooks: RegistryHooks = {}): HostRegistry {
  return new HostRegistry({
    db, hostId, settings: SETTINGS, apiUrl: `http://127.0.0.1:${hostId.length}`, gatewayUrl: null, logger: quiet, hooks,
    monotonic: () => clock.ms, now: () => new Date(Date.UTC(2026, 5, 1) + clock.ms),
  });
}

async function runningMicrovm(db: Db, hostId: string): Promise<string> {
  const tenant = await someTenant(db);
  const image = await readyImage(db, tenant.id);
  const { microvm } = await createMicrovm(db, {
    tenantId: tenant.id, region: 'local', imageId: image.id, maximumDurationSeconds: 600,
    idlePolicy: { autoResumeEnabled: true, maxIdleDurationSeconds: 60, suspendedDurationSeconds: null },
  });
  assert.ok((await acquireMicrovmLease(db, microvm.id, hostId)).acquired);
  await transitionMicrovm(db, microvm.id, 'PENDING', 'RUNNING');
  return microvm.id;
}

test('a silent host is declared dead once, by a host that has itself been heartbeating a whole dead-after period', async (t) => {
  const { db } = await tempDb(t);
  const clock = { ms: 0 };
  const lost: Array<[string, HostLoss]> = [];
  let declaredDead = 0;
  const a = steppedRegistry(db, 'host-a', clock, { onDeclaredDead: async () => { declaredDead++; } });
  const b = steppedRegistry(db, 'host-b', clock, { onHostLost: (id, loss) => lost.push([id, loss]) });
  await a.register(); // the test drives the rounds (no timers)
  await b.register();
  const vm = await runningMicrovm(db, 'host-a');

  // host-a falls silent at 0. host-b heartbeats every second.
  for (let s = 1; s <= 4; s++) {
    clock.ms = s * 1000;
    await b.tick();
  }
  assert.equal((await getHost(db, 'host-a'))?.state, 'LIVE', 'silent 4 s < 5 s');
  clock.ms = 5500;
  await b.tick();
  assert.equal((await getHost(db, 'host-a'))?.state, 'DEAD');
  assert.deepEqual(lost.map(([id, loss]) => [id, loss.failed]), [['host-a', [vm]]]);
  assert.equal((await getMicrovm(db, vm))?.state, 'FAILED');
  clock.ms = 6500;
  await b.tick();
  assert.equal(lost.length, 1, 'declared once');

  // host-a comes back: its heartbeat is refused, it stops its VMs and registers again.
  await a.beat();
  assert.equal(declaredDead, 1);
  assert.equal((await getHost(db, 'host-a'))?.state, 'LIVE');
  assert.equal((await getMicrovm(db, vm))?.hostId, null, 'it owns nothing of what it had');
});

test('a host that has just (re)connected does not judge others: after an outage every host gets dead-after to heartbeat', async (t) => {
  const { db } = await tempDb(t);
  const clock = { ms: 0 };
  const a = steppedRegistry(db, 'host-a', clock);
  const b = steppedRegistry(db, 'host-b', clock);
  await a.register();
  clock.ms = 60_000; // host-a silent for a minute (as after a database outage)
  await b.register();
  clock.ms = 61_000;
  assert.deepEqual(await b.sweep(), [], 'b connected 1 s ago');
  await a.beat(); // a is back within b's first dead-after period
  clock.ms = 66_000;
  await b.beat();
  assert.deepEqual(await b.sweep(), []);
  assert.equal((await getHost(db, 'host-a'))?.state, 'LIVE');
});

test('heartbeats that stop reaching the database: the host fences itself once, before others may declare it dead', async (t) => {
  const { db } = await tempDb(t);
  let down = false;
  const flaky: Db = new Proxy(db, {
    get(target, prop, receiver) {
      const value = Reflect.get(target, prop, receiver);
      if (typeof value !== 'function') return value;
      return (...args: unknown[]) => {
        if (down) return Promise.reject(new Error('connection refused'));
        return (value as (...a: unknown[]) => unknown).apply(target, args);
      };
    },
  });
  const clock = { ms: 0 };
  let fenced = 0;
  const a = steppedRegistry(flaky, 'host-a', clock, { onLeaseExpiring: async () => { fenced++; } });
  await a.register();
  down = true;
  for (let s = 1; s <= 3; s++) {
    clock.ms = s * 1000;
    await a.beat();
  }
  assert.equal(fenced, 0, '3 s without a heartbeat: not yet (limit 5 − 1 s)');
  clock.ms = 4000;
  await a.beat();
  assert.equal(fenced, 1);
  assert.equal(a.fenced, true);
  clock.ms = 4500;
  await a.beat();
  assert.equal(fenced, 1, 'once');
  down = false;
  clock.ms = 5000;
  await a.beat();
  assert.equal(a.fenced, false);
});

let postgres: PostgresServer;
before(async () => { postgres = await PostgresServer.start(); });
after(async () => { await postgres?.stop(); });

async function server(t: { after: (fn: () => Promise<void>) => void }, env: Record<string, string>, hostId: string) {
  const dataDir = await mkdtemp(join(tmpdir(), 'cocoon-cluster-'));
  t.after(() => rm(dataDir, { recursive: true, force: true }));
  const cluster = clusterModule({ engine: { hostId, fenceAll: async () => undefined, settleFenced: async () => undefined }, gatewayPort: 7999 });
  const running = await startServer({ ...loadConfig({ COCOON_DATA_DIR: dataDir, ...env }), apiPort: 0 }, [cluster]);
  let closed = false;
  const close = async () => { if (!closed) { closed = true; await running.close(); } };
  t.after(close);
  return { running, cluster, close };
}

test('servers on one PostgreSQL register with their URLs and capacity; one that stops is declared dead by the other', async (t) => {
  const databaseUrl = await postgres.createDatabase('cluster');
  const env = { COCOON_DATABASE_URL: databaseUrl, COCOON_HEARTBEAT_INTERVAL: '1', COCOON_HOST_DEAD_AFTER: '3', COCOON_HOST_VCPUS: '6' };
  const a = await server(t, env, 'host-a');
  const b = await server(t, env, 'host-b');
  const hosts = await listHosts(b.running.db);
  assert.deepEqual(hosts.map((h) => [h.id, h.state, h.capacity.vcpus]), [['host-a', 'LIVE', 6], ['host-b', 'LIVE', 6]]);
  assert.equal(hosts[0]?.apiUrl, a.running.apiUrl);
  assert.equal(hosts[0]?.gatewayUrl, 'http://127.0.0.1:7999');
  assert.equal((await b.cluster.place({ vcpus: 1, memoryMiB: 128, diskMiB: 1 })).id, 'host-b', 'the receiving host');

  await a.close();
  for (let i = 0; i < 200 && (await getHost(b.running.db, 'host-a'))?.state !== 'DEAD'; i++) await new Promise((r) => setTimeout(r, 100));
  const dead = await getHost(b.running.db, 'host-a');
  assert.deepEqual([dead?.state, dead?.declaredDeadBy], ['DEAD', 'host-b']);
  assert.equal((await getHost(b.running.db, 'host-b'))?.state, 'LIVE');
});

test('with SQLite the cluster module does nothing: no host row, no placement', async (t) => {
  const s = await server(t, { COCOON_HEARTBEAT_INTERVAL: '1', COCOON_HOST_DEAD_AFTER: '3' }, 'host-solo');
  assert.equal(s.cluster.registry, undefined);
  assert.deepEqual(await listHosts(s.running.db), []);
  await assert.rejects(s.cluster.place({ vcpus: 1, memoryMiB: 128, diskMiB: 1 }), /only in a cluster/);
});

test('a dead-after shorter than three heartbeats stops the start', async (t) => {
  await assert.rejects(server(t, { COCOON_HEARTBEAT_INTERVAL: '5', COCOON_HOST_DEAD_AFTER: '10' }, 'host-x'), /at least 3 times COCOON_HEARTBEAT_INTERVAL/);
});
