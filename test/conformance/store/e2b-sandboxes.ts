import assert from 'node:assert/strict';
import {
  deleteSandbox, getSandbox, getTenantSandbox, insertSandbox, listAllSandboxes, listTenantSandboxes, setSandboxEnd, setSandboxPaused,
  type E2bSandbox,
} from '../../../src/compat/e2b/store.ts';
import { createMicrovm } from '../../../src/store/microvms.ts';
import { readyImage, someTenant } from '../../store/helpers.ts';
import type { StoreSuite } from './suite.ts';

export default function define({ it, tempDb }: StoreSuite): void {
  it('E2B sandbox records: booleans and JSON round-trip, scoped to the tenant, gone with their microVM', async (t) => {
    const { db } = await tempDb(t);
    const tenant = await someTenant(db);
    const image = await readyImage(db, tenant.id);
    const { microvm } = await createMicrovm(db, {
      tenantId: tenant.id, region: 'local', imageId: image.id, maximumDurationSeconds: 600,
      idlePolicy: { autoResumeEnabled: true, maxIdleDurationSeconds: 300, suspendedDurationSeconds: null },
    });
    const sandbox: E2bSandbox = {
      microvmId: microvm.id, tenantId: tenant.id, templateId: 'base', alias: null,
      metadata: { owner: 'ci', 'ünï': 'cödé' }, envs: { A: '1' },
      autoPause: true, autoResume: false, paused: false,
      startedAt: '2026-01-01T00:00:00.000Z', endAt: '2026-01-01T00:05:00.000Z',
    };
    await insertSandbox(db, sandbox);
    assert.deepEqual(await getSandbox(db, microvm.id), sandbox);
    assert.equal(await getTenantSandbox(db, (await someTenant(db)).id, microvm.id), undefined);
    await setSandboxPaused(db, microvm.id, true);
    await setSandboxEnd(db, microvm.id, '2026-01-01T00:10:00.000Z');
    const changed = await getTenantSandbox(db, tenant.id, microvm.id);
    assert.equal(changed?.paused, true);
    assert.equal(changed?.endAt, '2026-01-01T00:10:00.000Z');
    assert.deepEqual((await listTenantSandboxes(db, tenant.id)).map((s) => s.microvmId), [microvm.id]);
    assert.equal((await listAllSandboxes(db)).length, 1);
    await deleteSandbox(db, microvm.id);
    assert.equal(await getSandbox(db, microvm.id), undefined);
    // The record cascades with its microVM.
    await insertSandbox(db, sandbox);
    await db.run('DELETE FROM microvms WHERE id = ?', [microvm.id]);
    assert.equal(await getSandbox(db, microvm.id), undefined);
  });
}
