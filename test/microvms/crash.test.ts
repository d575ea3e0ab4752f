/**
 * Crash safety: the daemon (a child process) is SIGKILLed while a microVM runs, at each step of
 * a suspend and of a resume; a restarted daemon finds the microVM RUNNING or SUSPENDED with its
 * memory, processes and files intact, and no QEMU process that nobody owns.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { microvmDir, microvmsRoot } from '../../src/lifecycle/paths.ts';
import type { Image } from '../../src/store/images.ts';
import type { Database } from '../../src/store/sql.ts';
import { waitForPause } from '../support/daemon.ts';
import { TESTAPP_PORT } from '../support/image.ts';
import { RestartableDaemon } from '../support/restartable-daemon.ts';
import { gatewayRequest, type ApiClient } from '../support/server.ts';
import { cleanupDir, qemuProcessesMentioning, tempDir } from '../support/vm.ts';

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

describe('the daemon killed at any moment, then restarted', () => {
  const dataDir = tempDir('cocoon-crash-');
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

  const up = (env: Record<string, string> = {}) => daemons!.up(env);
  const down = (how: 'kill' | 'stop') => daemons!.down(how);

  async function state(id: string): Promise<string> {
    return (await db.get<{ state: string }>('SELECT state FROM microvms WHERE id = ?', [id]))!.state;
  }

  async function settle(id: string, timeoutMs = 60_000): Promise<string> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const now = await state(id);
      if (now === 'RUNNING' || now === 'SUSPENDED' || now === 'FAILED' || now === 'TERMINATED') return now;
      if (Date.now() > deadline) throw new Error(`${id} stuck in ${now}`);
      await sleep(100);
    }
  }

  /** A running microVM with known state: CGI counter 1, in-memory counter 1, a file written. */
  async function prepare(api: ApiClient, gatewayPort: number): Promise<{ id: string; token: string; bgPid: number }> {
    const started = await api('POST', '/microvms', { image: image.id, idlePolicy: { maxIdleDurationSeconds: 600 } });
    assert.equal(started.status, 201, JSON.stringify(started.body));
    const { id, token } = started.body as { id: string; token: string };
    const get = async (route: string, port?: number) => (await gatewayRequest(gatewayPort, id, token, route, port ? { port } : {})).body.trim();
    assert.equal(await get('/cgi-bin/count'), '1');
    assert.equal(await get('/count', TESTAPP_PORT), '1');
    assert.equal(await get('/cgi-bin/write?survives-crashes'), 'written');
    const bg = /^running (\d+) \d+$/.exec(await get('/cgi-bin/bg'));
    assert.ok(bg);
    return { id, token, bgPid: Number(bg[1]) };
  }

  /** After recovery: the state from `prepare` is there, one step on; no QEMU but its own. */
  async function verify(gatewayPort: number, vm: { id: string; token: string; bgPid: number }, expectedCount: number): Promise<void> {
    const get = async (route: string, port?: number) => {
      const answer = await gatewayRequest(gatewayPort, vm.id, vm.token, route, port ? { port } : {});
      assert.equal(answer.status, 200, `${route}: ${answer.status} ${answer.body}`);
      return answer.body.trim();
    };
    assert.equal(await get('/cgi-bin/count'), String(expectedCount), 'the counter on disk went on');
    assert.equal(await get('/count', TESTAPP_PORT), String(expectedCount), 'the counter in memory went on');
    assert.equal(await get('/cgi-bin/file'), 'survives-crashes');
    assert.match(await get('/cgi-bin/bg'), new RegExp(`^running ${vm.bgPid} \\d+$`), 'the same background process runs');
    assert.equal(await state(vm.id), 'RUNNING');
    const qemus = qemuProcessesMentioning(microvmsRoot(dataDir));
    assert.deepEqual(qemus, qemuProcessesMentioning(microvmDir(dataDir, vm.id)), 'no QEMU of anyone else');
    assert.equal(qemus.length, 1, 'exactly its own QEMU');
  }

  async function finish(api: ApiClient, id: string): Promise<void> {
    assert.equal((await api('DELETE', `/microvms/${id}`)).status, 204);
    await down('stop');
    assert.deepEqual(qemuProcessesMentioning(microvmsRoot(dataDir)), []);
  }

  test('SIGKILL while RUNNING: the restarted daemon adopts the same QEMU, which then suspends and resumes', async () => {
    let { api, d } = await up();
    const vm = await prepare(api, d.info.gatewayPort);
    const [pid] = qemuProcessesMentioning(microvmDir(dataDir, vm.id));
    await down('kill');
    assert.deepEqual(qemuProcessesMentioning(microvmDir(dataDir, vm.id)), [pid], 'QEMU outlives the daemon');

    ({ api, d } = await up());
    assert.deepEqual(d.info.recovery.adopted, [vm.id]);
    await verify(d.info.gatewayPort, vm, 2);
    assert.deepEqual(qemuProcessesMentioning(microvmDir(dataDir, vm.id)), [pid], 'the same QEMU process');
    // The adopted VM's control channels work: suspend and resume it.
    assert.equal((await api('POST', `/microvms/${vm.id}/suspend`)).body.state, 'SUSPENDED');
    assert.deepEqual(qemuProcessesMentioning(microvmDir(dataDir, vm.id)), []);
    await verify(d.info.gatewayPort, vm, 3);
    await finish(api, vm.id);
  });

  for (const point of ['suspend:persisted', 'suspend:state-saved', 'suspend:committed'] as const) {
    test(`SIGKILL during a suspend (${point}): the restart finishes it, nothing is lost`, async () => {
      let { api, d } = await up({ COCOON_TEST_PAUSE_AT: point });
      const vm = await prepare(api, d.info.gatewayPort);
      void api('POST', `/microvms/${vm.id}/suspend`).catch(() => undefined);
      assert.equal(await waitForPause(dataDir), `${point} ${vm.id}`);
      await down('kill');
      assert.equal(await state(vm.id), 'SUSPENDING');

      ({ api, d } = await up());
      if (point === 'suspend:persisted') {
        // Nothing was saved yet: the QEMU is adopted again and the suspend is done anew.
        assert.deepEqual(d.info.recovery.suspendsRolledBack, [vm.id]);
        const deadline = Date.now() + 30_000;
        while ((await settle(vm.id)) !== 'SUSPENDED' || (await state(vm.id)) !== 'SUSPENDED') {
          assert.ok(Date.now() < deadline, `still ${await state(vm.id)}`);
          await sleep(100);
        }
      } else {
        // The device state was saved (or the snapshot committed): the snapshot is completed.
        assert.deepEqual(d.info.recovery.suspendsCompleted, [vm.id]);
        assert.equal(await state(vm.id), 'SUSPENDED');
      }
      assert.deepEqual(qemuProcessesMentioning(microvmsRoot(dataDir)), [], 'SUSPENDED: no QEMU at all');
      await verify(d.info.gatewayPort, vm, 2);
      await finish(api, vm.id);
    });
  }

  for (const point of ['resume:persisted', 'resume:restored'] as const) {
    test(`SIGKILL during a resume (${point}): the restart rolls it back to SUSPENDED, the next request wakes it intact`, async () => {
      let { api, d } = await up({ COCOON_TEST_PAUSE_AT: point });
      const vm = await prepare(api, d.info.gatewayPort);
      assert.equal((await api('POST', `/microvms/${vm.id}/suspend`)).body.state, 'SUSPENDED');
      void gatewayRequest(d.info.gatewayPort, vm.id, vm.token, '/cgi-bin/count').catch(() => undefined);
      assert.equal(await waitForPause(dataDir), `${point} ${vm.id}`);
      if (point === 'resume:restored') assert.equal(qemuProcessesMentioning(microvmDir(dataDir, vm.id)).length, 1, 'a QEMU was restored');
      await down('kill');
      assert.equal(await state(vm.id), 'RESUMING');

      ({ api, d } = await up());
      assert.deepEqual(d.info.recovery.resumesRolledBack, [vm.id]);
      assert.equal(await state(vm.id), 'SUSPENDED');
      assert.deepEqual(qemuProcessesMentioning(microvmsRoot(dataDir)), [], 'the half-restored QEMU is gone');
      await verify(d.info.gatewayPort, vm, 2);
      await finish(api, vm.id);
    });
  }

  test('a graceful stop suspends RUNNING microVMs; the next start serves them again', async () => {
    let { api, d } = await up();
    const vm = await prepare(api, d.info.gatewayPort);
    await down('stop');
    assert.equal(await state(vm.id), 'SUSPENDED');
    assert.deepEqual(qemuProcessesMentioning(microvmsRoot(dataDir)), []);
    ({ api, d } = await up());
    await verify(d.info.gatewayPort, vm, 2);
    await finish(api, vm.id);
  });
});
