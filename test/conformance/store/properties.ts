import assert from 'node:assert/strict';
import fc from 'fast-check';
import { newId } from '../../../src/store/ids.ts';
import { IMAGE_STATES, createImage, deleteImage, listImages, transitionImage, type ImageState } from '../../../src/store/images.ts';
import { MICROVM_STATES, createMicrovm, getMicrovm, transitionMicrovm, type MicrovmState } from '../../../src/store/microvms.ts';
import { imageInput, readyImage, someTenant } from '../../store/helpers.ts';
import type { StoreSuite } from './suite.ts';

export default function define({ it, tempDb }: StoreSuite): void {
  const POLICY = { autoResumeEnabled: true, maxIdleDurationSeconds: 300, suspendedDurationSeconds: null };

  it('property: compare-and-set transitions behave like the model', async (t) => {
    const { db } = await tempDb(t);
    const tenant = await someTenant(db);
    const image = await readyImage(db, tenant.id);
    const state = fc.constantFrom(...MICROVM_STATES);
    const step = fc.record({ from: fc.uniqueArray(state, { minLength: 1, maxLength: 3 }), to: state });
    await fc.assert(
      fc.asyncProperty(fc.array(step, { maxLength: 25 }), async (steps) => {
        const { microvm } = await createMicrovm(db, {
          tenantId: tenant.id, region: 'local', imageId: image.id, idlePolicy: POLICY, maximumDurationSeconds: 600,
        });
        let model: MicrovmState = 'PENDING';
        for (const { from, to } of steps) {
          const expected = from.includes(model);
          assert.equal(await transitionMicrovm(db, microvm.id, from, to), expected);
          if (expected) model = to;
          assert.equal((await getMicrovm(db, microvm.id))?.state, model);
        }
      }),
      { numRuns: 40 },
    );
  });

  it('property: paging through a filtered list returns each match once, newest first', async (t) => {
    const { db } = await tempDb(t);
    await fc.assert(
      fc.asyncProperty(
        fc.array(fc.constantFrom(...IMAGE_STATES), { maxLength: 20 }),
        fc.integer({ min: 1, max: 7 }),
        fc.option(fc.uniqueArray(fc.constantFrom(...IMAGE_STATES), { minLength: 1, maxLength: 3 }), { nil: undefined }),
        async (states, limit, filter) => {
          const tenant = await someTenant(db);
          const ids: Array<{ id: string; state: ImageState }> = [];
          for (const target of states) {
            const image = await createImage(db, imageInput(tenant.id));
            if (target !== 'PENDING') await transitionImage(db, image.id, 'PENDING', target);
            ids.push({ id: image.id, state: target });
          }
          const expected = ids.filter((i) => filter === undefined || filter.includes(i.state)).map((i) => i.id).reverse();
          const seen: string[] = [];
          let cursor: string | null = null;
          let pages = 0;
          do {
            const page = await listImages(db, { tenantId: tenant.id, limit, cursor, ...(filter ? { state: filter } : {}) });
            assert.ok(page.items.length <= limit);
            seen.push(...page.items.map((i) => i.id));
            cursor = page.nextCursor;
            assert.ok(++pages <= expected.length + 1, 'paging terminates');
          } while (cursor !== null);
          assert.deepEqual(seen, expected);
        },
      ),
      { numRuns: 40 },
    );
  });

  it('property: image versions count up per name and are never handed out twice', async (t) => {
    const { db } = await tempDb(t);
    const op = fc.oneof(
      fc.record({ kind: fc.constant('create' as const), name: fc.constantFrom('a', 'b', 'c') }),
      fc.record({ kind: fc.constant('delete' as const), pick: fc.nat() }),
    );
    await fc.assert(
      fc.asyncProperty(fc.array(op, { maxLength: 30 }), async (ops) => {
        const tenant = await someTenant(db);
        const live: Array<{ id: string }> = [];
        const issued = new Map<string, number[]>();
        for (const o of ops) {
          if (o.kind === 'create') {
            const image = await createImage(db, imageInput(tenant.id, { name: o.name }));
            const versions = issued.get(o.name) ?? [];
            assert.equal(image.version, versions.length + 1);
            versions.push(image.version);
            issued.set(o.name, versions);
            live.push(image);
          } else if (live.length > 0) {
            const [victim] = live.splice(o.pick % live.length, 1);
            assert.equal(await deleteImage(db, tenant.id, victim!.id), 'deleted');
          }
        }
      }),
      { numRuns: 40 },
    );
  });

  it('property: ids made in a row sort in creation order', () => {
    fc.assert(
      fc.property(fc.array(fc.integer({ min: 0, max: 2 ** 47 }), { minLength: 2, maxLength: 50 }), (times) => {
        const sorted = [...times].sort((x, y) => x - y);
        const ids = sorted.map((time) => newId('image', time));
        assert.deepEqual([...ids].sort(), ids);
        assert.equal(new Set(ids).size, ids.length);
      }),
    );
  });
}
