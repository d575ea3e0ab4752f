// PostgreSQL goes away (a fast shutdown: every connection cut) and comes back on the same socket,
// with no VM: the store answers `database_unavailable` (503) quickly while it is down, a
// transaction whose connection breaks in its middle fails cleanly without crashing the process,
// the same pool serves again once the server is back; a server's API answers 503
// `database_unavailable` during the outage and 200 after it; the host registry's heartbeat
// timer survives failed rounds and resumes, and nobody is declared dead for the outage.
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { isCocoonError } from '../../src/common/errors.ts';
import { loadConfig } from '../../src/config/config.ts';
import { ADMIN_KEY_FILE, startServer, type RunningServer } from '../../src/server.ts';
import { getHost, listHosts } from '../../src/store/hosts.ts';
import { openMetadataStore } from '../../src/store/open.ts';
import { isConnectionFailure } from '../../src/store/postgres.ts';
import { createMicrovm } from '../../src/store/microvms.ts';
import { createToken, revokeToken } from '../../src/store/tokens.ts';
import { createTokenVerifier } from '../../src/gateway/tokens.ts';
import { clusterModule } from '../../src/wiring/cluster.ts';
import { readyImage, someTenant } from '../store/helpers.ts';
import { PostgresServer } from '../support/postgres.ts';

let postgres: PostgresServer;
before(async () => {
  postgres = await PostgresServer.start();
});
after(async () => {
  await postgres?.stop();
});

/** Runs `during` with the server stopped, and starts it again whatever happened. */
async function outage<T>(during: () => Promise<T>): Promise<T> {
  await postgres.halt();
  try {
    return await during();
  } finally {
    await postgres.startAgain();
  }
}

const POLICY = { autoResumeEnabled: true, maxIdleDurationSeconds: 300, suspendedDurationSeconds: null };
const unavailable = (error: unknown) => isCocoonError(error, 'database_unavailable') && error.status === 503;

test('the store: database_unavailable while PostgreSQL is down, a transaction cut in its middle fails cleanly, the same handle works after', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'cocoon-pgout-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const { db } = await openMetadataStore(dir, { databaseUrl: await postgres.createDatabase('outage') });
  t.after(() => db.close());
  // Idle connections in the pool when the server goes: the pool's 'error' must not end the process.
  await Promise.all([1, 2, 3].map(() => db.get('SELECT 1 AS one')));

  // A transaction holding its connection while the server shuts down.
  let cut!: () => void;
  const wasCut = new Promise<void>((resolve) => { cut = resolve; });
  const midway = db.transaction(async (tx) => {
    await tx.get('SELECT 1 AS one');
    await wasCut;
    return tx.get('SELECT 2 AS two');
  });
  midway.catch(() => undefined);

  await outage(async () => {
    cut();
    await assert.rejects(midway, unavailable, 'the transaction whose connection was cut');
    await assert.rejects(db.get('SELECT 1 AS one'), unavailable);
    await assert.rejects(db.run('SELECT 1'), unavailable);
    await assert.rejects(db.transaction((tx) => tx.get('SELECT 1 AS one')), unavailable);
  });

  assert.deepEqual(await db.get('SELECT 1 AS one'), { one: 1 }, 'the pool opened new connections');
  assert.deepEqual(await db.transaction((tx) => tx.get('SELECT 2 AS two')), { two: 2 });
  // A statement that fails on a live server is not an outage.
  await assert.rejects(db.get('SELECT * FROM no_such_table'), (error: unknown) => !isCocoonError(error) && !isConnectionFailure(error));
});

test('a server on PostgreSQL: the API answers 503 database_unavailable during an outage, heartbeats resume after it, nobody is declared dead', async (t) => {
  const dataDirs = await Promise.all([0, 1].map(() => mkdtemp(join(tmpdir(), 'cocoon-pgout-'))));
  t.after(() => Promise.all(dataDirs.map((d) => rm(d, { recursive: true, force: true }))));
  const databaseUrl = await postgres.createDatabase('outage_api');
  // Dead after 6 s with 1 s heartbeats: an outage longer than a heartbeat interval, shorter
  // than the self-fencing bound (dead-after minus one interval).
  const env = { COCOON_DATABASE_URL: databaseUrl, COCOON_HEARTBEAT_INTERVAL: '1', COCOON_HOST_DEAD_AFTER: '6' };
  // One after the other: the first bootstraps the admin tenant, the second finds it.
  const servers: RunningServer[] = [];
  for (const [i, hostId] of ['host-a', 'host-b'].entries()) {
    const running = await startServer({ ...loadConfig({ COCOON_DATA_DIR: dataDirs[i]!, ...env }), apiPort: 0 }, [clusterModule({ engine: { hostId }, gatewayPort: 0 })]);
    t.after(() => running.close());
    servers.push(running);
  }
  const key = (await readFile(join(dataDirs[0]!, ADMIN_KEY_FILE), 'utf8')).trim();
  const tenants = () => fetch(`${servers[0]!.apiUrl}/api/v1/tenants`, { headers: { authorization: `Bearer ${key}` } });
  assert.equal((await tenants()).status, 200);
  const beatBefore = (await getHost(servers[0]!.db, 'host-a'))!.heartbeatAt;

  await outage(async () => {
    const answer = await tenants();
    assert.equal(answer.status, 503);
    assert.equal(((await answer.json()) as { error: { code: string } }).error.code, 'database_unavailable');
    // Two heartbeat intervals pass with the database down: the rounds fail, the timers go on.
    await new Promise((resolve) => setTimeout(resolve, 2500));
  });

  assert.equal((await tenants()).status, 200, 'the API answers again');
  // Heartbeats resume by themselves (the same timer, a new connection).
  let hosts = await listHosts(servers[1]!.db);
  for (let i = 0; i < 50 && !hosts.every((h) => h.heartbeatAt > beatBefore); i++) {
    await new Promise((resolve) => setTimeout(resolve, 200));
    hosts = await listHosts(servers[1]!.db);
  }
  assert.deepEqual(hosts.map((h) => [h.id, h.state, h.heartbeatAt > beatBefore]), [['host-a', 'LIVE', true], ['host-b', 'LIVE', true]]);
  // Past the dead-after bound, counted from the outage's start: still nobody judged dead.
  await new Promise((resolve) => setTimeout(resolve, 4000));
  assert.deepEqual((await listHosts(servers[0]!.db)).map((h) => [h.id, h.state]), [['host-a', 'LIVE'], ['host-b', 'LIVE']]);
});

test('the gateway\'s token check during an outage: a token the database accepted is still accepted, within the grace; others are database_unavailable', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'cocoon-pgout-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const { db } = await openMetadataStore(dir, { databaseUrl: await postgres.createDatabase('outage_tokens') });
  t.after(() => db.close());
  const tenant = await someTenant(db);
  const image = await readyImage(db, tenant.id);
  const { microvm } = await createMicrovm(db, { tenantId: tenant.id, region: 'local', imageId: image.id, idlePolicy: POLICY, maximumDurationSeconds: 3600 });
  const used = await createToken(db, { microvmId: microvm.id, tenantId: tenant.id });
  const neverUsed = await createToken(db, { microvmId: microvm.id, tenantId: tenant.id });
  const revoked = await createToken(db, { microvmId: microvm.id, tenantId: tenant.id });
  const clock = { ms: Date.now() };
  const tokens = createTokenVerifier(db, { now: () => clock.ms, outageGraceMs: 60_000 });
  assert.equal((await tokens.verify(microvm.id, used.secret)).ok, true);
  assert.equal((await tokens.verify(microvm.id, revoked.secret)).ok, true);
  await revokeToken(db, microvm.id, revoked.token.id);
  assert.deepEqual(await tokens.verify(microvm.id, revoked.secret), { ok: false, reason: 'revoked' }, 'the refusal replaces the accepted verdict');

  await outage(async () => {
    assert.equal((await tokens.verify(microvm.id, used.secret)).ok, true, 'accepted before, accepted during the outage');
    await assert.rejects(async () => tokens.verify('mvm-other', used.secret), unavailable, 'not for another microVM');
    await assert.rejects(async () => tokens.verify(microvm.id, neverUsed.secret), unavailable, 'never checked: cannot be judged');
    await assert.rejects(async () => tokens.verify(microvm.id, revoked.secret), unavailable, 'refused before: not accepted now');
    clock.ms += 61_000;
    await assert.rejects(async () => tokens.verify(microvm.id, used.secret), unavailable, 'past the grace');
  });
});
