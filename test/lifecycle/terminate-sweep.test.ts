// Terminating a microVM without QEMU (a real SQLite store, the real VM driver, nothing boots):
// a SUSPENDED one runs no VM process, so its terminate removes its files without scanning every
// process of the host for one (the driver's sweep: ~8 ms each at 5000 microVMs); a PENDING or a
// FAILED one is still swept, as before.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { LifecycleEngine } from '../../src/lifecycle/engine.ts';
import { microvmDir } from '../../src/lifecycle/paths.ts';
import { claimMicrovm, createMicrovm, getMicrovm, transitionMicrovm, type Microvm } from '../../src/store/microvms.ts';
import { defaultVmDriver } from '../../src/vmm/drivers.ts';
import type { VmDriver } from '../../src/vmm/driver.ts';
import { quiet, readyImage, someTenant, tempDb } from '../store/helpers.ts';

test('a SUSPENDED microVM is terminated without a sweep of processes; PENDING and FAILED ones are swept', async (t) => {
  const { db, dir } = await tempDb(t);
  const tenant = await someTenant(db);
  const image = await readyImage(db, tenant.id);
  const microvm = async (state: 'PENDING' | 'SUSPENDED' | 'FAILED'): Promise<Microvm> => {
    const { microvm } = await createMicrovm(db, {
      tenantId: tenant.id, region: 'local', imageId: image.id, maximumDurationSeconds: 600,
      idlePolicy: { autoResumeEnabled: true, maxIdleDurationSeconds: 60, suspendedDurationSeconds: null },
    });
    assert.ok(await claimMicrovm(db, microvm.id, 'host-a'));
    if (state !== 'PENDING') assert.ok(await transitionMicrovm(db, microvm.id, 'PENDING', state));
    await fs.promises.mkdir(path.join(microvmDir(dir, microvm.id), state === 'SUSPENDED' ? 'gen-1' : 'vm'), { recursive: true });
    return (await getMicrovm(db, microvm.id))!;
  };

  // The real driver (its sweep scans /proc), counting the sweeps; no pool of processes started ahead.
  const { openPool: _noPool, ...real } = defaultVmDriver();
  const swept: string[] = [];
  const driver: VmDriver = { ...real, sweep: (marker, options) => (swept.push(marker), real.sweep(marker, options)) };
  const engine = new LifecycleEngine({ db, dataDir: dir, hostId: 'host-a', driver, logger: quiet });
  t.after(() => engine.close());

  const suspended = [await microvm('SUSPENDED'), await microvm('SUSPENDED')];
  const pending = await microvm('PENDING');
  const failed = await microvm('FAILED');
  // As recovery registers what it finds at start-up (a PENDING one is not launched by this).
  for (const m of [...suspended, pending, failed]) await engine.adoptLoaded(m, undefined);

  for (const m of suspended) {
    await engine.terminate(m.id);
    assert.equal((await getMicrovm(db, m.id))?.state, 'TERMINATED');
    assert.equal(fs.existsSync(microvmDir(dir, m.id)), false, 'its files are gone');
  }
  assert.deepEqual(swept, [], 'no process scan for a SUSPENDED microVM');

  await engine.terminate(pending.id);
  assert.equal((await getMicrovm(db, pending.id))?.state, 'TERMINATED');
  assert.deepEqual(swept, [microvmDir(dir, pending.id)], 'a PENDING one is swept (a launch may have started a process)');
  assert.equal(fs.existsSync(microvmDir(dir, pending.id)), false);

  await engine.terminate(failed.id);
  assert.deepEqual(swept, [microvmDir(dir, pending.id), microvmDir(dir, failed.id)], 'so is a FAILED one');
  assert.equal(fs.existsSync(microvmDir(dir, failed.id)), false);
});
