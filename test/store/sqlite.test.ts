import assert from 'node:assert/strict';
import { stat } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { MIGRATIONS } from '../../src/store/migrations.ts';
import { openMetadataStore } from '../../src/store/open.ts';
import { SqliteDb } from '../../src/store/sqlite.ts';
import { quiet, tempDataDir, tempDb } from './helpers.ts';

test('a new database is private, in WAL mode, with foreign keys on and the schema applied', async (t) => {
  const dir = await tempDataDir(t);
  const { db: opened, migrations } = await openMetadataStore(dir, { logger: quiet });
  t.after(() => opened.close());
  assert.ok(opened instanceof SqliteDb, 'SQLite is the default');
  const db = opened;
  assert.deepEqual(migrations, { applied: MIGRATIONS.map((m) => m.version), version: MIGRATIONS.length });
  assert.equal(db.path, join(dir, 'cocoon.db'));
  assert.equal((await stat(db.path)).mode & 0o777, 0o600);
  assert.equal(db.pragma('journal_mode'), 'wal');
  assert.equal(db.pragma('foreign_keys'), 1);
  const tables = (await db.all<{ name: string }>("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")).map((r) => r.name);
  for (const table of ['api_keys', 'bundles', 'events', 'image_versions', 'images', 'microvms', 'schema_migrations', 'tenants', 'tokens']) {
    assert.ok(tables.includes(table), `table ${table}`);
  }
});

test('statements outside a transaction wait for it instead of joining it', async (t) => {
  const { db } = await tempDb(t);
  let insideDone = false;
  const transaction = db.transaction(async (tx) => {
    await tx.run("INSERT INTO tenants (id, name, account_id, created_at) VALUES ('tnt-x', 'x', '123456789012', '2026-01-01T00:00:00.000Z')");
    await new Promise((resolve) => setTimeout(resolve, 30));
    insideDone = true;
    throw new Error('abort after a pause');
  });
  // Issued while the transaction is open: it must not see (or be rolled back with) its row.
  const outside = db.get<{ n: number }>('SELECT count(*) AS n FROM tenants');
  await assert.rejects(transaction, /abort after a pause/);
  assert.equal(insideDone, true);
  assert.equal((await outside)?.n, 0);

  await db.transaction(async () => {
    await assert.rejects(db.get('SELECT 1'), /use the transaction handle/);
  });
  let stale: import('../../src/store/sql.ts').Db | undefined;
  await db.transaction(async (tx) => { stale = tx; });
  await assert.rejects((stale as import('../../src/store/sql.ts').Db).get('SELECT 1'), /already ended/);
});
