/**
 * The VM core with real QEMU: boot, snapshot, clones, clock and RNG after restore, suspend and
 * resume. One VM is booted and snapshotted once; the later tests restore that snapshot.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { loadGuestArtifacts } from '../../src/guest/artifacts.ts';
import { qemuExitsSettled } from '../../src/vmm/qemu/exits.ts';
import { QemuVm } from '../../src/vmm/qemu/qemu.ts';
import { holdRam, promisedBytes, releaseRam } from '../../src/vmm/space-ledger.ts';
import type { SnapshotManifest } from '../../src/vmm/types.ts';
import { makeTestRootDisk } from '../support/rootfs.ts';
import { cleanupDir, httpGet, qemuProcessesMentioning, tempDir } from '../support/vm.ts';

const APP_PORT = 8080;

function parseBackground(answer: string): { pid: number; ticks: number } {
  const match = /^running (\d+) (\d+)$/.exec(answer);
  assert.ok(match, `the background loop is not running: ${answer}`);
  return { pid: Number(match[1]), ticks: Number(match[2]) };
}
const network = { forwards: [{ guestPort: APP_PORT }] };

describe('VM core with real QEMU', () => {
  const dir = tempDir('cocoon-vmcore-');
  const guest = loadGuestArtifacts();
  const snapshotDir = path.join(dir, 'snapshot');
  let snapshotTakenAt = 0;
  let manifest: SnapshotManifest | undefined;
  const url = (vm: QemuVm, route: string) => `http://127.0.0.1:${vm.hostPort(APP_PORT)}${route}`;

  before(() => makeTestRootDisk(path.join(dir, 'root.raw')));
  after(() => {
    const leaked = cleanupDir(dir);
    assert.deepEqual(leaked, [], 'a test left QEMU processes running');
  });

  test('a VM boots from a minimal root disk and its HTTP app answers through the forwarded port', async () => {
    const vm = await QemuVm.boot({
      id: 'base',
      runDir: path.join(dir, 'base'),
      vcpus: 1,
      memoryMiB: 256,
      accel: 'tcg',
      guest,
      disk: { path: path.join(dir, 'root.raw'), format: 'raw' },
      network,
    });
    try {
      assert.equal(await httpGet(url(vm, '/')), 'hello from cocoon');
      assert.equal(await httpGet(url(vm, '/cgi-bin/count')), '1');
      const stats = vm.stats();
      assert.equal(stats.pid, vm.pid);
      assert.ok(stats.rssBytes > 10 * 1024 * 1024, `QEMU's resident memory: ${stats.rssBytes}`);
      assert.ok(stats.cpuMs > 0, 'booting used CPU time');
      assert.match(vm.serialTail(), /cocoon-init: started \/bin\/sh/, 'the console is kept');
      manifest = await vm.snapshot(snapshotDir, { compact: true });
      snapshotTakenAt = Date.now();
    } finally {
      await vm.destroy();
    }
    assert.equal(vm.exited, true, 'snapshot ends the QEMU process');
    assert.deepEqual(qemuProcessesMentioning(path.join(dir, 'base')), []);
    assert.equal(manifest.shape.memoryMiB, 256);
    assert.ok(manifest.files.state.sizeBytes < 1024 * 1024, 'device state only: guest RAM is not in the stream');
    for (const file of ['manifest.json', 'state', 'mem', 'disk.raw']) assert.ok(fs.existsSync(path.join(snapshotDir, file)), file);
  });

  test('a snapshot restores into two clones at once, each with its own state and its own randomness', async () => {
    assert.ok(manifest, 'needs the snapshot of the first test');
    const memBefore = fs.statSync(path.join(snapshotDir, 'mem'));
    const clones = await Promise.all(
      ['clone-a', 'clone-b'].map((id) => QemuVm.restore({ id, runDir: path.join(dir, id), snapshotDir, network })),
    );
    try {
      const [a, b] = clones as [QemuVm, QemuVm];
      // Read right after restore: the kernel RNG was reseeded with host bytes before restore returned.
      const [randomA, randomB] = await Promise.all([httpGet(url(a, '/cgi-bin/random')), httpGet(url(b, '/cgi-bin/random'))]);
      assert.match(randomA, /^[0-9a-f]{64}$/);
      assert.notEqual(randomA, randomB, 'clones of one snapshot must not produce the same random bytes');
      // The snapshot was taken after one request: both clones continue from 1, independently.
      assert.equal(await httpGet(url(a, '/cgi-bin/count')), '2');
      assert.equal(await httpGet(url(a, '/cgi-bin/count')), '3');
      assert.equal(await httpGet(url(b, '/cgi-bin/count')), '2', 'a counter advanced in one clone is not advanced in the other');
      assert.notEqual(a.ramPath, b.ramPath);
    } finally {
      await Promise.all(clones.map((clone) => clone.destroy()));
    }
    const memAfter = fs.statSync(path.join(snapshotDir, 'mem'));
    assert.equal(memAfter.mtimeMs, memBefore.mtimeMs, "the snapshot's memory file is never written by clones");
    assert.deepEqual(qemuProcessesMentioning(path.join(dir, 'clone-')), []);
    assert.equal(fs.existsSync(path.join(dir, 'clone-a')), false);
  });

  test("after a snapshot left 10 s, a restored guest's wall clock is within 2 s of the host's", async () => {
    assert.ok(snapshotTakenAt > 0, 'needs the snapshot of the first test');
    const wait = snapshotTakenAt + 10_500 - Date.now();
    if (wait > 0) await new Promise((resolve) => setTimeout(resolve, wait));
    const vm = await QemuVm.restore({ id: 'clock', runDir: path.join(dir, 'clock'), snapshotDir, network });
    try {
      const guestSeconds = Number(await httpGet(url(vm, '/cgi-bin/time')));
      assert.ok(Math.abs(guestSeconds - Date.now() / 1000) <= 2, `guest clock ${guestSeconds} vs host ${Date.now() / 1000}`);
    } finally {
      await vm.destroy();
    }
  });

  test("the host hears the workload's exit code, and the guest powers off by itself", async () => {
    const disk = path.join(dir, 'exits.raw');
    makeTestRootDisk(disk, { workload: ['arg /bin/sh', 'arg -c', 'arg sleep 0.5; exit 7'] });
    const vm = await QemuVm.boot({ id: 'exits', runDir: path.join(dir, 'exits'), vcpus: 1, memoryMiB: 128, accel: 'tcg', guest, disk: { path: disk, format: 'raw' }, network: { forwards: [] } });
    try {
      const code = new Promise<number>((resolve) => vm.guest.once('exit', resolve));
      assert.equal(await code, 7);
      await vm.waitForExit();
      assert.equal(vm.exited, true);
    } finally {
      await vm.destroy();
    }
  });

  test('a shutdown request sends SIGTERM to the workload, then the guest powers off', async () => {
    const disk = path.join(dir, 'stops.raw');
    // The workload is the program itself, not a shell (busybox ash may ignore SIGTERM while it starts).
    makeTestRootDisk(disk, { workload: ['arg /bin/sleep', 'arg 600'] });
    const vm = await QemuVm.boot({ id: 'stops', runDir: path.join(dir, 'stops'), vcpus: 1, memoryMiB: 128, accel: 'tcg', guest, disk: { path: disk, format: 'raw' }, network: { forwards: [] } });
    try {
      const code = new Promise<number>((resolve) => vm.guest.once('exit', resolve));
      vm.guest.shutdown(30_000);
      assert.equal(await code, 128 + 15, 'the workload ended by SIGTERM, before the grace period ran out');
      await vm.waitForExit();
    } finally {
      await vm.destroy();
    }
  });

  test('suspend (snapshot, QEMU gone) then resume keeps background processes, their state and files', async () => {
    const vm = await QemuVm.restore({ id: 'sleeper', runDir: path.join(dir, 'sleeper'), snapshotDir, network });
    const suspended = path.join(dir, 'sleeper-suspended');
    let resumed: QemuVm | undefined;
    try {
      assert.equal(await httpGet(url(vm, '/cgi-bin/write?kept-across-suspend')), 'written');
      const before = parseBackground(await httpGet(url(vm, '/cgi-bin/bg')));
      const pid = vm.pid;
      await vm.snapshot(suspended);
      assert.equal(vm.exited, true);
      assert.throws(() => process.kill(pid, 0), 'the QEMU process is gone while suspended');
      assert.deepEqual(qemuProcessesMentioning(path.join(dir, 'sleeper')), []);

      resumed = await QemuVm.restore({ id: 'sleeper2', runDir: path.join(dir, 'sleeper2'), snapshotDir: suspended, network });
      const justAfter = parseBackground(await httpGet(url(resumed, '/cgi-bin/bg')));
      assert.equal(justAfter.pid, before.pid, 'the same background process, not a new one');
      assert.ok(justAfter.ticks >= before.ticks, `its counter continued (${before.ticks} then ${justAfter.ticks})`);
      assert.equal(await httpGet(url(resumed, '/cgi-bin/file')), 'kept-across-suspend');
      await new Promise((resolve) => setTimeout(resolve, 1000));
      const later = parseBackground(await httpGet(url(resumed, '/cgi-bin/bg')));
      assert.ok(later.ticks > justAfter.ticks, 'and it is still running');
    } finally {
      await vm.destroy();
      await resumed?.destroy();
    }
  });

  test("a suspend that ends QEMU in the background hands its run directory over at its answer: the exit after it removes nothing of the next VM's", async () => {
    // A resume restores into the run directory the suspended VM had, without waiting for that
    // VM's exit (tuning.ts `overlapExits`): the ending process's clean-up must not touch the
    // names (launch record, RAM file) nor the space ledger's entry the next VM has there.
    const runDir = path.join(dir, 'handover');
    const launchRecord = path.join(runDir, 'launch.json');
    const ram = path.join(runDir, 'mem');
    const vms: QemuVm[] = [];
    try {
      const first = await QemuVm.restore({ id: 'handover', runDir, snapshotDir, network });
      vms.push(first);
      assert.equal(await httpGet(url(first, '/cgi-bin/write?handed-over')), 'written');
      await first.snapshot(path.join(dir, 'handover-1'), { endAfterAnswer: true });
      // What the next VM has in this run directory, made at once (before the exit is seen,
      // unless it was very quick): a launch record, and a sparse RAM file promised in the ledger.
      fs.writeFileSync(launchRecord, '{"next": true}');
      fs.writeFileSync(ram, '');
      fs.truncateSync(ram, 64 * 1024 * 1024);
      holdRam(ram, 64 * 1024 * 1024);
      try {
        await first.waitForExit();
        await qemuExitsSettled();
        assert.equal(fs.readFileSync(launchRecord, 'utf8'), '{"next": true}', "the exit left the next VM's launch record");
        assert.ok(fs.existsSync(ram), "the exit left the next VM's RAM file");
        assert.ok(promisedBytes(runDir) >= 64 * 1024 * 1024, "the exit left the next VM's RAM file promised in the space ledger");
      } finally {
        releaseRam(ram);
        fs.rmSync(launchRecord, { force: true });
        fs.rmSync(ram, { force: true });
      }

      // And a real resume into it at once, while the suspended QEMU still exits.
      const second = await QemuVm.restore({ id: 'handover', runDir, snapshotDir: path.join(dir, 'handover-1'), network });
      vms.push(second);
      assert.equal(await httpGet(url(second, '/cgi-bin/file')), 'handed-over');
      await second.snapshot(path.join(dir, 'handover-2'), { endAfterAnswer: true });
      const third = await QemuVm.restore({ id: 'handover', runDir, snapshotDir: path.join(dir, 'handover-2'), network });
      vms.push(third);
      await second.waitForExit();
      await qemuExitsSettled();
      assert.equal(await httpGet(url(third, '/cgi-bin/file')), 'handed-over', 'the resumed guest has its file');
      assert.equal((JSON.parse(fs.readFileSync(launchRecord, 'utf8')) as { pid: number }).pid, third.pid, "the launch record is the resumed VM's");
      assert.ok(fs.existsSync(ram), 'its RAM file is there');
      assert.deepEqual(qemuProcessesMentioning(runDir), [third.pid], 'only the resumed QEMU runs for the run directory');
    } finally {
      for (const vm of vms) await vm.kill();
    }
  });
});
