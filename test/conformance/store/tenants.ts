import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { isCocoonError } from '../../../src/common/errors.ts';
import { authenticateApiKey, createApiKey, listApiKeys, revokeApiKey } from '../../../src/store/api-keys.ts';
import { findBundle, listBundles, recordBundle } from '../../../src/store/bundles.ts';
import { listEvents } from '../../../src/store/events.ts';
import { isId } from '../../../src/store/ids.ts';
import { createTenant, findTenantByName, getTenant, listTenants } from '../../../src/store/tenants.ts';
import { SqliteDb } from '../../../src/store/sqlite.ts';
import type { StoreSuite } from './suite.ts';

export default function define({ it, tempDb }: StoreSuite): void {
  it('tenants: unique names, 12-digit accounts, validated input', async (t) => {
    const { db } = await tempDb(t);
    const admin = await createTenant(db, { name: 'admin', isAdmin: true });
    assert.ok(isId(admin.id, 'tenant'));
    assert.match(admin.accountId, /^\d{12}$/);
    assert.equal(admin.isAdmin, true);
    assert.deepEqual(await getTenant(db, admin.id), admin);
    assert.deepEqual(await findTenantByName(db, 'admin'), admin);
    await assert.rejects(createTenant(db, { name: 'admin' }), (e) => isCocoonError(e, 'tenant_exists') && e.status === 409);
    for (const name of ['', 'Upper', '-lead', 'a b', 'x'.repeat(64), 'semi;colon']) {
      await assert.rejects(createTenant(db, { name }), (e) => isCocoonError(e, 'invalid_request'), name);
    }
    const other = await createTenant(db, { name: 'team-a' });
    assert.equal(other.isAdmin, false);
    const page = await listTenants(db, { limit: 1 });
    assert.equal(page.items.length, 1);
    const rest = await listTenants(db, { limit: 1, cursor: page.nextCursor });
    assert.deepEqual([...page.items, ...rest.items].map((x) => x.name).sort(), ['admin', 'team-a']);
    assert.equal(rest.nextCursor, null);
    assert.equal((await listEvents(db, { resourceId: admin.id }))[0]?.type, 'created');
  });

  it('API keys: shown once, stored as a hash, revocable', async (t) => {
    const { db } = await tempDb(t);
    const tenant = await createTenant(db, { name: 'acme' });
    const { apiKey, secret } = await createApiKey(db, tenant.id, { name: 'ci' });
    assert.match(secret, /^cocoon_ak_[A-Za-z0-9_-]{43}$/);
    assert.equal(apiKey.prefix, secret.slice(0, 14));
    assert.ok(isId(apiKey.id, 'apiKey'));

    const found = await authenticateApiKey(db, secret);
    assert.equal(found?.tenant.id, tenant.id);
    assert.equal(found?.apiKey.id, apiKey.id);
    assert.ok(found?.apiKey.lastUsedAt);
    for (const wrong of [undefined, '', 'cocoon_ak_nope', secret.slice(0, -1), `${secret}x`, 'x'.repeat(10_000), 42]) {
      assert.equal(await authenticateApiKey(db, wrong), undefined);
    }

    // The secret never reaches the database; its hash does (and on SQLite, not the file either).
    const stored = JSON.stringify(await db.all('SELECT * FROM api_keys'));
    assert.ok(!stored.includes(secret.slice(10)) && stored.includes(apiKey.prefix));
    if (db instanceof SqliteDb) {
      const files = await Promise.all([readFile(db.path), readFile(`${db.path}-wal`).catch(() => Buffer.alloc(0))]);
      assert.ok(!Buffer.concat(files).includes(secret.slice(10)));
    }

    assert.deepEqual((await listApiKeys(db, tenant.id)).map((k) => k.id), [apiKey.id]);
    const other = await createTenant(db, { name: 'other' });
    assert.equal(await revokeApiKey(db, other.id, apiKey.id), false, 'another tenant cannot revoke it');
    assert.equal(await revokeApiKey(db, tenant.id, apiKey.id), true);
    assert.equal(await revokeApiKey(db, tenant.id, apiKey.id), false);
    assert.equal(await authenticateApiKey(db, secret), undefined);
    await assert.rejects(createApiKey(db, 'tnt-00000000000000000000000000'), (e) => isCocoonError(e, 'tenant_not_found'));
  });

  it('lastUsedAt is written at most once a minute', async (t) => {
    const { db } = await tempDb(t);
    const tenant = await createTenant(db, { name: 'busy' });
    const { secret } = await createApiKey(db, tenant.id);
    const t0 = new Date('2026-01-01T00:00:00.000Z');
    assert.equal((await authenticateApiKey(db, secret, t0))?.apiKey.lastUsedAt, t0.toISOString());
    assert.equal((await authenticateApiKey(db, secret, new Date(t0.getTime() + 30_000)))?.apiKey.lastUsedAt, t0.toISOString());
    const t2 = new Date(t0.getTime() + 61_000);
    assert.equal((await authenticateApiKey(db, secret, t2))?.apiKey.lastUsedAt, t2.toISOString());
  });

  it('bundles: one row per tenant and content, idempotent', async (t) => {
    const { db } = await tempDb(t);
    const a = await createTenant(db, { name: 'a' });
    const b = await createTenant(db, { name: 'b' });
    const sha = 'ab'.repeat(32);
    const input = { sha256: sha, format: 'tar.gz' as const, sizeBytes: 123, uri: `cocoon://bundles/${sha}.tar.gz` };
    const first = await recordBundle(db, { tenantId: a.id, ...input });
    assert.deepEqual(await recordBundle(db, { tenantId: a.id, ...input }), first);
    assert.equal((await findBundle(db, a.id, sha))?.id, first.id);
    assert.equal(await findBundle(db, b.id, sha), undefined, 'b has not uploaded it');
    const forB = await recordBundle(db, { tenantId: b.id, ...input });
    assert.notEqual(forB.id, first.id);
    assert.deepEqual((await listBundles(db, a.id)).items.map((x) => x.id), [first.id]);
  });
}
