import assert from 'node:assert/strict';
import { listEvents } from '../../../src/store/events.ts';
import { migrate } from '../../../src/store/migrations.ts';
import { createMicrovm, getMicrovm, transitionMicrovm } from '../../../src/store/microvms.ts';
import { createTenant, listTenants } from '../../../src/store/tenants.ts';
import type { Db } from '../../../src/store/sql.ts';
import { readyImage, someTenant } from '../../store/helpers.ts';
import type { StoreSuite } from './suite.ts';

export default function define({ it, tempDb, emptyDb, restartServer }: StoreSuite): void {
  it('a transaction commits or rolls back as a whole, and nested ones use savepoints', async (t) => {
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

  it('statements outside a transaction neither see nor join it; its handle dies with it', async (t) => {
    const { db } = await tempDb(t);
    let insideDone = false;
    let wrote!: () => void;
    const written = new Promise<void>((resolve) => { wrote = resolve; });
    const transaction = db.transaction(async (tx) => {
      await tx.run("INSERT INTO tenants (id, name, account_id, created_at) VALUES ('tnt-x', 'x', '123456789012', '2026-01-01T00:00:00.000Z')");
      wrote();
      await new Promise((resolve) => setTimeout(resolve, 30));
      insideDone = true;
      throw new Error('abort after a pause');
    });
    await written;
    // Issued while the transaction is open: it must not see (or be rolled back with) its row.
    const outside = db.get<{ n: number }>('SELECT count(*) AS n FROM tenants');
    await assert.rejects(transaction, /abort after a pause/);
    assert.equal(insideDone, true);
    assert.equal((await outside)?.n, 0);

    await db.transaction(async () => {
      await assert.rejects(async () => db.get('SELECT 1'), /use the transaction handle/);
    });
    let stale: Db | undefined;
    await db.transaction(async (tx) => { stale = tx; });
    await assert.rejects((stale as Db).get('SELECT 1'), /already ended/);
  });

  it('concurrent read-then-write transactions lose no update', async (t) => {
    const { db } = await tempDb(t);
    const tenant = await someTenant(db);
    await db.run('INSERT INTO image_versions (tenant_id, name, last_version) VALUES (?, ?, 0)', [tenant.id, 'counter']);
    const bump = () => db.transaction(async (tx) => {
      const row = await tx.get<{ last_version: number }>('SELECT last_version FROM image_versions WHERE tenant_id = ? AND name = ?', [tenant.id, 'counter']);
      await new Promise((resolve) => setImmediate(resolve));
      await tx.run('UPDATE image_versions SET last_version = ? WHERE tenant_id = ? AND name = ?', [(row?.last_version ?? 0) + 1, tenant.id, 'counter']);
    });
    await Promise.all(Array.from({ length: 8 }, bump));
    const final = await db.get<{ last_version: number }>('SELECT last_version FROM image_versions WHERE tenant_id = ? AND name = ?', [tenant.id, 'counter']);
    assert.equal(final?.last_version, 8);
  });

  it('racing creates of one unique name: one wins, the others get the documented error', async (t) => {
    const { db } = await tempDb(t);
    const results = await Promise.allSettled(Array.from({ length: 4 }, () => createTenant(db, { name: 'same' })));
    assert.equal(results.filter((r) => r.status === 'fulfilled').length, 1);
    for (const r of results) {
      if (r.status === 'rejected') assert.equal((r.reason as { code?: string }).code, 'tenant_exists');
    }
    assert.equal((await listTenants(db)).items.length, 1);
  });

  it('the server restarting: the pool reconnects and nothing committed is lost', async (t) => {
    const { db } = await tempDb(t);
    const tenant = await someTenant(db, 'before-restart');
    await (restartServer as () => Promise<void>)();
    // The pool's idle connections died with the server; the next statements get new ones
    // (one statement may meet a dropped connection first: the caller's retry is the API's 5xx).
    let tenants: Awaited<ReturnType<typeof listTenants>> | undefined;
    for (let attempt = 0; attempt < 3 && tenants === undefined; attempt++) {
      tenants = await listTenants(db).catch(() => undefined);
    }
    assert.deepEqual(tenants?.items.map((x) => x.id), [tenant.id]);
    await someTenant(db, 'after-restart');
    assert.equal((await listTenants(db)).items.length, 2);
  });

  it('two handles on one database (two hosts) racing a compare-and-set: exactly one wins', async (t) => {
    const where = await emptyDb(t);
    const hostA = await where.open();
    await migrate(hostA);
    const hostB = await where.open();
    const tenant = await someTenant(hostA);
    const image = await readyImage(hostA, tenant.id);
    const { microvm } = await createMicrovm(hostA, {
      tenantId: tenant.id, region: 'local', imageId: image.id, maximumDurationSeconds: 600,
      idlePolicy: { autoResumeEnabled: true, maxIdleDurationSeconds: 300, suspendedDurationSeconds: null },
    });
    assert.equal(await transitionMicrovm(hostB, microvm.id, 'PENDING', 'RUNNING'), true);
    const targets = ['SUSPENDING', 'TERMINATING', 'SUSPENDING', 'FAILED', 'TERMINATING', 'SUSPENDING'] as const;
    const results = await Promise.all(targets.map((to, i) => transitionMicrovm(i % 2 === 0 ? hostA : hostB, microvm.id, 'RUNNING', to)));
    assert.equal(results.filter(Boolean).length, 1);
    const winner = targets[results.indexOf(true)];
    assert.equal((await getMicrovm(hostA, microvm.id))?.state, winner);
    assert.equal((await getMicrovm(hostB, microvm.id))?.state, winner);
    const moves = (await listEvents(hostB, { resourceId: microvm.id })).filter((e) => e.fromState === 'RUNNING');
    assert.deepEqual(moves.map((e) => e.toState), [winner], 'one move out of RUNNING in the log');
  });
}
