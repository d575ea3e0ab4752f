/**
 * The cluster directory's wake of a SUSPENDED microVM that no live host runs: where placement
 * picks another host (this one lacks room), the route carries that host as `peer` and the
 * gateway forwards the request there, where it wakes; where placement picks this host, or the
 * microVM has a live owner, nothing changes. No database and no QEMU: the lookups are stand-ins.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { clusterDirectory, type WakePlacement } from '../../src/cluster/directory.ts';
import type { Owner } from '../../src/cluster/owners.ts';
import { CocoonError } from '../../src/common/errors.ts';
import type { MicroVMDirectory, MicroVMRoute } from '../../src/gateway/types.ts';

function suspendedRoute(id: string): MicroVMRoute {
  return { id, state: 'SUSPENDED', appPort: 8080, hasAppPort: true, autoResumeEnabled: true, upstreamHost: '127.0.0.1', upstreamPortFor: () => null };
}

class LocalDirectory implements MicroVMDirectory {
  woken: string[] = [];
  lookup(id: string): Promise<MicroVMRoute | null> {
    return Promise.resolve(suspendedRoute(id));
  }
  async ensureRunning(id: string): Promise<MicroVMRoute> {
    this.woken.push(id);
    return { ...suspendedRoute(id), state: 'RUNNING', upstreamPortFor: () => 40000 };
  }
  requestStarted(): void {}
  requestFinished(): void {}
  webSocketOpened(): void {}
  webSocketClosed(): void {}
}

const ownerless = { ownerOf: async (): Promise<Owner> => ({ kind: 'none' }) };
const signal = new AbortController().signal;

test('placement picks another host: the route names it as peer, nothing wakes here', async () => {
  const local = new LocalDirectory();
  const asked: string[] = [];
  const place: WakePlacement = async (id) => {
    asked.push(id);
    return { hostId: 'host-b', host: '127.0.0.1', port: 9123 };
  };
  const route = await clusterDirectory(local, ownerless, place).ensureRunning('mvm-1', signal);
  assert.deepEqual(route.peer, { hostId: 'host-b', host: '127.0.0.1', port: 9123 });
  assert.deepEqual(asked, ['mvm-1']);
  assert.deepEqual(local.woken, []);
});

test('placement picks this host: it wakes here', async () => {
  const local = new LocalDirectory();
  const route = await clusterDirectory(local, ownerless, async () => undefined).ensureRunning('mvm-2', signal);
  assert.equal(route.peer, undefined);
  assert.equal(route.state, 'RUNNING');
  assert.deepEqual(local.woken, ['mvm-2']);
});

test('no host has room: no_host_capacity reaches the gateway, nothing wakes', async () => {
  const local = new LocalDirectory();
  const full: WakePlacement = async () => {
    throw new CocoonError('no_host_capacity', 'no live host has room');
  };
  await assert.rejects(clusterDirectory(local, ownerless, full).ensureRunning('mvm-3', signal), (e: unknown) => e instanceof CocoonError && e.code === 'no_host_capacity');
  assert.deepEqual(local.woken, []);
});

test('a live owner is forwarded to without asking placement', async () => {
  const local = new LocalDirectory();
  const owned = { ownerOf: async (): Promise<Owner> => ({ kind: 'peer', host: { hostId: 'host-c', apiUrl: null, gatewayUrl: 'http://127.0.0.1:9200' } }) };
  let asked = 0;
  const route = await clusterDirectory(local, owned, async () => {
    asked++;
    return undefined;
  }).ensureRunning('mvm-4', signal);
  assert.equal(route.peer?.hostId, 'host-c');
  assert.equal(asked, 0);
  assert.deepEqual(local.woken, []);
});
