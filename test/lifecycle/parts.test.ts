// The engine's small parts on their own, without QEMU: the per-microVM operation queue, the
// activity the idle policy reads, and the gateway directory's entries.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Activity } from '../../src/lifecycle/activity.ts';
import { liveRoute, storedRoute } from '../../src/lifecycle/directory.ts';
import { OperationQueue } from '../../src/lifecycle/queue.ts';
import type { Microvm } from '../../src/store/microvms.ts';

test('the operation queue runs one operation at a time, in order, and a failure does not block the next', async () => {
  const queue = new OperationQueue<'a' | 'b' | 'c'>();
  const log: string[] = [];
  let release!: () => void;
  const first = queue.run('a', async () => {
    log.push('a start');
    await new Promise<void>((resolve) => (release = resolve));
    log.push('a end');
    return 1;
  });
  const second = queue.run('b', async () => {
    log.push('b');
    throw new Error('b failed');
  });
  const third = queue.run('c', async () => {
    log.push('c');
    return 3;
  });
  await new Promise((resolve) => setImmediate(resolve));
  assert.equal(queue.busy, 'a');
  assert.deepEqual(log, ['a start']);
  release();
  assert.equal(await first, 1);
  await assert.rejects(second, /b failed/);
  assert.equal(await third, 3);
  await queue.settled;
  assert.equal(queue.busy, undefined);
  assert.deepEqual(log, ['a start', 'a end', 'b', 'c']);
});

test('activity: busy while anything is in flight, idle after maxIdle without traffic, written once per change', () => {
  const activity = new Activity(1_000);
  assert.equal(activity.idleFor(500, 1_500), true);
  assert.equal(activity.idleFor(500, 1_499), false);
  activity.requestStarted(2_000);
  assert.equal(activity.busy, true);
  assert.equal(activity.idleFor(0, 10_000), false, 'never idle with a request in flight');
  activity.webSocketOpened(2_100);
  activity.requestFinished(2_200);
  assert.equal(activity.busy, true, 'the WebSocket is still open');
  activity.webSocketClosed(2_300);
  activity.webSocketClosed(2_400); // more closes than opens never go below zero
  assert.equal(activity.webSockets, 0);
  assert.equal(activity.busy, false);
  assert.equal(activity.takeDirty()?.getTime(), 2_400);
  assert.equal(activity.takeDirty(), undefined, 'nothing new since');
  assert.equal(activity.idleFor(1_000, 3_400), true);
});

test('directory entries carry the configured host address; a decided termination shows at once', () => {
  const live = liveRoute(
    { id: 'mvm-1', state: 'RUNNING', terminating: false, appPort: 8080, hasAppPort: true, autoResume: true, ports: new Map([[8080, 40000]]) },
    '10.0.0.7',
  );
  assert.equal(live.upstreamHost, '10.0.0.7');
  assert.equal(live.upstreamPortFor(8080), 40000);
  assert.equal(live.upstreamPortFor(22), null);
  assert.equal(liveRoute({ id: 'mvm-1', state: 'RUNNING', terminating: true, appPort: 8080, hasAppPort: true, autoResume: true, ports: new Map() }, '127.0.0.1').state, 'TERMINATING');
  const stored = storedRoute(
    { id: 'mvm-2', state: 'SUSPENDED', port: 3000, hasAppPort: false, idlePolicy: { autoResumeEnabled: false, maxIdleDurationSeconds: 60, suspendedDurationSeconds: null } } as Microvm,
    '127.0.0.1',
  );
  assert.deepEqual({ ...stored, upstreamPortFor: undefined }, {
    id: 'mvm-2', state: 'SUSPENDED', appPort: 3000, hasAppPort: false, autoResumeEnabled: false, upstreamHost: '127.0.0.1', upstreamPortFor: undefined,
  });
  assert.equal(stored.upstreamPortFor(3000), null);
});
