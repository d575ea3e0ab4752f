import assert from 'node:assert/strict';
import { isCocoonError } from '../../../src/common/errors.ts';
import { listEvents } from '../../../src/store/events.ts';
import { isId } from '../../../src/store/ids.ts';
import { createImage } from '../../../src/store/images.ts';
import {
  claimMicrovm, createMicrovm, findMicrovmByClientToken, findTenantMicrovm, getMicrovm, listExpiredMicrovms, listMicrovms,
  listHostMicrovms, listMicrovmsInStates, setMicrovmRuntime, touchMicrovmActivity, transitionMicrovm, type NewMicrovm,
} from '../../../src/store/microvms.ts';
import { imageInput, readyImage, someTenant } from '../../store/helpers.ts';
import type { StoreSuite } from './suite.ts';

export default function define({ it, tempDb, dialect }: StoreSuite): void {
  const POLICY = { autoResumeEnabled: true, maxIdleDurationSeconds: 300, suspendedDurationSeconds: null };

  function start(tenantId: string, imageId: string, overrides: Partial<NewMicrovm> = {}): NewMicrovm {
    return { tenantId, region: 'local', imageId, idlePolicy: POLICY, maximumDurationSeconds: 3600, ...overrides };
  }

  it('a microVM copies its image resources and gets an ARN and a session end', async (t) => {
    const { db } = await tempDb(t);
    const tenant = await someTenant(db);
    const image = await readyImage(db, tenant.id, { vcpus: 2, memoryMiB: 512, diskMiB: 2048, port: 3000, networkEgress: true });
    const now = new Date('2026-05-01T10:00:00.000Z');
    const { microvm, created } = await createMicrovm(db, start(tenant.id, image.id, { now, maximumDurationSeconds: 28_800 }));
    assert.equal(created, true);
    assert.ok(isId(microvm.id, 'microvm'));
    assert.match(microvm.id, /^[a-z0-9-]{1,63}$/, 'usable as a DNS label');
    assert.equal(microvm.arn, `arn:cocoon:local:${tenant.accountId}:microvm/${microvm.id}`);
    assert.equal(microvm.imageArn, image.arn);
    assert.equal(microvm.state, 'PENDING');
    assert.deepEqual([microvm.vcpus, microvm.memoryMiB, microvm.diskMiB, microvm.port], [2, 512, 2048, 3000]);
    assert.equal(microvm.networkEgress, true);
    assert.deepEqual(microvm.idlePolicy, POLICY);
    assert.equal(microvm.expiresAt, '2026-05-01T18:00:00.000Z');
    assert.equal(microvm.lastActivityAt, now.toISOString());
    assert.deepEqual(await getMicrovm(db, microvm.id), microvm);
    assert.deepEqual(await findTenantMicrovm(db, tenant.id, microvm.arn), microvm);
    assert.equal(await findTenantMicrovm(db, (await someTenant(db)).id, microvm.id), undefined);
  });

  it('only a READY image of the same tenant can start a microVM; limits are checked', async (t) => {
    const { db } = await tempDb(t);
    const tenant = await someTenant(db);
    const pending = await createImage(db, imageInput(tenant.id));
    await assert.rejects(createMicrovm(db, start(tenant.id, pending.id)), (e) => isCocoonError(e, 'image_not_ready') && e.status === 409);
    const ready = await readyImage(db, tenant.id);
    const stranger = await someTenant(db);
    await assert.rejects(createMicrovm(db, start(stranger.id, ready.id)), (e) => isCocoonError(e, 'image_not_found') && e.status === 404);
    const bad: Array<Partial<NewMicrovm>> = [
      { maximumDurationSeconds: 28_801 }, { maximumDurationSeconds: 0 },
      { idlePolicy: { ...POLICY, maxIdleDurationSeconds: 0 } },
      { idlePolicy: { ...POLICY, suspendedDurationSeconds: 0 } },
      { idlePolicy: { ...POLICY, autoResumeEnabled: 'yes' as never } },
      { clientToken: '' }, { clientToken: 'x'.repeat(65) }, { clientToken: 'has space' },
    ];
    for (const override of bad) {
      await assert.rejects(createMicrovm(db, start(tenant.id, ready.id, override)), (e) => isCocoonError(e, 'invalid_request'), JSON.stringify(override));
    }
  });

  it('clientToken makes a start idempotent per tenant', async (t) => {
    const { db } = await tempDb(t);
    const tenant = await someTenant(db);
    const image = await readyImage(db, tenant.id);
    const first = await createMicrovm(db, start(tenant.id, image.id, { clientToken: 'retry-1', clientRequestHash: 'h1' }));
    const again = await createMicrovm(db, start(tenant.id, image.id, { clientToken: 'retry-1', clientRequestHash: 'h1' }));
    assert.equal(again.created, false);
    assert.equal(again.microvm.id, first.microvm.id);
    // Concurrent retries: exactly one microVM.
    const racing = await Promise.all(Array.from({ length: 5 }, () => createMicrovm(db, start(tenant.id, image.id, { clientToken: 'race' }))));
    assert.equal(new Set(racing.map((r) => r.microvm.id)).size, 1);
    assert.equal(racing.filter((r) => r.created).length, 1);

    await assert.rejects(
      createMicrovm(db, start(tenant.id, image.id, { clientToken: 'retry-1', clientRequestHash: 'h2' })),
      (e) => isCocoonError(e, 'idempotency_conflict') && e.status === 409,
    );
    assert.equal((await findMicrovmByClientToken(db, tenant.id, 'retry-1'))?.id, first.microvm.id);
    // The same token from another tenant is another microVM.
    const other = await someTenant(db);
    const otherImage = await readyImage(db, other.id);
    const theirs = await createMicrovm(db, start(other.id, otherImage.id, { clientToken: 'retry-1' }));
    assert.equal(theirs.created, true);
    assert.notEqual(theirs.microvm.id, first.microvm.id);
  });

  it('transitions are compare-and-set, keep timestamps right and are logged', async (t) => {
    const { db } = await tempDb(t);
    const tenant = await someTenant(db);
    const image = await readyImage(db, tenant.id);
    const { microvm } = await createMicrovm(db, start(tenant.id, image.id));
    const at = (s: number) => new Date(Date.parse('2030-01-01T00:00:00.000Z') + s * 1000);

    assert.equal(await transitionMicrovm(db, microvm.id, 'RUNNING', 'SUSPENDING'), false);
    assert.equal(await transitionMicrovm(db, microvm.id, 'PENDING', 'RUNNING', { runtime: { pid: 42 }, now: at(0) }), true);
    assert.equal(await transitionMicrovm(db, microvm.id, 'RUNNING', 'SUSPENDING', { now: at(1) }), true);
    assert.equal(await transitionMicrovm(db, microvm.id, 'SUSPENDING', 'SUSPENDED', { runtime: {}, now: at(2) }), true);
    let vm = await getMicrovm(db, microvm.id);
    assert.equal(vm?.suspendedAt, at(2).toISOString());
    assert.deepEqual(vm?.runtime, {});

    assert.equal(await transitionMicrovm(db, microvm.id, 'SUSPENDED', 'RESUMING', { now: at(3) }), true);
    assert.equal(await transitionMicrovm(db, microvm.id, 'RESUMING', 'RUNNING', { now: at(4) }), true);
    vm = await getMicrovm(db, microvm.id);
    assert.equal(vm?.suspendedAt, null);
    assert.equal(vm?.lastActivityAt, at(4).toISOString());

    assert.equal(await transitionMicrovm(db, microvm.id, ['RUNNING', 'SUSPENDED'], 'FAILED', { error: 'qemu exited', now: at(5) }), true);
    vm = await getMicrovm(db, microvm.id);
    assert.equal(vm?.error, 'qemu exited');
    assert.equal(vm?.terminatedAt, at(5).toISOString());
    assert.equal(await transitionMicrovm(db, microvm.id, 'RUNNING', 'TERMINATING'), false);

    const events = await listEvents(db, { resourceType: 'microvm', resourceId: microvm.id });
    assert.deepEqual(events.map((e) => e.toState), ['PENDING', 'RUNNING', 'SUSPENDING', 'SUSPENDED', 'RESUMING', 'RUNNING', 'FAILED']);
  });

  it('concurrent transitions from the same state: exactly one wins', async (t) => {
    const { db } = await tempDb(t);
    const tenant = await someTenant(db);
    const image = await readyImage(db, tenant.id);
    const { microvm } = await createMicrovm(db, start(tenant.id, image.id));
    await transitionMicrovm(db, microvm.id, 'PENDING', 'RUNNING');
    const results = await Promise.all([
      transitionMicrovm(db, microvm.id, 'RUNNING', 'SUSPENDING'),
      transitionMicrovm(db, microvm.id, 'RUNNING', 'TERMINATING'),
      transitionMicrovm(db, microvm.id, 'RUNNING', 'SUSPENDING'),
    ]);
    // Exactly one wins, and the state is the winner's. A single SQLite connection serves them
    // in the order issued, so there the first one wins; PostgreSQL's pool may run them in any order.
    assert.equal(results.filter(Boolean).length, 1);
    const winner = results.indexOf(true);
    assert.equal((await getMicrovm(db, microvm.id))?.state, winner === 1 ? 'TERMINATING' : 'SUSPENDING');
    if (dialect === 'sqlite') assert.deepEqual(results, [true, false, false]);
  });

  it('activity only moves forward; runtime can be replaced', async (t) => {
    const { db } = await tempDb(t);
    const tenant = await someTenant(db);
    const image = await readyImage(db, tenant.id);
    const now = new Date('2026-01-01T00:00:00.000Z');
    const { microvm } = await createMicrovm(db, start(tenant.id, image.id, { now }));
    assert.equal(await touchMicrovmActivity(db, microvm.id, new Date(now.getTime() + 5000)), true);
    assert.equal(await touchMicrovmActivity(db, microvm.id, new Date(now.getTime() + 1000)), false);
    assert.equal((await getMicrovm(db, microvm.id))?.lastActivityAt, new Date(now.getTime() + 5000).toISOString());
    assert.equal(await setMicrovmRuntime(db, microvm.id, { hostPort: 41000, qmp: '/run/x.sock' }), true);
    assert.deepEqual((await getMicrovm(db, microvm.id))?.runtime, { hostPort: 41000, qmp: '/run/x.sock' });
  });

  it('listing by state and image with pages; active and expired microVMs for lifecycle', async (t) => {
    const { db } = await tempDb(t);
    const tenant = await someTenant(db);
    const a = await readyImage(db, tenant.id, { name: 'a' });
    const b = await readyImage(db, tenant.id, { name: 'b' });
    const now = new Date('2026-01-01T00:00:00.000Z');
    const vms = [];
    for (let i = 0; i < 5; i++) {
      vms.push((await createMicrovm(db, start(tenant.id, i < 3 ? a.id : b.id, { now, maximumDurationSeconds: 60 * (i + 1) }))).microvm);
    }
    await transitionMicrovm(db, vms[0]!.id, 'PENDING', 'RUNNING');
    await transitionMicrovm(db, vms[1]!.id, 'PENDING', 'TERMINATED');

    assert.deepEqual((await listMicrovms(db, { tenantId: tenant.id, imageId: b.id })).items.map((v) => v.id), [vms[4]!.id, vms[3]!.id]);
    assert.deepEqual((await listMicrovms(db, { tenantId: tenant.id, state: 'RUNNING' })).items.map((v) => v.id), [vms[0]!.id]);
    assert.equal((await listMicrovms(db, { tenantId: tenant.id, state: ['PENDING', 'RUNNING'], imageId: a.id })).items.length, 2);
    const page1 = await listMicrovms(db, { tenantId: tenant.id, limit: 2 });
    const page2 = await listMicrovms(db, { tenantId: tenant.id, limit: 2, cursor: page1.nextCursor });
    const page3 = await listMicrovms(db, { tenantId: tenant.id, limit: 2, cursor: page2.nextCursor });
    assert.deepEqual([...page1.items, ...page2.items, ...page3.items].map((v) => v.id), vms.map((v) => v.id).reverse());
    assert.equal(page3.nextCursor, null);

    assert.deepEqual((await listMicrovmsInStates(db)).map((v) => v.id), [vms[0]!.id, vms[2]!.id, vms[3]!.id, vms[4]!.id]);
    // Sessions of 60..300 s from `now`; at now+180 s the ones of 60, 120 (terminated, skipped) and 180 s have ended.
    const expired = await listExpiredMicrovms(db, new Date(now.getTime() + 180_000));
    assert.deepEqual(expired.map((v) => v.id), [vms[0]!.id, vms[2]!.id]);
  });

  it('a microVM is claimed by one host: the first wins, and each host lists its own and unclaimed rows', async (t) => {
    const { db } = await tempDb(t);
    const tenant = await someTenant(db);
    const image = await readyImage(db, tenant.id);
    const [a, b, free] = [
      (await createMicrovm(db, start(tenant.id, image.id))).microvm,
      (await createMicrovm(db, start(tenant.id, image.id))).microvm,
      (await createMicrovm(db, start(tenant.id, image.id))).microvm,
    ];
    assert.equal(a.hostId, null);
    const racing = await Promise.all([claimMicrovm(db, a.id, 'host-a'), claimMicrovm(db, a.id, 'host-b')]);
    assert.deepEqual(racing.filter(Boolean).length, 1, 'exactly one host wins a race');
    const owner = racing[0] ? 'host-a' : 'host-b';
    assert.equal((await getMicrovm(db, a.id))?.hostId, owner);
    assert.equal(await claimMicrovm(db, a.id, owner), true, 'claiming again is a no-op');
    assert.ok(await claimMicrovm(db, b.id, owner === 'host-a' ? 'host-b' : 'host-a'));
    assert.ok(await transitionMicrovm(db, free.id, 'PENDING', 'SUSPENDED'));
    assert.deepEqual((await listHostMicrovms(db, owner)).map((m) => m.id), [a.id, free.id]);
    assert.deepEqual((await listHostMicrovms(db, owner, ['SUSPENDED'])).map((m) => m.id), [free.id]);
  });
}
