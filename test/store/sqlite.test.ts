import assert from 'node:assert/strict';
import { stat } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { isCocoonError } from '../../src/common/errors.ts';
import { migrate, MIGRATIONS, type Migration } from '../../src/store/migrations.ts';
import { openMetadataStore } from '../../src/store/open.ts';
import { SqliteDb } from '../../src/store/sqlite.ts';
import { quiet, someTenant, tempDataDir, tempDb } from './helpers.ts';

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

test('reopening an existing database keeps its data and applies nothing twice', async (t) => {
  const dir = await tempDataDir(t);
  const first = await openMetadataStore(dir, { logger: quiet });
  const tenant = await someTenant(first.db, 'kept');
  first.db.close();

  const second = await openMetadataStore(dir, { logger: quiet });
  t.after(() => second.db.close());
  assert.deepEqual(second.migrations.applied, []);
  assert.equal(second.migrations.version, MIGRATIONS.length);
  const rows = await second.db.all<{ version: number }>('SELECT version FROM schema_migrations');
  assert.equal(rows.length, MIGRATIONS.length);
  assert.equal((await second.db.get<{ name: string }>('SELECT name FROM tenants WHERE id = ?', [tenant.id]))?.name, 'kept');
  // And a third time, through migrate() directly.
  assert.deepEqual((await migrate(second.db)).applied, []);
});

test('a later migration is applied on reopen; a failing one changes nothing', async (t) => {
  const dir = await tempDataDir(t);
  const db = SqliteDb.open(join(dir, 'cocoon.db'));
  t.after(() => db.close());
  await migrate(db);
  const next: Migration = { version: MIGRATIONS.length + 1, name: 'notes', sql: 'CREATE TABLE notes (id TEXT PRIMARY KEY)' };
  const broken: Migration = { version: MIGRATIONS.length + 2, name: 'broken', sql: 'CREATE TABLE more (id TEXT); SELECT * FROM nowhere' };

  await assert.rejects(migrate(db, [...MIGRATIONS, next, broken]), /nowhere/);
  // Both pending steps ran in one transaction: neither is there.
  assert.equal(await db.get("SELECT 1 FROM sqlite_master WHERE name IN ('notes', 'more')"), undefined);
  assert.equal((await db.all('SELECT version FROM schema_migrations')).length, MIGRATIONS.length);

  assert.deepEqual((await migrate(db, [...MIGRATIONS, next])).applied, [next.version]);
  assert.ok(await db.get("SELECT 1 FROM sqlite_master WHERE name = 'notes'"));
});

test('a database from a newer Cocoon, or with a different history, is refused', async (t) => {
  const { db } = await tempDb(t);
  await db.run("INSERT INTO schema_migrations (version, name, applied_at) VALUES (999, 'future', '2030-01-01T00:00:00.000Z')");
  await assert.rejects(migrate(db), (e) => isCocoonError(e, 'database_too_new') && /999/.test(e.message));
  await db.run('DELETE FROM schema_migrations WHERE version = 999');
  await db.run("UPDATE schema_migrations SET name = 'something else' WHERE version = 1");
  await assert.rejects(migrate(db), (e) => isCocoonError(e, 'database_schema_mismatch'));
  await assert.rejects(migrate(db, [{ version: 2, name: 'x', sql: '' }]), /in order/);
});

test('a transaction commits or rolls back as a whole, and nested ones use savepoints', async (t) => {
  const { db } = await tempDb(t);
  await assert.rejects(db.transaction(async (tx) => {
    await someTenant(tx, 'rolled-back');
    throw new Error('boom');
  }), /boom/);
  assert.equal(await db.get("SELECT 1 FROM tenants WHERE name = 'rolled-back'"), undefined);

  await db.transaction(async (tx) => {
    await someTenant(tx, 'outer');
    await assert.rejects(tx.transaction(async (inner) => {
      await someTenant(inner, 'inner');
      throw new Error('inner fails');
    }));
  });
  assert.ok(await db.get("SELECT 1 FROM tenants WHERE name = 'outer'"));
  assert.equal(await db.get("SELECT 1 FROM tenants WHERE name = 'inner'"), undefined);
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
