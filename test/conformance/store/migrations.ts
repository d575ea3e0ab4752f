import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { isCocoonError } from '../../../src/common/errors.ts';
import { migrate, MIGRATIONS, type Migration } from '../../../src/store/migrations.ts';
import { openMetadataStore } from '../../../src/store/open.ts';
import { quiet, someTenant } from '../../store/helpers.ts';
import type { StoreSuite } from './suite.ts';

const run = promisify(execFile);
const CHILD = fileURLToPath(new URL('./migrate-child.ts', import.meta.url));

export default function define({ it, tempDb, emptyDb, tables }: StoreSuite): void {
  it('a new database gets the whole schema; reopening keeps its data and applies nothing twice', async (t) => {
    const where = await emptyDb(t);
    const first = await openMetadataStore(where.dataDir, { logger: quiet, databaseUrl: where.databaseUrl });
    assert.deepEqual(first.migrations, { applied: MIGRATIONS.map((m) => m.version), version: MIGRATIONS.length });
    const present = await tables(first.db);
    for (const table of ['api_keys', 'bundles', 'e2b_sandboxes', 'events', 'hosts', 'image_versions', 'images', 'microvms', 'schema_migrations', 'tenants', 'tokens']) {
      assert.ok(present.includes(table), `table ${table}`);
    }
    const tenant = await someTenant(first.db, 'kept');
    await first.db.close();

    const second = await openMetadataStore(where.dataDir, { logger: quiet, databaseUrl: where.databaseUrl });
    t.after(() => second.db.close());
    assert.deepEqual(second.migrations.applied, []);
    assert.equal(second.migrations.version, MIGRATIONS.length);
    const rows = await second.db.all<{ version: number }>('SELECT version FROM schema_migrations');
    assert.equal(rows.length, MIGRATIONS.length);
    assert.equal((await second.db.get<{ name: string }>('SELECT name FROM tenants WHERE id = ?', [tenant.id]))?.name, 'kept');
    // And a third time, through migrate() directly.
    assert.deepEqual((await migrate(second.db)).applied, []);
  });

  it('a later migration is applied on reopen; a failing one changes nothing', async (t) => {
    const db = await (await emptyDb(t)).open();
    await migrate(db);
    const next: Migration = { version: MIGRATIONS.length + 1, name: 'notes', sql: 'CREATE TABLE notes (id TEXT PRIMARY KEY)' };
    const broken: Migration = { version: MIGRATIONS.length + 2, name: 'broken', sql: 'CREATE TABLE more (id TEXT); SELECT * FROM nowhere' };

    await assert.rejects(migrate(db, [...MIGRATIONS, next, broken]), /nowhere/);
    // Both pending steps ran in one transaction: neither is there.
    const after = await tables(db);
    assert.ok(!after.includes('notes') && !after.includes('more'));
    assert.equal((await db.all('SELECT version FROM schema_migrations')).length, MIGRATIONS.length);

    assert.deepEqual((await migrate(db, [...MIGRATIONS, next])).applied, [next.version]);
    assert.ok((await tables(db)).includes('notes'));
  });

  it('a database from a newer Cocoon, or with a different history, is refused', async (t) => {
    const { db } = await tempDb(t);
    await db.run("INSERT INTO schema_migrations (version, name, applied_at) VALUES (999, 'future', '2030-01-01T00:00:00.000Z')");
    await assert.rejects(migrate(db), (e) => isCocoonError(e, 'database_too_new') && /999/.test(e.message));
    await db.run('DELETE FROM schema_migrations WHERE version = 999');
    await db.run("UPDATE schema_migrations SET name = 'something else' WHERE version = 1");
    await assert.rejects(migrate(db), (e) => isCocoonError(e, 'database_schema_mismatch'));
    await assert.rejects(migrate(db, [{ version: 2, name: 'x', sql: '' }]), /in order/);
  });

  it('processes migrating one database at once take turns: one applies, the others wait and find it done', async (t) => {
    const where = await emptyDb(t);
    const startAt = Date.now() + 1500; // after every child has started up
    const children = await Promise.all(Array.from({ length: 3 }, () =>
      run(process.execPath, ['--disable-warning=ExperimentalWarning', CHILD, where.dataDir, where.databaseUrl ?? '', String(startAt)], { timeout: 120_000 })));
    const applied = children.map((c) => JSON.parse(c.stdout) as number[]).sort((a, b) => b.length - a.length);
    assert.deepEqual(applied, [[...MIGRATIONS.map((m) => m.version), MIGRATIONS.length + 1], [], []]);
    const db = await where.open();
    assert.equal((await db.all('SELECT version FROM schema_migrations')).length, MIGRATIONS.length + 1);
    assert.equal((await db.get<{ n: number }>('SELECT n FROM lock_probe'))?.n, 300_000);
  });
}
