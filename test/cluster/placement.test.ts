// Placement (src/cluster/placement.ts): the pure choice, and the same on a real store. No VM.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { isCocoonError } from '../../src/common/errors.ts';
import { choosePlacement, placeMicrovm, type Candidate } from '../../src/cluster/placement.ts';
import { registerHost, type Host } from '../../src/store/hosts.ts';
import { claimMicrovm, createMicrovm, transitionMicrovm } from '../../src/store/microvms.ts';
import { readyImage, someTenant, tempDb } from '../store/helpers.ts';

function candidate(id: string, capacity: Partial<Host['capacity']>, used: { vcpus?: number; memoryMiB?: number; diskMiB?: number } = {}): Candidate {
  const host: Host = {
    id, apiUrl: null, gatewayUrl: null, capacity: { vcpus: 8, memoryMiB: 8192, diskMiB: 50_000, ...capacity },
    state: 'LIVE', startedAt: '', heartbeatAt: '', deadAt: null, declaredDeadBy: null,
  };
  return { host, usage: { hostId: id, vcpus: used.vcpus ?? 0, memoryMiB: used.memoryMiB ?? 0, diskMiB: used.diskMiB ?? 0, running: 0 } };
}

const VM = { vcpus: 2, memoryMiB: 1024, diskMiB: 4096 };

test('placement prefers the receiving host, then one caching the image, then the most memory left', () => {
  const a = candidate('host-a', {}, { memoryMiB: 6000 });
  const b = candidate('host-b', {}, { memoryMiB: 4000 });
  const c = candidate('host-c', {}, { memoryMiB: 1000 });
  assert.equal(choosePlacement([a, b, c], { ...VM, preferHostId: 'host-a' })?.id, 'host-a');
  assert.equal(choosePlacement([a, b, c], { ...VM, preferHostId: 'host-z' })?.id, 'host-c');
  assert.equal(choosePlacement([a, b, c], { ...VM, imageId: 'img-1' }, new Set(['host-b']))?.id, 'host-b');
  // The receiving host without room is passed over.
  const full = candidate('host-a', { vcpus: 2 }, { vcpus: 1 });
  assert.equal(choosePlacement([full, b], { ...VM, preferHostId: 'host-a' })?.id, 'host-b');
});

test('placement counts vCPUs, memory and disk, and a holder\'s disk only once', () => {
  const tight = candidate('host-a', { vcpus: 4, memoryMiB: 2048, diskMiB: 5000 }, { vcpus: 2, memoryMiB: 1024, diskMiB: 4096 });
  assert.equal(choosePlacement([tight], VM), undefined, 'disk: 4096 + 4096 > 5000');
  assert.equal(choosePlacement([tight], { ...VM, holderHostId: 'host-a' })?.id, 'host-a', 'its files are there already');
  assert.equal(choosePlacement([candidate('host-a', { vcpus: 3 }, { vcpus: 2 })], VM), undefined, 'vCPUs');
  assert.equal(choosePlacement([candidate('host-a', { memoryMiB: 2000 }, { memoryMiB: 1000 })], VM), undefined, 'memory');
  assert.equal(choosePlacement([], VM), undefined);
});

test('placement on the store: live hosts only, their microVMs counted, no_host_capacity when none has room', async (t) => {
  const { db } = await tempDb(t);
  const now = new Date('2026-06-01T12:00:00.000Z');
  await registerHost(db, { id: 'host-a', capacity: { vcpus: 2, memoryMiB: 4096, diskMiB: 100_000 }, now });
  await registerHost(db, { id: 'host-b', capacity: { vcpus: 2, memoryMiB: 4096, diskMiB: 100_000 }, now });
  await registerHost(db, { id: 'host-old', capacity: { vcpus: 64, memoryMiB: 65_536, diskMiB: 100_000 }, now: new Date(now.getTime() - 60_000) });
  const tenant = await someTenant(db);
  const image = await readyImage(db, tenant.id, { vcpus: 2, memoryMiB: 1024 });
  const start = async () => (await createMicrovm(db, {
    tenantId: tenant.id, region: 'local', imageId: image.id, maximumDurationSeconds: 600,
    idlePolicy: { autoResumeEnabled: true, maxIdleDurationSeconds: 60, suspendedDurationSeconds: null },
  })).microvm;
  const opts = { deadAfterMs: 30_000, now };
  const request = { vcpus: 2, memoryMiB: 1024, diskMiB: 1024, imageId: image.id };
  // host-old is silent (beyond dead-after): never chosen, even with the most room.
  assert.equal((await placeMicrovm(db, { ...request, preferHostId: 'host-b' }, opts)).id, 'host-b');
  const first = await start();
  await claimMicrovm(db, first.id, 'host-a');
  await transitionMicrovm(db, first.id, 'PENDING', 'RUNNING');
  // host-a ran the image (cache) but is full now; host-b has room.
  assert.equal((await placeMicrovm(db, { ...request, preferHostId: 'host-a' }, opts)).id, 'host-b');
  const second = await start();
  await claimMicrovm(db, second.id, 'host-b');
  await assert.rejects(placeMicrovm(db, request, opts), (e) => isCocoonError(e, 'no_host_capacity') && e.status === 503);
  // Suspending frees the vCPUs and memory (the disk stays counted).
  await transitionMicrovm(db, first.id, 'RUNNING', 'SUSPENDING');
  await transitionMicrovm(db, first.id, 'SUSPENDING', 'SUSPENDED');
  assert.equal((await placeMicrovm(db, request, opts)).id, 'host-a', 'host-a caches the image');
});
