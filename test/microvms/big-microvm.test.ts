/**
 * The largest shape there is (16 vCPUs, 32 GiB) for the README tutorial's busybox app, through
 * the real pipeline (buildah), real QEMU and the real API, on a data directory of its own (a
 * sparse 40 GiB ext4 on a loop device: it costs the host only what is written):
 *
 * - disk follows what the guest uses, not the size it was given: bounds on allocated blocks
 *   (st_blocks) of the image snapshot, of a RUNNING microVM's files and of a SUSPENDED one's
 *   (before: 32 GiB reserved per RUNNING microVM, an image snapshot measured at 24 GiB);
 * - a data directory too full for what a launch or resume could need (the memory whole: a big
 *   guest's RAM file is sparse and may grow to its size) is refused up front with 507 `no_space`:
 *   no microVM made, the SUSPENDED one stays SUSPENDED, and wakes once there is room.
 *
 * And the space watch for such a guest (sparse RAM file): a disk filled from outside the ledger
 * stops the guest before its memory meets a full disk, and it continues with room again (a
 * 256 MiB guest made sparse by `COCOON_RAM_RESERVE_MAX_MIB=0`, to keep it cheap).
 *
 * No timings are asserted (the bench's `vm.big_*` figures measure them).
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { ensureBaseImages } from '../../src/builder/base-images.ts';
import { loadConfig } from '../../src/config/config.ts';
import { microvmDir } from '../../src/lifecycle/paths.ts';
import { startServer, type RunningServer } from '../../src/server.ts';
import { imagesModule } from '../../src/wiring/images.ts';
import { microvmModule } from '../../src/wiring/microvms.ts';
import { loadGuestArtifacts } from '../../src/guest/artifacts.ts';
import { defaultVmDriver } from '../../src/vmm/drivers.ts';
import { fillFilesystem, useFaultDir, waitUntil } from '../support/faults.ts';
import { makeTestRootDisk } from '../support/rootfs.ts';
import { apiClient, gatewayRequest, type ApiClient } from '../support/server.ts';
import { httpGet, qemuProcessesMentioning } from '../support/vm.ts';
import { BUSYBOX_APP, client as imagesClient, makeBundle, removeDataDir } from '../images/helpers.ts';

const MiB = 1024 * 1024;
const SLOW = { timeout: 900_000 };

/** Bytes allocated (st_blocks) to a file, or to every file under a directory. */
function allocated(target: string): number {
  const stats = fs.lstatSync(target);
  if (!stats.isDirectory()) return stats.blocks * 512;
  let total = 0;
  for (const entry of fs.readdirSync(target)) total += allocated(path.join(target, entry));
  return total;
}

const mib = (bytes: number) => `${(bytes / MiB).toFixed(1)} MiB`;

describe('a 32 GiB / 16 vCPU image of the busybox app and microVMs from it', () => {
  let server: RunningServer | undefined;
  let dataDir = '';
  // Registered before the fault directory's own hook, so that the server stops before the unmount.
  after(async () => {
    await server?.close().catch(() => undefined);
    if (dataDir) await removeDataDir(dataDir).catch(() => undefined);
  });
  const fault = useFaultDir({ after }, 'cocoon-big-');
  let api: ApiClient;
  let gatewayPort = 0;
  let image: { id: string; state: string; memoryMiB: number; vcpus: number };
  let imageMem = 0;
  let mount = '';

  before(async () => {
    await ensureBaseImages();
    mount = fault.ext4('data', 40 * 1024);
    dataDir = path.join(mount, 'data');
    fs.mkdirSync(dataDir, { mode: 0o755 });
    const microvms = microvmModule();
    server = await startServer({ ...loadConfig({ COCOON_DATA_DIR: dataDir }), apiPort: 0, gatewayPort: 0 }, [imagesModule(), microvms]);
    gatewayPort = microvms.gatewayPort;
    const key = fs.readFileSync(path.join(dataDir, 'admin-api-key'), 'utf8').trim();
    api = apiClient(server.apiUrl, key);
    const images = imagesClient(server.apiUrl, key);
    const upload = await images.uploadBundle(await makeBundle(BUSYBOX_APP));
    assert.equal(upload.status, 201, upload.text);
    const created = await images.post('/images', { name: 'big', bundle: upload.body.uri, vcpus: 16, memoryMiB: 32768 });
    assert.equal(created.status, 202, created.text);
    image = await images.waitForState(created.body.id, ['READY', 'FAILED']);
    assert.equal(image.state, 'READY', JSON.stringify(image));
    assert.equal(image.vcpus, 16);
    assert.equal(image.memoryMiB, 32768);
  });

  const launch = async (): Promise<{ id: string; token: string }> => {
    const created = await api('POST', '/microvms', { image: image.id, idlePolicy: { maxIdleDurationSeconds: 600 } });
    assert.equal(created.status, 201, JSON.stringify(created.body));
    const vm = created.body as { id: string; token: string };
    const answer = await gatewayRequest(gatewayPort, vm.id, vm.token, '/');
    assert.equal(answer.status, 200, answer.body);
    assert.equal(answer.body, 'busybox app\n');
    return vm;
  };

  test('disk follows use: the image snapshot, a RUNNING and a SUSPENDED microVM hold what the guest touched, not 32 GiB', SLOW, async (t) => {
    const snapshotDir = path.join(dataDir, 'images', image.id, 'snapshot');
    imageMem = allocated(path.join(snapshotDir, 'mem'));
    const manifest = JSON.parse(fs.readFileSync(path.join(snapshotDir, 'manifest.json'), 'utf8'));
    assert.equal(manifest.files.mem.sizeBytes, 32768 * MiB);
    // What the guest wrote: the kernel's page array for 32 GiB alone is 512 MiB (64 bytes per
    // 4 KiB page); reserved-but-unwritten blocks and zero pages are gone.
    assert.ok(imageMem <= 1024 * MiB, `image snapshot memory: ${mib(imageMem)} allocated`);
    assert.ok(allocated(snapshotDir) <= imageMem + 256 * MiB, `image snapshot: ${mib(allocated(snapshotDir))} allocated`);

    t.diagnostic(`image snapshot: memory ${mib(imageMem)}, all files ${mib(allocated(snapshotDir))} allocated`);
    const vm = await launch();
    // RUNNING: its RAM file is a copy of the image's data (what the guest touched, at least)
    // plus what it touched since; its disk layer holds its writes.
    const running = allocated(microvmDir(dataDir, vm.id));
    t.diagnostic(`RUNNING microVM: ${mib(running)} allocated`);
    assert.ok(running <= 2 * imageMem, `RUNNING microVM: ${mib(running)} allocated, image memory ${mib(imageMem)}`);

    const suspended = await api('POST', `/microvms/${vm.id}/suspend`);
    assert.equal(suspended.body.state, 'SUSPENDED', JSON.stringify(suspended.body));
    const held = allocated(microvmDir(dataDir, vm.id));
    t.diagnostic(`SUSPENDED microVM: ${mib(held)} allocated`);
    assert.ok(held <= 2 * imageMem, `SUSPENDED microVM: ${mib(held)} allocated, image memory ${mib(imageMem)}`);

    const woken = await gatewayRequest(gatewayPort, vm.id, vm.token, '/cgi-bin/hello');
    assert.equal(woken.status, 200, woken.body);
    assert.equal(woken.body, 'hello from cocoon\n');
    assert.equal((await api('DELETE', `/microvms/${vm.id}`)).status, 204);
  });

  test('a data directory too full for its memory: launch and resume refused up front with no_space; with room again it wakes', SLOW, async () => {
    const vm = await launch();
    assert.equal((await api('POST', `/microvms/${vm.id}/suspend`)).body.state, 'SUSPENDED');
    // Leave 16 GiB free: far more than the guest uses, less than its 32 GiB could claim.
    const stats = fs.statfsSync(mount);
    const filler = path.join(mount, 'filler');
    execFileSync('fallocate', ['-l', String(stats.bavail * stats.bsize - 16 * 1024 * MiB), filler]);
    try {
      const ids = async () => ((await api('GET', '/microvms')).body.items as Array<{ id: string }>).map((m) => m.id).sort();
      const before = await ids();
      const refused = await api('POST', '/microvms', { image: image.id });
      assert.equal(refused.status, 507, JSON.stringify(refused.body));
      assert.equal(refused.body.error.code, 'no_space');
      assert.match(refused.body.error.message, /no space left/i);
      assert.deepEqual(await ids(), before, 'no microVM made');

      const resume = await api('POST', `/microvms/${vm.id}/resume`);
      assert.equal(resume.status, 507, JSON.stringify(resume.body));
      assert.equal(resume.body.error.code, 'no_space');
      assert.equal((await api('GET', `/microvms/${vm.id}`)).body.state, 'SUSPENDED', 'still SUSPENDED, its state kept');
      assert.deepEqual(qemuProcessesMentioning(microvmDir(dataDir, vm.id)), [], 'no QEMU started');
    } finally {
      fs.rmSync(filler, { force: true });
    }
    const resumed = await api('POST', `/microvms/${vm.id}/resume`);
    assert.equal(resumed.body.state, 'RUNNING', JSON.stringify(resumed.body));
    const answer = await gatewayRequest(gatewayPort, vm.id, vm.token, '/cgi-bin/hello');
    assert.equal(answer.status, 200, answer.body);
    assert.equal(answer.body, 'hello from cocoon\n');
    assert.equal((await api('DELETE', `/microvms/${vm.id}`)).status, 204);
    assert.deepEqual(qemuProcessesMentioning(dataDir), []);
  });
});

describe('a guest whose RAM file is sparse, on a disk filled from outside', () => {
  const fault = useFaultDir({ after }, 'cocoon-sparse-');

  test('the space watch stops it while the disk is nearly full (never a SIGBUS) and continues it with its state once there is room', SLOW, async () => {
    const data = fault.ext4('data', 640);
    const disk = path.join(fault.dir, 'root.raw');
    makeTestRootDisk(disk);
    const previous = process.env.COCOON_RAM_RESERVE_MAX_MIB;
    process.env.COCOON_RAM_RESERVE_MAX_MIB = '0';
    const vm = await defaultVmDriver()
      .boot({ id: 'sparse-ram', runDir: path.join(data, 'vm'), vcpus: 1, memoryMiB: 256, accel: 'tcg', guest: loadGuestArtifacts(), disk: { path: disk, format: 'raw' }, network: { forwards: [{ guestPort: 8080 }] } })
      .finally(() => {
        if (previous === undefined) delete process.env.COCOON_RAM_RESERVE_MAX_MIB;
        else process.env.COCOON_RAM_RESERVE_MAX_MIB = previous;
      });
    try {
      const url = (route: string) => `http://127.0.0.1:${vm.endpoint(8080).port}${route}`;
      assert.equal(await httpGet(url('/cgi-bin/count')), '1');
      const ram = path.join(data, 'vm', 'mem');
      assert.ok(allocated(ram) < 256 * MiB, `the RAM file is sparse: ${mib(allocated(ram))} allocated`);
      const events: string[] = [];
      const stopWatch = vm.watchDiskSpace({ path: data, intervalMs: 100, onPaused: (cause) => events.push(`paused:${cause}`), onContinued: () => events.push('continued') });
      // Nearly full: 16 MiB left, below the watch's 64 MiB floor (room enough that the guest
      // cannot run into the wall before the watch stops it).
      const filler = fillFilesystem(data);
      fs.truncateSync(filler, fs.statSync(filler).size - 16 * MiB);
      assert.ok(await waitUntil(() => events.includes('paused:memory'), 10_000, 20), `stopped: ${events.join(', ')}`);
      await new Promise((resolve) => setTimeout(resolve, 500)); // a few more checks: it stays stopped
      assert.deepEqual(events, ['paused:memory']);
      assert.equal(vm.exited, false);
      fs.rmSync(filler);
      assert.ok(await waitUntil(() => events.includes('continued'), 10_000, 20), `continued: ${events.join(', ')}`);
      assert.equal(await httpGet(url('/cgi-bin/count')), '2', 'its memory kept');
      assert.equal(vm.exited, false);
      stopWatch();
    } finally {
      await vm.destroy();
    }
  });
});
