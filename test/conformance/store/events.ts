import assert from 'node:assert/strict';
import { isCocoonError } from '../../../src/common/errors.ts';
import { appendEvent, listEvents } from '../../../src/store/events.ts';
import { someTenant } from '../../store/helpers.ts';
import type { StoreSuite } from './suite.ts';

export default function define({ it, tempDb }: StoreSuite): void {
  it('events: ids count up; filters, afterId and limit follow the log; data and long messages round-trip', async (t) => {
    const { db } = await tempDb(t);
    const a = await someTenant(db);
    const b = await someTenant(db);
    const at = new Date('2026-03-01T00:00:00.000Z');
    for (let i = 0; i < 5; i++) {
      await appendEvent(db, {
        tenantId: i % 2 === 0 ? a.id : b.id, resourceType: 'microvm', resourceId: `mvm-${i % 2}`, type: 'state_changed',
        fromState: 'RUNNING', toState: 'SUSPENDED', message: i === 4 ? 'x'.repeat(5000) : `step ${i}`,
        data: { step: i, nested: { ok: true } }, now: at,
      });
    }
    const all = await listEvents(db, { resourceType: 'microvm' });
    assert.equal(all.length, 5);
    assert.deepEqual(all.map((e) => e.id), [...all.map((e) => e.id)].sort((x, y) => x - y), 'oldest first');
    assert.ok(all.every((e) => Number.isSafeInteger(e.id)));
    assert.deepEqual(all[1]?.data, { step: 1, nested: { ok: true } });
    assert.equal(all[4]?.message?.length, 4000, 'messages are bounded');
    assert.equal(all[0]?.createdAt, at.toISOString());

    assert.deepEqual((await listEvents(db, { resourceType: 'microvm', resourceId: 'mvm-1' })).map((e) => e.data.step), [1, 3]);
    assert.deepEqual((await listEvents(db, { resourceType: 'microvm', tenantId: a.id })).map((e) => e.data.step), [0, 2, 4]);
    const first = await listEvents(db, { resourceType: 'microvm', limit: 2 });
    const next = await listEvents(db, { resourceType: 'microvm', afterId: (first.at(-1) as { id: number }).id, limit: 2 });
    assert.deepEqual([...first, ...next].map((e) => e.data.step), [0, 1, 2, 3]);
    // Tenant creations are events too (resourceType 'tenant').
    assert.deepEqual((await listEvents(db, { resourceType: 'tenant' })).map((e) => e.resourceId), [a.id, b.id]);
    await assert.rejects(listEvents(db, { limit: 0 }), (e) => isCocoonError(e, 'invalid_request'));
    await assert.rejects(listEvents(db, { afterId: 1.5 }), (e) => isCocoonError(e, 'invalid_request'));
  });
}
