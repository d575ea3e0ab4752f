import assert from 'node:assert/strict';
import { isCocoonError } from '../../../src/common/errors.ts';
import { listEvents } from '../../../src/store/events.ts';
import { isId } from '../../../src/store/ids.ts';
import {
  createImage, deleteImage, findTenantImage, getImage, listImages, listImagesInStates, setImageBuildLogPath, transitionImage,
} from '../../../src/store/images.ts';
import { createMicrovm, transitionMicrovm } from '../../../src/store/microvms.ts';
import { imageInput, readyImage, someTenant } from '../../store/helpers.ts';
import type { StoreSuite } from './suite.ts';

export default function define({ it, tempDb }: StoreSuite): void {
  const POLICY = { autoResumeEnabled: true, maxIdleDurationSeconds: 300, suspendedDurationSeconds: null };

  it('an image gets an id, an ARN and the next version for its name', async (t) => {
    const { db } = await tempDb(t);
    const tenant = await someTenant(db);
    const now = new Date('2026-03-04T05:06:07.089Z');
    const image = await createImage(db, imageInput(tenant.id, { now }));
    assert.ok(isId(image.id, 'image'));
    assert.equal(image.version, 1);
    assert.equal(image.arn, `arn:cocoon:local:${tenant.accountId}:microvm-image/web:1`);
    assert.equal(image.state, 'PENDING');
    assert.equal(image.error, null);
    assert.equal(image.createdAt, '2026-03-04T05:06:07.089Z');
    assert.deepEqual(image.readiness, { httpPath: '/health', timeoutSeconds: 120 });
    assert.deepEqual(await getImage(db, image.id), image);

    assert.equal((await createImage(db, imageInput(tenant.id))).version, 2);
    assert.equal((await createImage(db, imageInput(tenant.id, { name: 'api' }))).version, 1);
    const other = await someTenant(db);
    assert.equal((await createImage(db, imageInput(other.id))).version, 1, 'versions count per tenant');
  });

  it('versions are never reused after a delete', async (t) => {
    const { db } = await tempDb(t);
    const tenant = await someTenant(db);
    const v1 = await createImage(db, imageInput(tenant.id));
    const v2 = await createImage(db, imageInput(tenant.id));
    assert.equal(await deleteImage(db, tenant.id, v2.id), 'deleted');
    assert.equal(await deleteImage(db, tenant.id, v2.id), 'not_found');
    const v3 = await createImage(db, imageInput(tenant.id));
    assert.equal(v3.version, 3);
    assert.notEqual(v3.arn, v2.arn);
    assert.equal(v1.version, 1);
  });

  it('input outside the limits is refused before the database', async (t) => {
    const { db } = await tempDb(t);
    const tenant = await someTenant(db);
    const bad = [
      { vcpus: 0 }, { vcpus: 17 }, { vcpus: 1.5 }, { memoryMiB: 64 }, { memoryMiB: 40000 }, { diskMiB: 0 },
      { diskMiB: 32769 }, { port: 0 }, { port: 70000 }, { name: 'has/slash' }, { name: 'a:b' }, { name: '' },
      { readiness: { httpPath: 'no-slash', timeoutSeconds: 10 } }, { readiness: { httpPath: null, timeoutSeconds: 3601 } },
    ];
    for (const override of bad) {
      await assert.rejects(createImage(db, imageInput(tenant.id, override)), (e) => isCocoonError(e, 'invalid_request'), JSON.stringify(override));
    }
    await assert.rejects(createImage(db, imageInput('tnt-00000000000000000000000000')), (e) => isCocoonError(e, 'tenant_not_found'));
  });

  it('lookups are scoped to the tenant, by id or ARN', async (t) => {
    const { db } = await tempDb(t);
    const a = await someTenant(db);
    const b = await someTenant(db);
    const image = await createImage(db, imageInput(a.id));
    assert.equal((await findTenantImage(db, a.id, image.id))?.id, image.id);
    assert.equal((await findTenantImage(db, a.id, image.arn))?.id, image.id);
    assert.equal(await findTenantImage(db, b.id, image.id), undefined);
    assert.equal(await findTenantImage(db, b.id, image.arn), undefined);
    assert.equal(await deleteImage(db, b.id, image.id), 'not_found');
  });

  it('state changes are compare-and-set and land in the event log', async (t) => {
    const { db } = await tempDb(t);
    const tenant = await someTenant(db);
    const image = await createImage(db, imageInput(tenant.id));
    assert.equal(await transitionImage(db, image.id, 'BUILDING', 'BOOTING'), false, 'not in BUILDING');
    assert.equal(await transitionImage(db, image.id, 'PENDING', 'BUILDING', { bundleSha256: 'cd'.repeat(32) }), true);
    assert.equal(await transitionImage(db, image.id, 'PENDING', 'BUILDING'), false, 'someone else already moved it');
    assert.equal(await transitionImage(db, image.id, ['BUILDING', 'BOOTING'], 'FAILED', { error: 'RUN make: exit 2' }), true);
    const failed = await getImage(db, image.id);
    assert.equal(failed?.state, 'FAILED');
    assert.equal(failed?.error, 'RUN make: exit 2');
    assert.equal(failed?.bundleSha256, 'cd'.repeat(32));
    assert.equal(await transitionImage(db, 'img-00000000000000000000000000', 'PENDING', 'BUILDING'), false);
    await assert.rejects(transitionImage(db, image.id, 'FAILED', 'DONE' as never), (e) => isCocoonError(e, 'invalid_request'));

    const events = await listEvents(db, { resourceType: 'image', resourceId: image.id });
    assert.deepEqual(events.map((e) => [e.type, e.fromState, e.toState]), [
      ['created', null, 'PENDING'], ['state_changed', 'PENDING', 'BUILDING'], ['state_changed', 'BUILDING', 'FAILED'],
    ]);
    assert.equal(events[2]?.message, 'RUN make: exit 2');
    assert.deepEqual((await listEvents(db, { resourceId: image.id, afterId: events[1]?.id })).map((e) => e.id), [events[2]?.id]);
  });

  it('artifacts merge and the build log path is recorded', async (t) => {
    const { db } = await tempDb(t);
    const tenant = await someTenant(db);
    const image = await readyImage(db, tenant.id);
    assert.equal(await setImageBuildLogPath(db, image.id, '/data/logs/img.log'), true);
    const stored = await getImage(db, image.id);
    assert.equal(stored?.buildLogPath, '/data/logs/img.log');
    assert.deepEqual(stored?.artifacts, { snapshot: 'snapshots/x' });
    assert.deepEqual((await listImagesInStates(db, ['READY'])).map((i) => i.id), [image.id]);
  });

  it('listing filters by state and name and pages with a cursor', async (t) => {
    const { db } = await tempDb(t);
    const tenant = await someTenant(db);
    const other = await someTenant(db);
    await createImage(db, imageInput(other.id));
    const created = [];
    for (let i = 0; i < 7; i++) created.push(await createImage(db, imageInput(tenant.id, { name: i % 2 ? 'odd' : 'even' })));
    await transitionImage(db, created[0]!.id, 'PENDING', 'BUILDING');

    const all = [];
    let cursor: string | null = null;
    do {
      const page = await listImages(db, { tenantId: tenant.id, limit: 3, cursor });
      assert.ok(page.items.length <= 3);
      all.push(...page.items);
      cursor = page.nextCursor;
    } while (cursor !== null);
    assert.deepEqual(all.map((i) => i.id), created.map((i) => i.id).reverse(), 'newest first, each once');

    assert.deepEqual((await listImages(db, { tenantId: tenant.id, state: 'BUILDING' })).items.map((i) => i.id), [created[0]!.id]);
    assert.equal((await listImages(db, { tenantId: tenant.id, state: ['PENDING', 'BUILDING'] })).items.length, 7);
    assert.equal((await listImages(db, { tenantId: tenant.id, name: 'odd' })).items.length, 3);
    await assert.rejects(listImages(db, { tenantId: tenant.id, cursor: 'garbage' }), (e) => isCocoonError(e, 'invalid_cursor'));
    await assert.rejects(listImages(db, { tenantId: tenant.id, limit: 0 }), (e) => isCocoonError(e, 'invalid_request'));
    await assert.rejects(listImages(db, { tenantId: tenant.id, state: 'NOPE' as never }), (e) => isCocoonError(e, 'invalid_request'));
  });

  it('an image in use by a live microVM cannot be deleted; a terminated one does not hold it', async (t) => {
    const { db } = await tempDb(t);
    const tenant = await someTenant(db);
    const image = await readyImage(db, tenant.id);
    const { microvm } = await createMicrovm(db, {
      tenantId: tenant.id, region: 'local', imageId: image.id, idlePolicy: POLICY, maximumDurationSeconds: 600,
    });
    assert.equal(await deleteImage(db, tenant.id, image.id), 'in_use');
    await transitionMicrovm(db, microvm.id, 'PENDING', 'TERMINATED');
    assert.equal(await deleteImage(db, tenant.id, image.id), 'deleted');
    const { getMicrovm } = await import('../../../src/store/microvms.ts');
    const after = await getMicrovm(db, microvm.id);
    assert.equal(after?.imageId, null);
    assert.equal(after?.imageArn, image.arn, 'the ARN still says which image it was');
  });
}
