/**
 * The server on PostgreSQL (COCOON_DATABASE_URL), end to end through HTTP, without microVMs:
 * two server processes' worth of `startServer` (two "hosts", each with its own data directory)
 * on one database. The first creates the admin tenant and key; the second finds them, and
 * either one's API answers for what the other made. Issue 15's "every tenant and key live in
 * the database" on the part that needs no VM.
 */
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { loadConfig } from '../../src/config/config.ts';
import { startServer, type RunningServer } from '../../src/server.ts';
import { PostgresDb } from '../../src/store/postgres.ts';
import { PostgresServer } from '../support/postgres.ts';
import { apiClient } from '../support/server.ts';

let postgres: PostgresServer;
before(async () => { postgres = await PostgresServer.start(); });
after(async () => { await postgres?.stop(); });

async function host(t: { after: (fn: () => Promise<void>) => void }, databaseUrl: string): Promise<RunningServer> {
  const dataDir = await mkdtemp(join(tmpdir(), 'cocoon-pghost-'));
  t.after(() => rm(dataDir, { recursive: true, force: true }));
  const server = await startServer({
    ...loadConfig({ COCOON_DATA_DIR: dataDir, COCOON_DATABASE_URL: databaseUrl }),
    apiPort: 0,
  });
  t.after(() => server.close());
  return server;
}

test('two hosts on one PostgreSQL database share the admin key, tenants and API keys', async (t) => {
  const databaseUrl = await postgres.createDatabase('hosts');
  const a = await host(t, databaseUrl);
  assert.ok(a.db instanceof PostgresDb);
  assert.ok(a.newAdminKey, 'the first host made the admin key');
  const b = await host(t, databaseUrl);
  assert.equal(b.newAdminKey, undefined, 'the second host found it in the database');

  const viaA = apiClient(a.apiUrl, a.newAdminKey as string);
  const viaB = apiClient(b.apiUrl, a.newAdminKey as string);
  const created = await viaA('POST', '/tenants', { name: 'team-one' });
  assert.equal(created.status, 201, JSON.stringify(created.body));
  const listed = await viaB('GET', '/tenants');
  assert.equal(listed.status, 200);
  assert.deepEqual(listed.body.items.map((x: { name: string }) => x.name).sort(), ['admin', 'team-one']);

  // The tenant's key, made through A, works on B; a name taken through B is taken for A.
  const tenantKey = created.body.apiKey as string;
  assert.match(tenantKey, /^cocoon_ak_/);
  const asTenant = apiClient(b.apiUrl, tenantKey);
  assert.equal((await asTenant('GET', '/api-keys')).status, 200);
  assert.equal((await viaB('POST', '/tenants', { name: 'team-two' })).status, 201);
  const again = await viaA('POST', '/tenants', { name: 'team-two' });
  assert.equal(again.status, 409);
  assert.equal(again.body.error.code, 'tenant_exists');
});
