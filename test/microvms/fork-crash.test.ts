/**
 * Crash safety of fork and checkpoint: the daemon (a child process) is SIGKILLed while a fork
 * holds its source paused, after the fork point was linked for every fork (but before their
 * rows were written), and while a checkpoint holds its source paused. A restarted daemon has no
 * half-made microVM or image, no QEMU that nobody owns, and the source runs on intact.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { imageBaseDisk, imageSnapshotDir } from '../../src/images/paths.ts';
import { microvmDir, microvmsRoot } from '../../src/lifecycle/paths.ts';
import { getImage, type Image } from '../../src/store/images.ts';
import type { Database } from '../../src/store/sql.ts';
import { waitForPause } from '../support/daemon.ts';
import { TESTAPP_PORT } from '../support/image.ts';
import { RestartableDaemon } from '../support/restartable-daemon.ts';
import { gatewayRequest, type ApiClient } from '../support/server.ts';
import { cleanupDir, qemuProcessesMentioning, tempDir } from '../support/vm.ts';

describe('the daemon killed during a fork or a checkpoint, then restarted', () => {
  const dataDir = tempDir('cocoon-forkcrash-');
  let daemons: RestartableDaemon | undefined;
  let db: Database;
  let image: Image;

  before(async () => {
    daemons = await RestartableDaemon.prepare(dataDir);
    ({ db, image } = daemons);
  });
  after(async () => {
    const leaked = daemons ? await daemons.close() : cleanupDir(dataDir);
    assert.deepEqual(leaked, [], 'a test left QEMU processes running');
  });

  interface Vm {
    id: string;
    token: string;
  }

  async function prepare(api: ApiClient, gatewayPort: number): Promise<Vm> {
    const started = await api('POST', '/microvms', { image: image.id, idlePolicy: { maxIdleDurationSeconds: 600 } });
    assert.equal(started.status, 201, JSON.stringify(started.body));
    const vm = { id: started.body.id as string, token: started.body.token as string };
    const get = async (route: string, port?: number) => (await gatewayRequest(gatewayPort, vm.id, vm.token, route, port ? { port } : {})).body.trim();
    assert.equal(await get('/count', TESTAPP_PORT), '1');
    assert.equal(await get('/cgi-bin/write?before-the-crash'), 'written');
    return vm;
  }

  /** The source after recovery: RUNNING, its memory and disk one step on, the only microVM and QEMU there is. */
  async function verifySource(gatewayPort: number, vm: Vm): Promise<void> {
    const get = async (route: string, port?: number) => {
      const answer = await gatewayRequest(gatewayPort, vm.id, vm.token, route, port ? { port } : {});
      assert.equal(answer.status, 200, `${route}: ${answer.status} ${answer.body}`);
      return answer.body.trim();
    };
    assert.equal(await get('/count', TESTAPP_PORT), '2', 'the counter in memory went on, once');
    assert.equal(await get('/cgi-bin/file'), 'before-the-crash');
    const rows = await db.all<{ id: string; state: string }>("SELECT id, state FROM microvms WHERE state NOT IN ('TERMINATED')");
    assert.deepEqual(rows.map((r) => ({ ...r })), [{ id: vm.id, state: 'RUNNING' }], 'no fork was left behind');
    assert.deepEqual(fs.readdirSync(microvmsRoot(dataDir)), [vm.id], 'no files of a fork were left behind');
    const qemus = qemuProcessesMentioning(microvmsRoot(dataDir));
    assert.equal(qemus.length, 1, 'exactly one QEMU');
    assert.deepEqual(qemus, qemuProcessesMentioning(microvmDir(dataDir, vm.id)), "and it is the source's");
  }

  async function finish(api: ApiClient, id: string): Promise<void> {
    assert.equal((await api('DELETE', `/microvms/${id}`)).status, 204);
    await daemons!.down('stop');
    assert.deepEqual(qemuProcessesMentioning(microvmsRoot(dataDir)), []);
  }

  for (const point of ['fork:paused', 'fork:linked'] as const) {
    test(`SIGKILL during a fork of 2 (${point}): no fork, the source runs on intact`, async () => {
      let { api, d } = await daemons!.up({ COCOON_TEST_PAUSE_AT: point });
      const vm = await prepare(api, d.info.gatewayPort);
      void api('POST', `/microvms/${vm.id}/fork`, { count: 2 }).catch(() => undefined);
      assert.equal(await waitForPause(dataDir), `${point} ${vm.id}`);
      if (point === 'fork:paused') {
        const status = fs.readdirSync(microvmsRoot(dataDir)).length;
        assert.equal(status, 3, 'the forks have directories of their own while the source is paused');
      }
      await daemons!.down('kill');

      ({ api, d } = await daemons!.up());
      assert.deepEqual(d.info.recovery.adopted, [vm.id]);
      await verifySource(d.info.gatewayPort, vm);
      // The source forks fine afterwards.
      const forked = await api('POST', `/microvms/${vm.id}/fork`, { count: 1 });
      assert.equal(forked.status, 201, JSON.stringify(forked.body));
      const fork = forked.body.items[0] as Vm;
      assert.equal((await gatewayRequest(d.info.gatewayPort, fork.id, fork.token, '/count', { port: TESTAPP_PORT })).body.trim(), '3');
      assert.equal((await api('DELETE', `/microvms/${fork.id}`)).status, 204);
      await finish(api, vm.id);
    });
  }

  test('SIGKILL during a checkpoint (checkpoint:paused): the image FAILED with nothing kept, the source runs on intact', async () => {
    let { api, d } = await daemons!.up({ COCOON_TEST_PAUSE_AT: 'checkpoint:paused' });
    const vm = await prepare(api, d.info.gatewayPort);
    const answer = await api('POST', `/microvms/${vm.id}/checkpoint`, { name: 'crashed' });
    assert.equal(answer.status, 202, JSON.stringify(answer.body));
    const imageId = answer.body.id as string;
    assert.equal(await waitForPause(dataDir), `checkpoint:paused ${vm.id}`);
    assert.equal((await getImage(db, imageId))?.state, 'SNAPSHOTTING');
    await daemons!.down('kill');

    ({ api, d } = await daemons!.up());
    assert.deepEqual(d.info.recovery.checkpointsFailed, [imageId]);
    const failed = await getImage(db, imageId);
    assert.equal(failed?.state, 'FAILED');
    assert.match(failed?.error ?? '', /server_restarted/);
    for (const leftover of [imageSnapshotDir(dataDir, imageId), `${imageSnapshotDir(dataDir, imageId)}.partial`, imageBaseDisk(dataDir, imageId)]) {
      assert.equal(fs.existsSync(leftover), false, `${path.basename(leftover)} was removed`);
    }
    const started = await api('POST', '/microvms', { image: imageId });
    assert.equal(started.status, 409, 'no microVM starts from it');
    await verifySource(d.info.gatewayPort, vm);
    await finish(api, vm.id);
  });
});
