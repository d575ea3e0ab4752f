/**
 * Placement of a launch, without QEMU: two Cocoon servers (every default module) on one
 * PostgreSQL. Host B, which receives `POST /microvms`, offers fewer vCPUs than the image needs
 * (COCOON_HOST_VCPUS), so placement picks host A and B forwards the launch there (signed): the
 * microVM's row is A's (its lease). Both hosts too small: 503 `no_host_capacity`, no row made.
 * The same through E2B's create. (The image has no snapshot behind it: the launch itself then fails
 * on A, which is not the point.)
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { createMicrovm } from '../../src/store/microvms.ts';
import { findTenantByName } from '../../src/store/tenants.ts';
import { ownerOf, useClusterDatabase } from '../support/cluster.ts';
import { apiClient } from '../support/server.ts';
import { readyImage } from '../store/helpers.ts';

const cluster = useClusterDatabase();
const host = (databaseUrl: string, id: string, env: Record<string, string> = {}) => cluster.host(databaseUrl, id, { env, prefix: 'place' });

test('a launch sent to a host without room runs on the host placement picks; none with room: no_host_capacity', async () => {
  const databaseUrl = await cluster.createDatabase('place');
  const a = await host(databaseUrl, 'host-a', { COCOON_HOST_VCPUS: '3' });
  const b = await host(databaseUrl, 'host-b', { COCOON_HOST_VCPUS: '1' });
  const tenant = (await findTenantByName(a.db, 'admin'))!;
  const image = await readyImage(a.db, tenant.id, { vcpus: 2 });
  const viaB = apiClient(b.apiUrl, a.newAdminKey!);

  const started = await viaB('POST', '/microvms', { image: image.id, clientToken: 'placed-1' });
  assert.equal(started.status, 201, JSON.stringify(started.body));
  // Host A launched it: the launch took A's lease before anything else ran.
  assert.equal(await ownerOf(a.db, started.body.id), 'host-a');
  // A replay of the same clientToken answers the same microVM (idempotency is cluster-wide).
  const replay = await viaB('POST', '/microvms', { image: image.id, clientToken: 'placed-1' });
  assert.equal(replay.status, 201, JSON.stringify(replay.body));
  assert.equal(replay.body.id, started.body.id);

  // E2B's create likewise (its wire format, X-API-Key): the sandbox is host A's.
  const sandbox = await fetch(`${b.apiUrl}/e2b/sandboxes`, {
    method: 'POST',
    headers: { 'x-api-key': a.newAdminKey!, 'content-type': 'application/json' },
    body: JSON.stringify({ templateID: image.id, timeout: 60 }),
  });
  const created = (await sandbox.json()) as { sandboxID: string };
  assert.equal(sandbox.status, 201, JSON.stringify(created));
  assert.equal(await ownerOf(a.db, created.sandboxID), 'host-a');

  // An image that needs more vCPUs than either host offers: refused, and no row is made.
  const big = await readyImage(a.db, tenant.id, { vcpus: 4 });
  const count = async (): Promise<number> => Number((await a.db.get<{ n: number | string }>('SELECT count(*) AS n FROM microvms'))!.n);
  const rows = await count();
  const refused = await viaB('POST', '/microvms', { image: big.id });
  assert.equal(refused.status, 503, JSON.stringify(refused.body));
  assert.equal(refused.body.error.code, 'no_host_capacity');
  assert.equal(await count(), rows);
  const e2bRefused = await fetch(`${b.apiUrl}/e2b/sandboxes`, {
    method: 'POST',
    headers: { 'x-api-key': a.newAdminKey!, 'content-type': 'application/json' },
    body: JSON.stringify({ templateID: big.id }),
  });
  assert.equal(e2bRefused.status, 503);
  assert.match(await e2bRefused.text(), /no_host_capacity/);
  assert.equal(await count(), rows);
});

test('a resume of a SUSPENDED microVM no live host runs, sent to a host without room, runs where placement picks', async () => {
  const databaseUrl = await cluster.createDatabase('placeresume');
  const a = await host(databaseUrl, 'host-a', { COCOON_HOST_VCPUS: '3' });
  const b = await host(databaseUrl, 'host-b', { COCOON_HOST_VCPUS: '1' });
  const tenant = (await findTenantByName(a.db, 'admin'))!;
  const image = await readyImage(a.db, tenant.id, { vcpus: 2 });
  const viaB = apiClient(b.apiUrl, a.newAdminKey!);
  // What a host's loss leaves: SUSPENDED, ownerless (made in the store: no host holds it in memory).
  const { microvm } = await createMicrovm(a.db, {
    tenantId: tenant.id, region: 'local', imageId: image.id, maximumDurationSeconds: 3600,
    idlePolicy: { autoResumeEnabled: true, maxIdleDurationSeconds: 300, suspendedDurationSeconds: null },
  });
  const id = microvm.id;
  await a.db.run("UPDATE microvms SET state = 'SUSPENDED', host_id = NULL WHERE id = ?", [id]);

  // Through B, which lacks the room: host A resumes it (this store-made microVM has no saved
  // generation, so the resume fails there; the failure names host A's data directory).
  const resumed = await viaB('POST', `/microvms/${id}/resume`);
  assert.notEqual(resumed.status, 200, JSON.stringify(resumed.body));
  assert.ok(JSON.stringify(resumed.body).includes(a.config.dataDir) || JSON.stringify(await a.db.all('SELECT message FROM events WHERE resource_id = ?', [id])).includes(a.config.dataDir),
    `the resume ran on host A: ${JSON.stringify(resumed.body)}`);
  assert.ok(!JSON.stringify(await a.db.all('SELECT message FROM events WHERE resource_id = ?', [id])).includes(b.config.dataDir));

  // No host with room: refused before anything is touched, the microVM stays SUSPENDED.
  await a.db.run("UPDATE microvms SET state = 'SUSPENDED', host_id = NULL, vcpus = 4 WHERE id = ?", [id]);
  const refused = await viaB('POST', `/microvms/${id}/resume`);
  assert.equal(refused.status, 503, JSON.stringify(refused.body));
  assert.equal(refused.body.error.code, 'no_host_capacity');
  const row = await a.db.get<{ state: string; host_id: string | null }>('SELECT state, host_id FROM microvms WHERE id = ?', [id]);
  assert.deepEqual({ ...row }, { state: 'SUSPENDED', host_id: null });
});
