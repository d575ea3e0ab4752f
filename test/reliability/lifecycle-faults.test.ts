/**
 * Faults at the lifecycle level, for real: the daemon SIGKILLed while a microVM launches and
 * while it is terminated; QEMU SIGKILLed (from outside) during an API suspend and during a
 * resume; the data directory's disk full during a suspend and during an image build. Each ends
 * in a defined state with a clear error, leaves no QEMU nobody owns, and loses no SUSPENDED
 * microVM's state. (The daemon killed while RUNNING, suspending and resuming: crash.test.ts.)
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { ensureBaseImages } from '../../src/builder/base-images.ts';
import { makeExt4Disk } from '../../src/builder/rootfs.ts';
import { isCocoonError } from '../../src/common/errors.ts';
import type { PausePoint } from '../../src/lifecycle/engine.ts';
import { generationDir, microvmDir, microvmsRoot, runDir } from '../../src/lifecycle/paths.ts';
import type { Image } from '../../src/store/images.ts';
import type { Database } from '../../src/store/sql.ts';
import { dataChecksums, readSnapshotManifest } from '../../src/vmm/snapshot.ts';
import * as imageHelpers from '../images/helpers.ts';
import { waitForPause } from '../support/daemon.ts';
import { fillFilesystem, freeBytes, killQemuWhenItAppears, useFaultDir, waitUntil } from '../support/faults.ts';
import { createTestImage, TESTAPP_PORT } from '../support/image.ts';
import { RestartableDaemon } from '../support/restartable-daemon.ts';
import { gatewayRequest, startTestServer, type ApiClient, type TestServer } from '../support/server.ts';
import { cleanupDir, qemuProcessesMentioning, tempDir } from '../support/vm.ts';

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));
const VM_TEST = { timeout: 600_000 };

/** Fills the filesystem holding `dir` (fallocate for the bulk: no data written), leaving `leaveBytes`. */
function fillQuickly(dir: string, leaveBytes = 0): string[] {
  const bulk = path.join(dir, 'filler-bulk');
  const margin = leaveBytes + 4 * 1024 * 1024;
  const free = freeBytes(dir);
  if (free > margin) execFileSync('fallocate', ['-l', String(free - margin), bulk]);
  const rest = fillFilesystem(dir, 'filler-rest');
  if (leaveBytes > 0) fs.truncateSync(rest, Math.max(0, fs.statSync(rest).size - leaveBytes));
  return [bulk, rest];
}

async function stateOf(db: Database, id: string): Promise<{ state: string; error: string | null }> {
  return (await db.get<{ state: string; error: string | null }>('SELECT state, error FROM microvms WHERE id = ?', [id]))!;
}

async function settle(db: Database, id: string, timeoutMs = 120_000): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const { state } = await stateOf(db, id);
    if (state === 'RUNNING' || state === 'SUSPENDED' || state === 'FAILED' || state === 'TERMINATED') return state;
    if (Date.now() > deadline) throw new Error(`${id} stuck in ${state}`);
    await sleep(100);
  }
}

/** Checksums of a committed generation's memory and disk (to show that it was not touched). */
async function generationSums(dataDir: string, id: string, generation: number): Promise<string> {
  const dir = generationDir(dataDir, id, generation);
  const { files } = await readSnapshotManifest(dir); // its memory is `mem.diff` (docs/vmm.md "Memory diffs")
  return JSON.stringify(await dataChecksums([path.join(dir, files.mem.name), path.join(dir, 'disk.qcow2')]));
}

describe('the daemon killed during a launch and during a terminate, QEMU killed during a suspend and a resume', () => {
  // Made in `before`: a run filtered to other suites runs no `after` here, and must leave nothing.
  let dataDir = '';
  let daemons: RestartableDaemon | undefined;
  let server: TestServer | undefined;
  let db: Database;
  let image: Image;

  before(async () => {
    dataDir = tempDir('cocoon-lfault-');
    daemons = await RestartableDaemon.prepare(dataDir);
    ({ db, image } = daemons);
  });
  after(async () => {
    await server?.close().catch(() => undefined);
    const leaked = daemons ? await daemons.close() : dataDir ? cleanupDir(dataDir) : [];
    assert.deepEqual(leaked, [], 'a test left QEMU processes running');
  });

  const up = (env: Record<string, string> = {}) => daemons!.up(env);
  const down = (how: 'kill' | 'stop') => daemons!.down(how);

  async function create(api: ApiClient): Promise<{ id: string; token: string }> {
    const started = await api('POST', '/microvms', { image: image.id, idlePolicy: { maxIdleDurationSeconds: 600 } });
    assert.equal(started.status, 201, JSON.stringify(started.body));
    return started.body as { id: string; token: string };
  }

  async function get(gatewayPort: number, vm: { id: string; token: string }, route: string, port?: number): Promise<string> {
    const answer = await gatewayRequest(gatewayPort, vm.id, vm.token, route, port ? { port } : {});
    assert.equal(answer.status, 200, `${route}: ${answer.status} ${answer.body}`);
    return answer.body.trim();
  }

  /** Its own QEMU and nobody else's under microvms/. */
  function assertOnlyQemuOf(id: string): number {
    const all = qemuProcessesMentioning(microvmsRoot(dataDir));
    assert.deepEqual(all, qemuProcessesMentioning(microvmDir(dataDir, id)), 'no QEMU of anyone else');
    assert.equal(all.length, 1, 'exactly its own QEMU');
    return all[0]!;
  }

  async function terminate(api: ApiClient, id: string): Promise<void> {
    assert.equal((await api('DELETE', `/microvms/${id}`)).status, 204);
    assert.equal(fs.existsSync(microvmDir(dataDir, id)), false);
    assert.deepEqual(qemuProcessesMentioning(microvmsRoot(dataDir)), []);
  }

  for (const point of ['launch:starting', 'launch:restored'] as const) {
    test(`daemon SIGKILLed during a launch (${point}): the restart launches it again, RUNNING and answering, no orphan`, VM_TEST, async () => {
      let { api, d } = await up({ COCOON_TEST_PAUSE_AT: point });
      const vm = await create(api);
      assert.equal(await waitForPause(dataDir), `${point} ${vm.id}`);
      const before = qemuProcessesMentioning(microvmDir(dataDir, vm.id));
      assert.equal(before.length, point === 'launch:restored' ? 1 : 0, 'a QEMU exists only once restored');
      await down('kill');
      assert.equal((await stateOf(db, vm.id)).state, 'PENDING');

      ({ api, d } = await up());
      assert.deepEqual(d.info.recovery.relaunched, [vm.id]);
      assert.deepEqual(d.info.recovery.orphansKilled, [], 'the half-launched QEMU was killed as the microVM\'s own, not swept');
      assert.equal(await get(d.info.gatewayPort, vm, '/cgi-bin/count'), '1', 'a fresh start from the image');
      assert.equal(await get(d.info.gatewayPort, vm, '/count', TESTAPP_PORT), '1');
      assert.equal(await settle(db, vm.id), 'RUNNING');
      const pid = assertOnlyQemuOf(vm.id);
      assert.ok(!before.includes(pid), 'the QEMU of the killed daemon is gone');
      await terminate(api, vm.id);
      await down('stop');
    });
  }

  test('daemon SIGKILLed during a terminate (terminate:persisted): the restart completes it, files removed, no QEMU', VM_TEST, async () => {
    let { api, d } = await up({ COCOON_TEST_PAUSE_AT: 'terminate:persisted' });
    const vm = await create(api);
    assert.equal(await get(d.info.gatewayPort, vm, '/cgi-bin/count'), '1');
    const deleting = api('DELETE', `/microvms/${vm.id}`).catch(() => undefined);
    assert.equal(await waitForPause(dataDir), `terminate:persisted ${vm.id}`);
    assert.equal(qemuProcessesMentioning(microvmDir(dataDir, vm.id)).length, 1, 'its QEMU was not killed yet');
    await down('kill');
    await deleting;
    assert.equal((await stateOf(db, vm.id)).state, 'TERMINATING');

    ({ api, d } = await up());
    assert.deepEqual(d.info.recovery.terminated, [vm.id]);
    assert.equal((await stateOf(db, vm.id)).state, 'TERMINATED');
    assert.equal(fs.existsSync(microvmDir(dataDir, vm.id)), false, 'its files are removed');
    assert.deepEqual(qemuProcessesMentioning(microvmsRoot(dataDir)), [], 'no QEMU');
    const seen = await api('GET', `/microvms/${vm.id}`);
    assert.equal(seen.status, 200);
    assert.equal(seen.body.state, 'TERMINATED');
    assert.equal((await gatewayRequest(d.info.gatewayPort, vm.id, vm.token, '/')).status, 410);
    assert.equal((await api('DELETE', `/microvms/${vm.id}`)).status, 204, 'a second DELETE is a no-op');
    await down('stop');
  });

  // ---- QEMU killed from outside, with the server in this process (its pause points are ours) ----

  let hold: { point: PausePoint; run: (id: string) => Promise<void> } | undefined;

  async function serve(): Promise<TestServer> {
    await server?.close();
    server = await startTestServer({
      dataDir,
      options: {
        lifecycle: {
          pauseAt: async (point, id) => {
            if (hold?.point !== point) return;
            const { run } = hold;
            hold = undefined;
            await run(id);
          },
        },
      },
    });
    return server;
  }

  async function killQemuOf(id: string): Promise<void> {
    const pids = qemuProcessesMentioning(runDir(dataDir, id));
    assert.equal(pids.length, 1, 'one QEMU to kill');
    process.kill(pids[0]!, 'SIGKILL');
    assert.ok(await waitUntil(() => qemuProcessesMentioning(runDir(dataDir, id)).length === 0, 30_000, 10), 'QEMU is gone');
  }

  test('QEMU SIGKILLed during an API suspend, before its memory is saved: FAILED with the reason, gen-1 untouched, no orphan, the API answers', VM_TEST, async () => {
    const s = await serve();
    const vm = await create(s.api);
    assert.equal(await s.get(vm.id, vm.token, '/cgi-bin/count'), '1');
    assert.equal((await s.api('POST', `/microvms/${vm.id}/suspend`)).body.state, 'SUSPENDED');
    assert.equal(await s.get(vm.id, vm.token, '/cgi-bin/count'), '2', 'resumed from generation 1');
    const gen1 = await generationSums(dataDir, vm.id, 1);

    hold = { point: 'suspend:persisted', run: (id) => killQemuOf(id) };
    const suspended = await s.api('POST', `/microvms/${vm.id}/suspend`);
    assert.equal(suspended.status, 409, JSON.stringify(suspended.body));
    assert.equal(suspended.body.error.code, 'microvm_failed');
    assert.match(suspended.body.error.message, /could not be suspended.*QEMU .* exited during its snapshot/s);
    const seen = await s.api('GET', `/microvms/${vm.id}`);
    assert.equal(seen.status, 200, 'the API answers');
    assert.equal(seen.body.state, 'FAILED');
    assert.match(seen.body.error, /could not be suspended/);
    assert.deepEqual(qemuProcessesMentioning(microvmsRoot(dataDir)), [], 'no QEMU');
    assert.equal(await generationSums(dataDir, vm.id, 1), gen1, 'generation 1 is untouched');
    assert.equal(fs.existsSync(generationDir(dataDir, vm.id, 2)), false, 'no generation 2');
    assert.equal(fs.existsSync(`${generationDir(dataDir, vm.id, 2)}.partial`), false, 'nothing half-made');
    const through = await gatewayRequest(s.gatewayPort, vm.id, vm.token, '/cgi-bin/count');
    assert.equal(through.status, 502);
    assert.match(through.body, /microvm_failed/);
    assert.equal((await s.api('DELETE', `/microvms/${vm.id}`)).status, 204);
    assert.equal(fs.existsSync(microvmDir(dataDir, vm.id)), false);
  });

  test('QEMU SIGKILLed during an API suspend, once its device state is saved: the snapshot commits, SUSPENDED, the next request finds everything', VM_TEST, async () => {
    const s = await serve();
    const vm = await create(s.api);
    assert.equal(await s.get(vm.id, vm.token, '/cgi-bin/count'), '1');
    assert.equal(await s.get(vm.id, vm.token, '/count', { port: TESTAPP_PORT }), '1');
    hold = { point: 'suspend:state-saved', run: (id) => killQemuOf(id) };
    const suspended = await s.api('POST', `/microvms/${vm.id}/suspend`);
    assert.equal(suspended.status, 200, JSON.stringify(suspended.body));
    assert.equal(suspended.body.state, 'SUSPENDED');
    assert.deepEqual(qemuProcessesMentioning(microvmsRoot(dataDir)), []);
    assert.equal(await s.get(vm.id, vm.token, '/cgi-bin/count'), '2', 'the disk as saved');
    assert.equal(await s.get(vm.id, vm.token, '/count', { port: TESTAPP_PORT }), '2', 'the memory as saved');
    assertOnlyQemuOf(vm.id);
    assert.equal((await s.api('DELETE', `/microvms/${vm.id}`)).status, 204);
  });

  test('QEMU SIGKILLed while a resume restores it: back to SUSPENDED (503 + Retry-After), the next request wakes it with its state', VM_TEST, async () => {
    const s = await serve();
    const vm = await create(s.api);
    assert.equal(await s.get(vm.id, vm.token, '/cgi-bin/count'), '1');
    assert.equal(await s.get(vm.id, vm.token, '/count', { port: TESTAPP_PORT }), '1');
    assert.equal(await s.get(vm.id, vm.token, '/cgi-bin/write?survives-a-killed-resume'), 'written');
    assert.equal((await s.api('POST', `/microvms/${vm.id}/suspend`)).body.state, 'SUSPENDED');
    const gen1 = await generationSums(dataDir, vm.id, 1);

    let killer: Promise<number | undefined> | undefined;
    hold = {
      point: 'resume:persisted',
      run: async (id) => {
        killer = killQemuWhenItAppears(runDir(dataDir, id), 60_000);
      },
    };
    const woken = await gatewayRequest(s.gatewayPort, vm.id, vm.token, '/cgi-bin/count');
    assert.ok(await killer, 'a QEMU was started and killed');
    assert.equal(woken.status, 503, woken.body);
    assert.match(woken.body, /resume_failed/);
    assert.match(woken.body, /killed by SIGKILL while restoring/);
    assert.ok(woken.headers['retry-after'], 'Retry-After says to try again');
    const seen = await s.api('GET', `/microvms/${vm.id}`);
    assert.equal(seen.body.state, 'SUSPENDED', 'not FAILED: its snapshot is intact');
    assert.equal(seen.body.error, null);
    assert.deepEqual(qemuProcessesMentioning(microvmsRoot(dataDir)), [], 'no QEMU');
    assert.equal(await generationSums(dataDir, vm.id, 1), gen1, 'generation 1 is untouched');

    // The next request wakes it, with memory and disk as they were.
    assert.equal(await s.get(vm.id, vm.token, '/cgi-bin/count'), '2');
    assert.equal(await s.get(vm.id, vm.token, '/count', { port: TESTAPP_PORT }), '2');
    assert.equal(await s.get(vm.id, vm.token, '/cgi-bin/file'), 'survives-a-killed-resume');
    assert.equal((await stateOf(db, vm.id)).state, 'RUNNING');
    assertOnlyQemuOf(vm.id);

    // The same through the API's resume: 503 resume_failed, SUSPENDED, then a resume that works.
    assert.equal((await s.api('POST', `/microvms/${vm.id}/suspend`)).body.state, 'SUSPENDED');
    hold = {
      point: 'resume:persisted',
      run: async (id) => {
        killer = killQemuWhenItAppears(runDir(dataDir, id), 60_000);
      },
    };
    const resumed = await s.api('POST', `/microvms/${vm.id}/resume`);
    assert.ok(await killer, 'a QEMU was started and killed');
    assert.equal(resumed.status, 503, JSON.stringify(resumed.body));
    assert.equal(resumed.body.error.code, 'resume_failed');
    assert.equal((await stateOf(db, vm.id)).state, 'SUSPENDED');
    assert.equal((await s.api('POST', `/microvms/${vm.id}/resume`)).body.state, 'RUNNING');
    assert.equal(await s.get(vm.id, vm.token, '/count', { port: TESTAPP_PORT }), '3');
    assert.equal((await s.api('DELETE', `/microvms/${vm.id}`)).status, 204);
    await s.close();
    server = undefined;
    assert.deepEqual(qemuProcessesMentioning(microvmsRoot(dataDir)), []);
  });
});

describe("the data directory's disk full during a suspend", () => {
  let server: TestServer | undefined;
  // Registered before the fault directory's own hook, so that the server stops before the unmount.
  after(async () => {
    await server?.close().catch(() => undefined);
  });
  const fault = useFaultDir({ after }, 'cocoon-lfull-');

  test('suspend with no space: 507 no_space, RUNNING with its state; with space again it suspends and wakes intact', VM_TEST, async () => {
    const data = fault.ext4('data', 1024);
    server = await startTestServer({ dataDir: data });
    const s = server;
    await createTestImage({ db: s.server.db, dataDir: data, tenantId: s.adminTenantId });
    const created = await s.api('POST', '/microvms', { image: (await s.server.db.get<{ id: string }>('SELECT id FROM images'))!.id, idlePolicy: { maxIdleDurationSeconds: 600 } });
    assert.equal(created.status, 201, JSON.stringify(created.body));
    const vm = created.body as { id: string; token: string };
    assert.equal(await s.get(vm.id, vm.token, '/cgi-bin/count'), '1');
    assert.equal(await s.get(vm.id, vm.token, '/count', { port: TESTAPP_PORT }), '1');

    const fillers = fillQuickly(data);
    const suspended = await s.api('POST', `/microvms/${vm.id}/suspend`);
    assert.equal(suspended.status, 507, JSON.stringify(suspended.body));
    assert.equal(suspended.body.error.code, 'no_space');
    assert.match(suspended.body.error.message, /no space left/i);
    const seen = await s.api('GET', `/microvms/${vm.id}`);
    assert.equal(seen.body.state, 'RUNNING', 'back to RUNNING: the VM runs on');
    assert.equal(fs.existsSync(generationDir(data, vm.id, 1)), false, 'no generation 1');
    assert.equal(fs.existsSync(`${generationDir(data, vm.id, 1)}.partial`), false, 'nothing half-made');
    assert.equal(await s.get(vm.id, vm.token, '/cgi-bin/count'), '2', 'its disk state goes on');
    assert.equal(await s.get(vm.id, vm.token, '/count', { port: TESTAPP_PORT }), '2', 'its memory goes on');
    assert.equal(qemuProcessesMentioning(microvmDir(data, vm.id)).length, 1);

    for (const filler of fillers) fs.rmSync(filler, { force: true });
    assert.equal((await s.api('POST', `/microvms/${vm.id}/suspend`)).body.state, 'SUSPENDED');
    assert.deepEqual(qemuProcessesMentioning(microvmsRoot(data)), []);
    assert.equal(await s.get(vm.id, vm.token, '/cgi-bin/count'), '3');
    assert.equal(await s.get(vm.id, vm.token, '/count', { port: TESTAPP_PORT }), '3');
    assert.equal((await s.api('DELETE', `/microvms/${vm.id}`)).status, 204);
    await s.close();
    server = undefined;
    assert.deepEqual(qemuProcessesMentioning(data), []);
  });
});

describe("the data directory's disk full during an image build", () => {
  let t: imageHelpers.TestServer | undefined;
  let data = '';
  after(async () => {
    await t?.close().catch(() => undefined);
    if (data) await imageHelpers.removeDataDir(data).catch(() => undefined);
  });
  const fault = useFaultDir({ after }, 'cocoon-bfull-');

  test('no space for the root disk: FAILED with no_space, nothing of the build left, the daemon answers', VM_TEST, async () => {
    await ensureBaseImages();
    const mount = fault.ext4('data', 1024);
    data = path.join(mount, 'data');
    fs.mkdirSync(data);
    t = await imageHelpers.startTestServer({}, data);
    const api = imageHelpers.client(t.url, t.adminKey);
    const upload = await api.uploadBundle(await imageHelpers.makeBundle(imageHelpers.BUSYBOX_APP));
    assert.equal(upload.status, 201, upload.text);

    const fillers = fillQuickly(mount, 1024 * 1024);
    const created = await api.post('/images', { name: 'full', bundle: upload.body.uri });
    assert.equal(created.status, 202, created.text);
    const failed = await api.waitForState(created.body.id, ['READY', 'FAILED']);
    assert.equal(failed.state, 'FAILED');
    assert.match(failed.error, /^no_space: /, failed.error);
    await imageHelpers.assertNoLeftovers(data, failed.id);
    assert.equal(fs.existsSync(path.join(data, 'images', failed.id, 'snapshot')), false, 'no snapshot');
    assert.match((await api.get(`/images/${failed.id}/logs`)).text, /FAILED: no_space/);
    assert.equal((await api.get('/images')).status, 200, 'the daemon answers');
  });

  test('mkfs.ext4 running out of host space half-way through the root disk: no_space (not disk_too_small), no disk file left', async () => {
    const mount = fault.tmpfs('mkfs', 32);
    const source = path.join(mount, 'source');
    fs.mkdirSync(source);
    fs.writeFileSync(path.join(source, 'payload'), randomBytes(6 * 1024 * 1024));
    // Room for the files (so the check before mkfs lets it start), not for the filesystem's own blocks too.
    fillQuickly(mount, 6 * 1024 * 1024 + 8 * 1024);
    const diskPath = path.join(mount, 'disk', 'rootfs.ext4');
    await assert.rejects(makeExt4Disk({ sourceDir: source, diskPath, sizeMiB: 64 }), (error: unknown) => {
      assert.ok(isCocoonError(error, 'no_space'), `expected no_space, got ${String(error)}`);
      assert.equal(error.status, 507);
      assert.match(error.message, /mkfs\.ext4 could not write the disk file/);
      return true;
    });
    assert.equal(fs.existsSync(diskPath), false, 'the half-written disk is removed');
  });
});
