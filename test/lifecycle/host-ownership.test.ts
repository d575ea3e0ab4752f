// Several hosts on one store: a host's recovery touches only its own microVMs (and unclaimed
// ones, which it claims), never another host's rows or directories; the gateway's directory
// answers this host's configured address. No VM boots here: recovery only finds no QEMU.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { loadConfig } from '../../src/config/config.ts';
import { applyMicrovmEvent } from '../../src/lifecycle/apply-event.ts';
import { LifecycleEngine } from '../../src/lifecycle/engine.ts';
import { dataDirHostId } from '../../src/lifecycle/host-id.ts';
import { microvmDir } from '../../src/lifecycle/paths.ts';
import { recoverMicrovms } from '../../src/lifecycle/recovery.ts';
import { claimMicrovm, createMicrovm, getMicrovm, listHostMicrovms, transitionMicrovm, type Microvm, type MicrovmState } from '../../src/store/microvms.ts';
import { quiet, readyImage, someTenant, tempDb } from '../store/helpers.ts';

const POLICY = { autoResumeEnabled: true, maxIdleDurationSeconds: 300, suspendedDurationSeconds: null };

test('the host id: COCOON_HOST_ID, else the one kept in the data directory (made once, kept across starts and moves)', async (t) => {
  const a = loadConfig({ COCOON_DATA_DIR: '/srv/cocoon-a' });
  assert.equal(a.hostId, undefined, 'loading the configuration writes nothing');
  assert.equal(loadConfig({ COCOON_HOST_ID: 'web-1.eu' }).hostId, 'web-1.eu');
  const { dir } = await tempDb(t);
  const id = dataDirHostId(dir);
  assert.match(id, /^host-[0-9a-f]{16}$/);
  assert.equal(fs.readFileSync(path.join(dir, 'host-id'), 'utf8'), `${id}\n`);
  assert.equal(dataDirHostId(dir), id, 'the same on the next start');
  const moved = `${dir}-moved`;
  await fs.promises.cp(dir, moved, { recursive: true });
  t.after(() => fs.promises.rm(moved, { recursive: true, force: true }));
  assert.equal(dataDirHostId(moved), id, 'a moved data directory keeps its host');
  const other = path.join(dir, 'other');
  assert.notEqual(dataDirHostId(other), id, 'another data directory is another host');
  const engine = new LifecycleEngine({ db: (await tempDb(t)).db, dataDir: dir, logger: quiet });
  t.after(() => engine.close());
  assert.equal(engine.hostId, id);
  assert.equal(a.hostAddress, '127.0.0.1');
  assert.equal(loadConfig({ COCOON_HOST_ADDRESS: '10.0.0.7' }).hostAddress, '10.0.0.7');
  assert.throws(() => loadConfig({ COCOON_HOST_ID: '../etc' }), /COCOON_HOST_ID/);
  assert.throws(() => loadConfig({ COCOON_HOST_ADDRESS: 'a b' }), /COCOON_HOST_ADDRESS/);
});

test('claiming: the first host wins, the same host again is a no-op, and each host lists only its own and unclaimed rows', async (t) => {
  const { db } = await tempDb(t);
  const tenant = await someTenant(db);
  const image = await readyImage(db, tenant.id);
  const start = async () => (await createMicrovm(db, { tenantId: tenant.id, region: 'local', imageId: image.id, idlePolicy: POLICY, maximumDurationSeconds: 600 })).microvm;
  const [mine, theirs, nobodys] = [await start(), await start(), await start()];
  assert.equal(mine.hostId, null);
  assert.ok(await claimMicrovm(db, mine.id, 'host-a'));
  assert.ok(await claimMicrovm(db, mine.id, 'host-a'));
  assert.ok(await claimMicrovm(db, theirs.id, 'host-b'));
  assert.equal(await claimMicrovm(db, theirs.id, 'host-a'), false);
  assert.equal((await getMicrovm(db, theirs.id))?.hostId, 'host-b');
  assert.deepEqual((await listHostMicrovms(db, 'host-a')).map((m) => m.id), [mine.id, nobodys.id]);
  assert.deepEqual((await listHostMicrovms(db, 'host-b')).map((m) => m.id), [theirs.id, nobodys.id]);
});

test("recovery leaves another host's microVMs and directories alone, and claims unclaimed ones", async (t) => {
  const { db, dir } = await tempDb(t);
  const tenant = await someTenant(db);
  const image = await readyImage(db, tenant.id);
  const make = async (state: MicrovmState, host: string | null): Promise<Microvm> => {
    const { microvm } = await createMicrovm(db, { tenantId: tenant.id, region: 'local', imageId: image.id, idlePolicy: POLICY, maximumDurationSeconds: 600 });
    if (host !== null) assert.ok(await claimMicrovm(db, microvm.id, host));
    if (state !== 'PENDING') assert.ok(await transitionMicrovm(db, microvm.id, 'PENDING', state));
    // Every one has files in this data directory (as if it had run here once).
    await fs.promises.mkdir(path.join(microvmDir(dir, microvm.id), 'vm'), { recursive: true });
    await fs.promises.writeFile(path.join(microvmDir(dir, microvm.id), 'vm', 'serial.log'), 'x');
    return microvm;
  };
  const theirsRunning = await make('RUNNING', 'host-b');
  const theirsTerminating = await make('TERMINATING', 'host-b');
  const mineRunning = await make('RUNNING', 'host-a');
  const unclaimedTerminating = await make('TERMINATING', null);

  const engine = new LifecycleEngine({ db, dataDir: dir, hostId: 'host-a', hostAddress: '10.0.0.7', logger: quiet });
  t.after(() => engine.close());
  const report = await recoverMicrovms(engine, db, dir, quiet);

  // Another host's rows: untouched, whatever their state; their directories kept.
  assert.equal((await getMicrovm(db, theirsRunning.id))?.state, 'RUNNING');
  assert.equal((await getMicrovm(db, theirsTerminating.id))?.state, 'TERMINATING');
  assert.ok(fs.existsSync(microvmDir(dir, theirsRunning.id)));
  assert.ok(fs.existsSync(microvmDir(dir, theirsTerminating.id)));
  // This host's RUNNING microVM has no QEMU any more: FAILED, as before hosts existed.
  assert.equal((await getMicrovm(db, mineRunning.id))?.state, 'FAILED');
  assert.deepEqual(report.failed, [mineRunning.id]);
  // An unclaimed one is claimed, then recovered like an own one.
  const claimed = await getMicrovm(db, unclaimedTerminating.id);
  assert.equal(claimed?.state, 'TERMINATED');
  assert.equal(claimed?.hostId, 'host-a');
  assert.deepEqual(report.terminated, [unclaimedTerminating.id]);
  assert.equal(fs.existsSync(microvmDir(dir, unclaimedTerminating.id)), false);
  assert.deepEqual(report.adopted, []);

  // The gateway's directory answers this host's configured address, not a fixed 127.0.0.1.
  const route = await engine.lookup(mineRunning.id);
  assert.equal(route?.upstreamHost, '10.0.0.7');
  assert.equal(route?.state, 'FAILED');
});

test('a host does not launch a microVM another host claimed', async (t) => {
  const { db, dir } = await tempDb(t);
  const tenant = await someTenant(db);
  const image = await readyImage(db, tenant.id);
  const { microvm } = await createMicrovm(db, { tenantId: tenant.id, region: 'local', imageId: image.id, idlePolicy: POLICY, maximumDurationSeconds: 600 });
  assert.ok(await claimMicrovm(db, microvm.id, 'host-b'));
  const engine = new LifecycleEngine({ db, dataDir: dir, hostId: 'host-a', logger: quiet });
  t.after(() => engine.close());
  await engine.launch(microvm);
  assert.equal(await engine.settled(microvm.id), 'PENDING');
  assert.equal(engine.inspect(microvm.id), undefined, 'not managed here');
  // Its own host would go on from PENDING (here: the table still allows it).
  assert.ok(await applyMicrovmEvent(db, microvm.id, 'started', {}, 'PENDING'));
});
