/**
 * API forwarding between hosts, without QEMU: two Cocoon servers (every default module) on one
 * PostgreSQL, registered in its `hosts` table by the cluster module. A microVM owned by host A
 * (its lease) has its log in A's data directory only: asked through host B, the request is
 * forwarded to A (signed, the API key checked again there) and answers A's file. A bad key is
 * refused by B itself; X-Cocoon-Peer from a client is refused; reads of the row stay local.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { logPath } from '../../src/lifecycle/paths.ts';
import { listLiveHosts } from '../../src/store/hosts.ts';
import { createMicrovm } from '../../src/store/microvms.ts';
import { findTenantByName } from '../../src/store/tenants.ts';
import { useClusterDatabase } from '../support/cluster.ts';
import { apiClient } from '../support/server.ts';
import { readyImage } from '../store/helpers.ts';

const cluster = useClusterDatabase();
const host = (databaseUrl: string, id: string) => cluster.host(databaseUrl, id, { prefix: 'fwd' });

test('a request for a microVM host A owns, sent to host B, is answered by host A', async () => {
  const databaseUrl = await cluster.createDatabase('fwd');
  const a = await host(databaseUrl, 'host-a');
  const b = await host(databaseUrl, 'host-b');
  const adminKey = a.newAdminKey!;
  assert.deepEqual((await listLiveHosts(a.db, new Date(Date.now() - 60_000))).map((h) => h.id), ['host-a', 'host-b']);

  // A microVM row that host A holds the lease of (no VM behind it: its log is the witness).
  const tenant = (await findTenantByName(a.db, 'admin'))!;
  const image = await readyImage(a.db, tenant.id);
  const { microvm } = await createMicrovm(a.db, {
    tenantId: tenant.id, region: 'local-1', imageId: image.id, maximumDurationSeconds: 3600,
    idlePolicy: { autoResumeEnabled: true, maxIdleDurationSeconds: 300, suspendedDurationSeconds: null },
  });
  await a.db.run("UPDATE microvms SET host_id = 'host-a', state = 'RUNNING' WHERE id = ?", [microvm.id]);
  const log = logPath(a.config.dataDir, microvm.id);
  fs.mkdirSync(path.dirname(log), { recursive: true });
  fs.writeFileSync(log, 'written on host A\n');

  const viaB = apiClient(b.apiUrl, adminKey);
  const logs = await viaB('GET', `/microvms/${microvm.id}/logs`);
  assert.equal(logs.status, 200, JSON.stringify(logs.body));
  assert.equal(logs.body, 'written on host A\n');
  // The row itself is read wherever the request lands.
  const row = await viaB('GET', `/microvms/${microvm.id}`);
  assert.equal(row.status, 200);
  assert.equal(row.body.id, microvm.id);

  // A bad key is refused by host B itself (nothing forwarded).
  const refused = await viaB('GET', `/microvms/${microvm.id}/logs`, undefined, `cocoon_ak_${'x'.repeat(43)}`);
  assert.equal(refused.status, 401);
  assert.equal(refused.body.error.code, 'unauthenticated');

  // Only hosts sign X-Cocoon-Peer: a client's is refused.
  const port = Number(new URL(a.apiUrl).port);
  const forged = await fetch(`http://127.0.0.1:${port}/api/v1/microvms/${microvm.id}/logs`, {
    headers: { authorization: `Bearer ${adminKey}`, 'x-cocoon-peer': `v1;h=host-b;t=${Date.now()};n=${'a'.repeat(22)};c=127.0.0.1;p=http;s=${'b'.repeat(43)}` },
  });
  assert.equal(forged.status, 401);
  assert.equal(((await forged.json()) as { error: { code: string } }).error.code, 'peer_auth_failed');

  // Host A gone (its registration stays LIVE until declared dead): B says so, 502 peer_unreachable.
  await a.close();
  const gone = await viaB('GET', `/microvms/${microvm.id}/logs`);
  assert.equal(gone.status, 502);
  assert.equal(gone.body.error.code, 'peer_unreachable');
});
