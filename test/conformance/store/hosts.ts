import assert from 'node:assert/strict';
import { isCocoonError } from '../../../src/common/errors.ts';
import { listEvents } from '../../../src/store/events.ts';
import {
  declareHostDead, getHost, heartbeatHost, HOST_LOST_EVENT, listHostUsage, listLiveHosts, listSilentHosts, registerHost, type HostRegistration,
} from '../../../src/store/hosts.ts';
import { acquireMicrovmLease, getMicrovmLease, holdsMicrovmLease, releaseMicrovmLease } from '../../../src/store/leases.ts';
import { migrate } from '../../../src/store/migrations.ts';
import { claimMicrovm, createMicrovm, getMicrovm, setMicrovmRuntimeIf, transitionMicrovm, type Microvm } from '../../../src/store/microvms.ts';
import type { Db } from '../../../src/store/sql.ts';
import { readyImage, someTenant } from '../../store/helpers.ts';
import type { StoreSuite } from './suite.ts';

const T0 = new Date('2026-06-01T12:00:00.000Z');
const at = (seconds: number): Date => new Date(T0.getTime() + seconds * 1000);
const CAPACITY = { vcpus: 8, memoryMiB: 16_384, diskMiB: 100_000 };

function host(id: string, overrides: Partial<HostRegistration> = {}): HostRegistration {
  return { id, apiUrl: `http://10.0.0.${id.length}:7070`, gatewayUrl: `http://10.0.0.${id.length}:7071`, capacity: CAPACITY, now: T0, ...overrides };
}

async function microvmIn(db: Db, state: 'PENDING' | 'RUNNING' | 'SUSPENDED' | 'TERMINATING' | 'RESUMING', options: { vcpus?: number } = {}): Promise<Microvm> {
  const tenant = await someTenant(db);
  const image = await readyImage(db, tenant.id, options.vcpus ? { vcpus: options.vcpus } : {});
  const { microvm } = await createMicrovm(db, {
    tenantId: tenant.id, region: 'local', imageId: image.id, maximumDurationSeconds: 3600,
    idlePolicy: { autoResumeEnabled: true, maxIdleDurationSeconds: 300, suspendedDurationSeconds: null },
  });
  const path: Record<string, Array<[string, string]>> = {
    PENDING: [],
    RUNNING: [['PENDING', 'RUNNING']],
    SUSPENDED: [['PENDING', 'RUNNING'], ['RUNNING', 'SUSPENDING'], ['SUSPENDING', 'SUSPENDED']],
    RESUMING: [['PENDING', 'RUNNING'], ['RUNNING', 'SUSPENDING'], ['SUSPENDING', 'SUSPENDED'], ['SUSPENDED', 'RESUMING']],
    TERMINATING: [['PENDING', 'RUNNING'], ['RUNNING', 'TERMINATING']],
  };
  for (const [from, to] of path[state] ?? []) assert.equal(await transitionMicrovm(db, microvm.id, from as never, to as never), true);
  return (await getMicrovm(db, microvm.id)) as Microvm;
}

export default function define({ it, tempDb, emptyDb }: StoreSuite): void {
  it('hosts register, heartbeat and are listed live until they fall silent', async (t) => {
    const { db } = await tempDb(t);
    const a = await registerHost(db, host('host-a'));
    assert.deepEqual(a, await getHost(db, 'host-a'));
    assert.equal(a.state, 'LIVE');
    assert.deepEqual(a.capacity, CAPACITY);
    await registerHost(db, host('host-b', { apiUrl: null, gatewayUrl: null }));
    assert.deepEqual((await listLiveHosts(db, at(-10))).map((h) => h.id), ['host-a', 'host-b']);

    assert.equal(await heartbeatHost(db, 'host-a', at(20)), true);
    assert.equal(await heartbeatHost(db, 'host-nobody', at(20)), false, 'a host never registered');
    assert.deepEqual((await listLiveHosts(db, at(10))).map((h) => h.id), ['host-a'], 'host-b is silent since T0');
    assert.deepEqual((await listSilentHosts(db, at(10))).map((h) => h.id), ['host-b']);
    assert.equal((await getHost(db, 'host-a'))?.heartbeatAt, at(20).toISOString());

    // A restart registers again: new addresses and capacity, same row.
    await registerHost(db, host('host-a', { apiUrl: 'http://10.0.0.9:7070', capacity: { vcpus: 2, memoryMiB: 2048, diskMiB: 10_000 }, now: at(30) }));
    const again = await getHost(db, 'host-a');
    assert.equal(again?.apiUrl, 'http://10.0.0.9:7070');
    assert.equal(again?.capacity.vcpus, 2);
    assert.equal(again?.startedAt, at(30).toISOString());

    for (const bad of [host('bad id'), host('host-c', { apiUrl: 'file:///etc/passwd' }), host('host-c', { capacity: { ...CAPACITY, vcpus: -1 } })]) {
      await assert.rejects(registerHost(db, bad), (e) => isCocoonError(e, 'invalid_request'), JSON.stringify(bad));
    }
  });

  it('a lease: one owner, an epoch that counts up on every change of owner, fenced writes', async (t) => {
    const { db } = await tempDb(t);
    await registerHost(db, host('host-a'));
    await registerHost(db, host('host-b'));
    const vm = await microvmIn(db, 'SUSPENDED');
    assert.deepEqual(await getMicrovmLease(db, vm.id), { microvmId: vm.id, hostId: null, epoch: 0, state: 'SUSPENDED' });

    const won = await acquireMicrovmLease(db, vm.id, 'host-a', { states: ['SUSPENDED'] });
    assert.deepEqual(won, { acquired: true, epoch: 1, state: 'SUSPENDED', changed: true });
    assert.deepEqual(await acquireMicrovmLease(db, vm.id, 'host-a'), { acquired: true, epoch: 1, state: 'SUSPENDED', changed: false }, 'the holder again: same epoch');
    assert.deepEqual(await acquireMicrovmLease(db, vm.id, 'host-b'), { acquired: false, reason: 'owned', ownerHostId: 'host-a', epoch: 1, state: 'SUSPENDED' });
    assert.equal((await acquireMicrovmLease(db, 'mvm-nope', 'host-b')).acquired, false);
    assert.equal(await holdsMicrovmLease(db, vm.id, 'host-a', 1), true);
    assert.equal(await holdsMicrovmLease(db, vm.id, 'host-b', 1), false);

    // The holder's writes carry its epoch.
    assert.equal(await transitionMicrovm(db, vm.id, 'SUSPENDED', 'RESUMING', { leaseEpoch: 1 }), true);
    assert.equal(await setMicrovmRuntimeIf(db, vm.id, 'RESUMING', { pid: 1 }, new Date(), 1), true);
    assert.equal((await acquireMicrovmLease(db, vm.id, 'host-b', { states: ['SUSPENDED'] })).acquired, false);
    assert.equal((await acquireMicrovmLease(db, vm.id, 'host-b', { states: ['SUSPENDED'] }) as { reason: string }).reason, 'state');

    // Released: ownerless, epoch 2; the old holder's writes with epoch 1 change nothing.
    assert.equal(await releaseMicrovmLease(db, vm.id, 'host-b', 1), false, 'only the holder releases');
    assert.equal(await releaseMicrovmLease(db, vm.id, 'host-a', 1), true);
    assert.deepEqual(await getMicrovmLease(db, vm.id), { microvmId: vm.id, hostId: null, epoch: 2, state: 'RESUMING' });
    assert.equal(await transitionMicrovm(db, vm.id, 'RESUMING', 'RUNNING', { leaseEpoch: 1 }), false);
    assert.equal(await setMicrovmRuntimeIf(db, vm.id, 'RESUMING', { pid: 2 }, new Date(), 1), false);
    assert.equal((await getMicrovm(db, vm.id))?.state, 'RESUMING');
    assert.deepEqual((await getMicrovm(db, vm.id))?.runtime, { pid: 1 });

    const b = await acquireMicrovmLease(db, vm.id, 'host-b');
    assert.deepEqual(b, { acquired: true, epoch: 3, state: 'RESUMING', changed: true });
    assert.equal(await transitionMicrovm(db, vm.id, 'RESUMING', 'RUNNING', { leaseEpoch: 3 }), true);
    assert.equal((await getMicrovm(db, vm.id))?.leaseEpoch, 3);
    // Unfenced writes (single host) are as before.
    assert.equal(await transitionMicrovm(db, vm.id, 'RUNNING', 'SUSPENDING'), true);

    // Claiming an ownerless microVM (a launch) is a change of owner too.
    const fresh = await microvmIn(db, 'PENDING');
    assert.equal(await claimMicrovm(db, fresh.id, 'host-a'), true);
    assert.equal(await claimMicrovm(db, fresh.id, 'host-a'), true);
    assert.equal(await claimMicrovm(db, fresh.id, 'host-b'), false);
    assert.deepEqual(await getMicrovmLease(db, fresh.id), { microvmId: fresh.id, hostId: 'host-a', epoch: 1, state: 'PENDING' });
  });

  it('many acquires of one lease at once: exactly one host wins, the others learn the owner', async (t) => {
    const { db } = await tempDb(t);
    const hosts = ['host-1', 'host-2', 'host-3', 'host-4', 'host-5', 'host-6'];
    for (const id of hosts) await registerHost(db, host(id));
    const vm = await microvmIn(db, 'SUSPENDED');
    const outcomes = await Promise.all(hosts.map((id) => acquireMicrovmLease(db, vm.id, id, { states: ['SUSPENDED'] })));
    const winners = outcomes.flatMap((o, i) => (o.acquired ? [hosts[i]] : []));
    assert.equal(winners.length, 1);
    for (const o of outcomes) {
      if (o.acquired) assert.equal(o.epoch, 1);
      else assert.deepEqual([o.reason, o.ownerHostId], ['owned', winners[0]]);
    }
    assert.equal((await getMicrovmLease(db, vm.id))?.hostId, winners[0]);
  });

  it('two handles on one database (two hosts) racing for one lease: exactly one wins', async (t) => {
    const where = await emptyDb(t);
    const dbA = await where.open();
    await migrate(dbA);
    const dbB = await where.open();
    await registerHost(dbA, host('host-a'));
    await registerHost(dbB, host('host-b'));
    const vms = await Promise.all(Array.from({ length: 4 }, () => microvmIn(dbA, 'SUSPENDED')));
    for (const vm of vms) {
      const [a, b] = await Promise.all([
        acquireMicrovmLease(dbA, vm.id, 'host-a', { states: ['SUSPENDED'] }),
        acquireMicrovmLease(dbB, vm.id, 'host-b', { states: ['SUSPENDED'] }),
      ]);
      assert.equal([a, b].filter((o) => o.acquired).length, 1, `one winner for ${vm.id}`);
      const winner = a.acquired ? 'host-a' : 'host-b';
      const loser = a.acquired ? b : a;
      assert.equal(!loser.acquired && loser.ownerHostId, winner);
      // The winner resumes with its epoch; a fenced write by the loser's handle with a guessed
      // epoch from before cannot move it.
      const epoch = (a.acquired ? a : b.acquired ? b : undefined)?.epoch as number;
      const [won, lost] = await Promise.all([
        transitionMicrovm(a.acquired ? dbA : dbB, vm.id, 'SUSPENDED', 'RESUMING', { leaseEpoch: epoch }),
        transitionMicrovm(a.acquired ? dbB : dbA, vm.id, 'SUSPENDED', 'RESUMING', { leaseEpoch: epoch - 1 }),
      ]);
      assert.deepEqual([won, lost], [true, false]);
      assert.deepEqual(await getMicrovmLease(dbB, vm.id), { microvmId: vm.id, hostId: winner, epoch, state: 'RESUMING' });
    }
  });

  it('a silent host is declared dead once: SUSPENDED ownerless, RUNNING FAILED (host_lost), its old epochs fenced', async (t) => {
    const { db } = await tempDb(t);
    await registerHost(db, host('host-a'));
    await registerHost(db, host('host-b'));
    const suspended = await microvmIn(db, 'SUSPENDED');
    const running = await microvmIn(db, 'RUNNING');
    const resuming = await microvmIn(db, 'RESUMING');
    const terminating = await microvmIn(db, 'TERMINATING');
    const elsewhere = await microvmIn(db, 'RUNNING');
    const epochs = new Map<string, number>();
    for (const vm of [suspended, running, resuming, terminating]) {
      const got = await acquireMicrovmLease(db, vm.id, 'host-a');
      assert.ok(got.acquired);
      epochs.set(vm.id, got.epoch);
    }
    assert.ok((await acquireMicrovmLease(db, elsewhere.id, 'host-b')).acquired);
    await heartbeatHost(db, 'host-a', at(5));
    await heartbeatHost(db, 'host-b', at(60));

    // Not silent long enough: nothing happens.
    const early = await declareHostDead(db, 'host-a', { silentBefore: at(5), by: 'host-b', now: at(6) });
    assert.deepEqual(early, { declared: false, released: [], failed: [], terminated: [] });

    // Two sweepers at once: one declares.
    const [first, second] = await Promise.all([
      declareHostDead(db, 'host-a', { silentBefore: at(30), by: 'host-b', now: at(61) }),
      declareHostDead(db, 'host-a', { silentBefore: at(30), by: 'host-b', now: at(61) }),
    ]);
    const loss = first.declared ? first : second;
    assert.equal([first, second].filter((l) => l.declared).length, 1);
    assert.deepEqual(loss.released, [suspended.id]);
    assert.deepEqual(loss.failed.sort(), [running.id, resuming.id].sort());
    assert.deepEqual(loss.terminated, [terminating.id]);
    const dead = await getHost(db, 'host-a');
    assert.deepEqual([dead?.state, dead?.declaredDeadBy, dead?.deadAt], ['DEAD', 'host-b', at(61).toISOString()]);
    assert.deepEqual((await listLiveHosts(db, at(0))).map((h) => h.id), ['host-b']);
    assert.equal(await heartbeatHost(db, 'host-a', at(62)), false, 'the dead host learns it from its next heartbeat');

    const s = await getMicrovm(db, suspended.id);
    assert.deepEqual([s?.state, s?.hostId, s?.leaseEpoch], ['SUSPENDED', null, (epochs.get(suspended.id) as number) + 1]);
    const r = await getMicrovm(db, running.id);
    assert.equal(r?.state, 'FAILED');
    assert.match(r?.error ?? '', /^host_lost: host host-a stopped heartbeating .* declared dead by host-b while the microVM was RUNNING/);
    assert.equal(r?.terminatedAt, at(61).toISOString());
    assert.equal((await getMicrovm(db, resuming.id))?.state, 'FAILED');
    assert.equal((await getMicrovm(db, terminating.id))?.state, 'TERMINATED');
    assert.deepEqual([(await getMicrovm(db, elsewhere.id))?.state, (await getMicrovm(db, elsewhere.id))?.hostId], ['RUNNING', 'host-b']);
    const events = await listEvents(db, { resourceId: running.id });
    assert.ok(events.some((e) => e.type === HOST_LOST_EVENT && e.toState === 'FAILED' && e.data.hostId === 'host-a'));
    assert.ok(events.some((e) => e.type === 'state_changed' && e.fromState === 'RUNNING' && e.toState === 'FAILED'));
    assert.ok((await listEvents(db, { resourceId: suspended.id })).some((e) => e.type === HOST_LOST_EVENT));

    // The dead host's writes with the epochs it held change nothing.
    assert.equal(await transitionMicrovm(db, suspended.id, 'SUSPENDED', 'RESUMING', { leaseEpoch: epochs.get(suspended.id) }), false);
    assert.equal(await releaseMicrovmLease(db, suspended.id, 'host-a', epochs.get(suspended.id) as number), false);
    // Any live host may take the suspended one; the sweep is not repeated.
    const taken = await acquireMicrovmLease(db, suspended.id, 'host-b', { states: ['SUSPENDED'] });
    assert.deepEqual(taken, { acquired: true, epoch: (epochs.get(suspended.id) as number) + 2, state: 'SUSPENDED', changed: true });
    assert.equal((await declareHostDead(db, 'host-a', { silentBefore: at(300), by: 'host-b', now: at(301) })).declared, false);

    // Back from the dead: it registers again, owning nothing of what it had.
    await registerHost(db, host('host-a', { now: at(400) }));
    assert.equal((await getHost(db, 'host-a'))?.state, 'LIVE');
    assert.equal((await getMicrovm(db, suspended.id))?.hostId, 'host-b');
  });

  it('a lease held by a host declared dead can be taken over; one without a hosts row cannot', async (t) => {
    const { db } = await tempDb(t);
    await registerHost(db, host('host-a'));
    await registerHost(db, host('host-b'));
    const vm = await microvmIn(db, 'RUNNING');
    assert.ok((await acquireMicrovmLease(db, vm.id, 'host-a')).acquired);
    // Marked dead without its rows swept (a sweep that crashed midway cannot happen: it is one
    // transaction; this is the lease rule on its own).
    await db.run("UPDATE hosts SET state = 'DEAD' WHERE id = 'host-a'");
    assert.deepEqual(await acquireMicrovmLease(db, vm.id, 'host-b'), { acquired: true, epoch: 2, state: 'RUNNING', changed: true });

    const legacy = await microvmIn(db, 'RUNNING');
    assert.equal(await claimMicrovm(db, legacy.id, 'host-single'), true);
    const outcome = await acquireMicrovmLease(db, legacy.id, 'host-b');
    assert.deepEqual(outcome, { acquired: false, reason: 'owned', ownerHostId: 'host-single', epoch: 1, state: 'RUNNING' });
  });

  it('host usage counts what each live host runs and keeps', async (t) => {
    const { db } = await tempDb(t);
    await registerHost(db, host('host-a'));
    await registerHost(db, host('host-b'));
    const running = await microvmIn(db, 'RUNNING', { vcpus: 2 });
    const suspended = await microvmIn(db, 'SUSPENDED', { vcpus: 4 });
    const done = await microvmIn(db, 'RUNNING', { vcpus: 1 });
    for (const vm of [running, suspended, done]) await claimMicrovm(db, vm.id, 'host-a');
    await transitionMicrovm(db, done.id, 'RUNNING', 'FAILED');
    const usage = await listHostUsage(db);
    assert.deepEqual(usage, [
      { hostId: 'host-a', vcpus: 2, memoryMiB: running.memoryMiB, diskMiB: running.diskMiB + suspended.diskMiB, running: 1 },
      { hostId: 'host-b', vcpus: 0, memoryMiB: 0, diskMiB: 0, running: 0 },
    ]);
  });
}
