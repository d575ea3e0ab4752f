// The scheduler without QEMU: due times as a pure function of a microVM's row, one timer per
// (microVM, kind), and the scan that ends SUSPENDED microVMs of this host whose time passed
// while no timer here covered them (a real SQLite store; nothing boots).
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import fc from 'fast-check';
import { LifecycleEngine } from '../../src/lifecycle/engine.ts';
import { microvmDir } from '../../src/lifecycle/paths.ts';
import { Scheduler, dueInputsOf, dueTimes, dueWithoutTimer, type DueInputs, type TimerKind } from '../../src/lifecycle/scheduler.ts';
import { MICROVM_STATES, claimMicrovm, createMicrovm, getMicrovm, transitionMicrovm, type Microvm } from '../../src/store/microvms.ts';
import { quiet, readyImage, someTenant, tempDb } from '../store/helpers.ts';

const base: DueInputs = { state: 'RUNNING', expiresAt: 50_000, suspendedAt: null, suspendedMs: null, lastActivity: 1_000, maxIdleMs: 300_000 };

test('due times: the session end always, idle only while RUNNING, the suspended end only while SUSPENDED with a limit', () => {
  assert.deepEqual(dueTimes(base), { expiry: 50_000, suspended: null, idle: 301_000 });
  assert.deepEqual(dueTimes({ ...base, state: 'SUSPENDED', suspendedAt: 2_000, suspendedMs: 5_000 }), { expiry: 50_000, suspended: 7_000, idle: null });
  assert.deepEqual(dueTimes({ ...base, state: 'SUSPENDED', suspendedAt: 2_000, suspendedMs: null }), { expiry: 50_000, suspended: null, idle: null });
  fc.assert(
    fc.property(fc.constantFrom(...MICROVM_STATES), fc.nat(), fc.nat(), fc.option(fc.nat()), (state, lastActivity, maxIdleMs, suspendedMs) => {
      const times = dueTimes({ ...base, state, lastActivity, maxIdleMs, suspendedAt: 10, suspendedMs });
      assert.equal(times.expiry, base.expiresAt);
      assert.equal(times.idle === null, state !== 'RUNNING');
      assert.equal(times.suspended === null, state !== 'SUSPENDED' || suspendedMs === null);
      if (times.idle !== null) assert.ok(times.idle >= lastActivity);
    }),
  );
});

test('one timer per microVM and kind: set replaces, clear drops, close stops everything', async () => {
  const fired: Array<[string, TimerKind]> = [];
  const scheduler = new Scheduler((id, kind) => fired.push([id, kind]));
  scheduler.set('a', 'idle', Date.now() + 60_000);
  scheduler.set('a', 'idle', Date.now()); // replaces the first
  scheduler.set('a', 'expiry', Date.now() + 60_000);
  scheduler.set('b', 'suspended', Date.now() - 1);
  scheduler.set('c', 'idle', Date.now());
  scheduler.clear('c');
  await new Promise((resolve) => setTimeout(resolve, 20));
  assert.deepEqual(fired.sort(), [['a', 'idle'], ['b', 'suspended']]);
  assert.equal(scheduler.has('a', 'expiry'), true);
  assert.equal(scheduler.has('a', 'idle'), false);
  scheduler.close();
  assert.equal(scheduler.has('a', 'expiry'), false);
  scheduler.set('d', 'idle', Date.now());
  await new Promise((resolve) => setTimeout(resolve, 20));
  assert.equal(fired.length, 2, 'nothing is armed after close');
});

test("the scan ends this host's SUSPENDED microVMs whose time passed, not others'", async (t) => {
  const { db, dir } = await tempDb(t);
  const tenant = await someTenant(db);
  const image = await readyImage(db, tenant.id);
  const suspended = async (options: { host: string; ageSeconds: number; maximumDurationSeconds: number; suspendedDurationSeconds: number | null }): Promise<Microvm> => {
    const { microvm } = await createMicrovm(db, {
      tenantId: tenant.id, region: 'local', imageId: image.id, maximumDurationSeconds: options.maximumDurationSeconds,
      idlePolicy: { autoResumeEnabled: true, maxIdleDurationSeconds: 60, suspendedDurationSeconds: options.suspendedDurationSeconds },
      now: new Date(Date.now() - options.ageSeconds * 1000),
    });
    assert.ok(await claimMicrovm(db, microvm.id, options.host));
    assert.ok(await transitionMicrovm(db, microvm.id, 'PENDING', 'SUSPENDED', { now: new Date(Date.now() - options.ageSeconds * 1000) }));
    await fs.promises.mkdir(path.join(microvmDir(dir, microvm.id), 'gen-1'), { recursive: true });
    return (await getMicrovm(db, microvm.id))!;
  };
  const sessionOver = await suspended({ host: 'host-a', ageSeconds: 10, maximumDurationSeconds: 5, suspendedDurationSeconds: null });
  const suspendedTooLong = await suspended({ host: 'host-a', ageSeconds: 10, maximumDurationSeconds: 600, suspendedDurationSeconds: 5 });
  const notYet = await suspended({ host: 'host-a', ageSeconds: 1, maximumDurationSeconds: 600, suspendedDurationSeconds: 60 });
  const otherHost = await suspended({ host: 'host-b', ageSeconds: 10, maximumDurationSeconds: 5, suspendedDurationSeconds: null });

  assert.deepEqual(
    dueWithoutTimer([sessionOver, suspendedTooLong, notYet], Date.now(), () => false).map((d) => [d.microvm.id, d.kind]),
    [[sessionOver.id, 'expiry'], [suspendedTooLong.id, 'suspended']],
  );
  assert.deepEqual(dueWithoutTimer([sessionOver], Date.now(), () => true), [], 'a loaded microVM has its own timers');
  assert.equal(dueInputsOf(notYet).suspendedMs, 60_000);

  const engine = new LifecycleEngine({ db, dataDir: dir, hostId: 'host-a', logger: quiet });
  t.after(() => engine.close());
  assert.deepEqual((await engine.scanDue()).sort(), [sessionOver.id, suspendedTooLong.id].sort());
  for (const id of [sessionOver.id, suspendedTooLong.id]) {
    assert.equal(await engine.settled(id), 'TERMINATED');
    assert.equal(fs.existsSync(microvmDir(dir, id)), false);
  }
  assert.equal((await getMicrovm(db, notYet.id))?.state, 'SUSPENDED');
  assert.equal((await getMicrovm(db, otherHost.id))?.state, 'SUSPENDED', "another host's row is never touched");
  assert.ok(fs.existsSync(microvmDir(dir, otherHost.id)));
});
