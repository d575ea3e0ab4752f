/**
 * Faults at the VM level, for real: QEMU SIGKILLed at each step of a snapshot and of a restore,
 * and the data directory's disk full during a snapshot, a restore, and while guests run. Each
 * ends in a defined error, leaves no QEMU process, and loses no state that was committed.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { isCocoonError, type ErrorCode } from '../../src/common/errors.ts';
import { loadGuestArtifacts } from '../../src/guest/artifacts.ts';
import { QemuVm } from '../../src/vmm/qemu/qemu.ts';
import { watchDiskSpace } from '../../src/vmm/qemu/space-watch.ts';
import { dataChecksums } from '../../src/vmm/snapshot.ts';
import { fillFilesystem, killQemuWhenItAppears, useFaultDir, waitUntil } from '../support/faults.ts';
import { makeTestRootDisk } from '../support/rootfs.ts';
import { httpGet, qemuProcessesMentioning } from '../support/vm.ts';

const APP_PORT = 8080;
const network = { forwards: [{ guestPort: APP_PORT }] };

function hasCode(code: ErrorCode) {
  return (error: unknown) => {
    assert.ok(isCocoonError(error, code), `expected ${code}, got ${(error as Error)?.stack ?? String(error)}`);
    return true;
  };
}

const url = (vm: QemuVm, route: string) => `http://127.0.0.1:${vm.hostPort(APP_PORT)}${route}`;

/** Runs `action` right after QMP command `command` returns on this VM (once). */
function afterQmpCommand(vm: QemuVm, command: string, action: () => void): void {
  const qmp = vm.qmp as unknown as { execute: (name: string, ...rest: unknown[]) => Promise<unknown> };
  const original = qmp.execute.bind(qmp);
  let done = false;
  qmp.execute = async (name: string, ...rest: unknown[]) => {
    const result = await original(name, ...rest);
    if (name === command && !done) {
      done = true;
      action();
    }
    return result;
  };
}

describe('QEMU killed during a snapshot or a restore', () => {
  const fault = useFaultDir({ after }, 'cocoon-kill-');
  const dir = fault.dir;
  const guest = loadGuestArtifacts();
  const base = path.join(dir, 'base');
  let baseSums = '';

  before(async () => {
    makeTestRootDisk(path.join(dir, 'root.raw'));
    const vm = await QemuVm.boot({
      id: 'kill-base',
      runDir: path.join(dir, 'kill-base'),
      vcpus: 1,
      memoryMiB: 256,
      accel: 'tcg',
      guest,
      disk: { path: path.join(dir, 'root.raw'), format: 'raw' },
      network,
    });
    assert.equal(await httpGet(url(vm, '/cgi-bin/count')), '1');
    await vm.snapshot(base, { compact: true });
    await vm.destroy();
    baseSums = JSON.stringify(await dataChecksums([path.join(base, 'mem'), path.join(base, 'disk.raw')]));
  });

  /** The base snapshot is untouched and still restores with its state. */
  async function assertBaseIntact(id: string): Promise<void> {
    assert.equal(JSON.stringify(await dataChecksums([path.join(base, 'mem'), path.join(base, 'disk.raw')])), baseSums);
    const vm = await QemuVm.restore({ id, runDir: path.join(dir, id), snapshotDir: base, network });
    try {
      assert.equal(await httpGet(url(vm, '/cgi-bin/count')), '2');
    } finally {
      await vm.destroy();
    }
  }

  /** Arms a SIGKILL of the VM's QEMU at one point of its next snapshot. */
  const snapshotKills: Array<[string, (vm: QemuVm) => Promise<void>]> = [
    ['after the VM was paused, before its state is saved', async (vm) => afterQmpCommand(vm, 'stop', () => process.kill(vm.pid, 'SIGKILL'))],
    [
      'while its device state is being saved',
      async (vm) => {
        // The state is tens of kilobytes, saved within a millisecond of `migrate`: a kill sent
        // then may land after it. QEMU's pause-before-switchover holds the migration, begun
        // (the stream's header is written) but before the devices are, until the kill lands.
        const qmp = vm.qmp as unknown as { execute: (name: string, args: unknown) => Promise<unknown> };
        await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'pause-before-switchover', state: true }] });
        vm.qmp.on('event', (event) => {
          if (event.event === 'MIGRATION' && event.data?.status === 'pre-switchover') process.kill(vm.pid, 'SIGKILL');
        });
      },
    ],
  ];
  for (const [index, [when, armKill]] of snapshotKills.entries()) {
    test(`killed ${when}: vm_gone, no snapshot, the VM's files back in its run directory`, { timeout: 180_000 }, async () => {
      const id = `snap-kill-${index}`;
      const runDir = path.join(dir, id);
      const vm = await QemuVm.restore({ id, runDir, snapshotDir: base, network });
      try {
        assert.equal(await httpGet(url(vm, '/cgi-bin/count')), '2');
        await armKill(vm);
        const target = path.join(dir, `${id}-suspended`);
        await assert.rejects(vm.snapshot(target), hasCode('vm_gone'));
        assert.equal(fs.existsSync(target), false);
        assert.equal(fs.existsSync(`${target}.partial`), false);
        assert.ok(fs.existsSync(vm.ramPath) && fs.existsSync(vm.disk.path), 'RAM file and disk are where they were');
        assert.deepEqual(qemuProcessesMentioning(runDir), []);
      } finally {
        await vm.destroy();
      }
      await assertBaseIntact(`${id}-check`);
    });
  }

  test('killed once its state is saved: the snapshot needs QEMU no more and commits whole', { timeout: 180_000 }, async () => {
    const id = 'snap-kill-late';
    const vm = await QemuVm.restore({ id, runDir: path.join(dir, id), snapshotDir: base, network });
    const target = path.join(dir, `${id}-suspended`);
    try {
      assert.equal(await httpGet(url(vm, '/cgi-bin/count')), '2');
      vm.qmp.on('event', (event) => {
        if (event.event === 'MIGRATION' && event.data?.status === 'completed') process.kill(vm.pid, 'SIGKILL');
      });
      await vm.snapshot(target);
      assert.deepEqual(qemuProcessesMentioning(path.join(dir, id)), []);
    } finally {
      await vm.destroy();
    }
    const resumed = await QemuVm.restore({ id: `${id}-2`, runDir: path.join(dir, `${id}-2`), snapshotDir: target, network });
    try {
      assert.equal(await httpGet(url(resumed, '/cgi-bin/count')), '3', 'the state saved before the kill is all there');
    } finally {
      await resumed.destroy();
    }
  });

  test('killed as soon as a restore starts QEMU: vm_killed, nothing left, the snapshot restores again', { timeout: 180_000 }, async () => {
    const id = 'restore-kill-early';
    const runDir = path.join(dir, id);
    const killer = killQemuWhenItAppears(runDir);
    await assert.rejects(QemuVm.restore({ id, runDir, snapshotDir: base, network }), hasCode('vm_killed'));
    assert.ok(await killer, 'QEMU was started and killed');
    assert.deepEqual(qemuProcessesMentioning(runDir), []);
    assert.equal(fs.existsSync(runDir), false);
    // Again in the same run directory, as the lifecycle's next wake does.
    await assertBaseIntact(id);
  });

  test('killed while a restore loads the device state: vm_killed (not snapshot_corrupt), the snapshot restores again', { timeout: 180_000 }, async () => {
    const id = 'restore-kill-load';
    const runDir = path.join(dir, id);
    const incoming = path.join(runDir, 'qemu', 'incoming.sock');
    let killed = false;
    const killer = waitUntil(() => fs.existsSync(incoming), 60_000).then((seen) => {
      const pid = qemuProcessesMentioning(runDir)[0];
      if (seen && pid !== undefined) {
        process.kill(pid, 'SIGKILL');
        killed = true;
      }
    });
    const outcome = await QemuVm.restore({ id, runDir, snapshotDir: base, network }).then(
      async (vm) => {
        await vm.destroy(); // the load won the race: a restore that completed is fine too
        return 'restored';
      },
      (error: unknown) => error,
    );
    await killer;
    if (killed) hasCode('vm_killed')(outcome);
    assert.deepEqual(qemuProcessesMentioning(runDir), []);
    assert.equal(fs.existsSync(runDir), false);
    // Again in the same run directory, as the lifecycle's next wake does.
    await assertBaseIntact(id);
  });
});

describe("the data directory's disk full", () => {
  const fault = useFaultDir({ after }, 'cocoon-full-');
  const guest = loadGuestArtifacts();
  let base = '';

  /**
   * A VM whose run directory (RAM file; the snapshots go there too) is on the small `data`
   * filesystem and whose own disk is elsewhere: the guest's disk writes do not meet the full
   * disk (that case is the last test).
   */
  async function bootOn(data: string, id: string): Promise<QemuVm> {
    const disk = path.join(fault.dir, `${id}.raw`);
    makeTestRootDisk(disk);
    return QemuVm.boot({ id, runDir: path.join(data, id), vcpus: 1, memoryMiB: 256, accel: 'tcg', guest, disk: { path: disk, format: 'raw' }, network });
  }

  before(async () => {
    base = path.join(fault.dir, 'base');
    const vm = await bootOn(fault.dir, 'full-base');
    await vm.snapshot(base, { compact: true });
    await vm.destroy();
  });

  for (const leftKiB of [0, 32]) {
    test(`during a snapshot (${leftKiB} KiB left): no_space, nothing half-made, the VM runs on with its state; with space again it suspends`, { timeout: 300_000 }, async () => {
      const data = fault.ext4(`data-snap-${leftKiB}`, 512);
      const vm = await bootOn(data, `full-snap-${leftKiB}`);
      let resumed: QemuVm | undefined;
      try {
        assert.equal(await httpGet(url(vm, '/cgi-bin/count')), '1');
        const filler = fillFilesystem(data);
        if (leftKiB) fs.truncateSync(filler, fs.statSync(filler).size - leftKiB * 1024);
        const target = path.join(data, 'suspended');
        const failure = await vm.snapshot(target).then(
          () => assert.fail('a snapshot cannot fit'),
          (error: unknown) => error,
        );
        hasCode('no_space')(failure);
        assert.equal((failure as { details?: { vmRunning?: boolean } }).details?.vmRunning, true);
        assert.equal(fs.existsSync(target), false);
        assert.equal(fs.existsSync(`${target}.partial`), false);
        assert.equal(await httpGet(url(vm, '/cgi-bin/count')), '2', 'the VM runs on with its state');
        assert.equal(await httpGet(url(vm, '/cgi-bin/write?written-while-full')), 'written');

        fs.rmSync(filler);
        await vm.snapshot(target);
        resumed = await QemuVm.restore({ id: `full-snap-${leftKiB}-2`, runDir: path.join(data, 'vm2'), snapshotDir: target, network });
        assert.equal(await httpGet(url(resumed, '/cgi-bin/count')), '3');
        assert.equal(await httpGet(url(resumed, '/cgi-bin/file')), 'written-while-full');
      } finally {
        await vm.destroy();
        await resumed?.destroy();
      }
    });
  }

  test('during a restore: no_space before the guest runs, nothing left behind', { timeout: 300_000 }, async () => {
    const data = fault.ext4('data-restore', 192);
    const filler = fillFilesystem(data);
    for (const [what, runDir] of [['no room for the run directory', path.join(data, 'vm')]] as const) {
      await assert.rejects(QemuVm.restore({ id: 'full-restore', runDir, snapshotDir: base, network }), hasCode('no_space'), what);
      assert.deepEqual(qemuProcessesMentioning(runDir), []);
      assert.equal(fs.existsSync(runDir), false);
    }
    // Room for the directory, not for the memory: the copy or the reservation fails.
    fs.truncateSync(filler, fs.statSync(filler).size - 8 * 1024 * 1024);
    const runDir = path.join(data, 'vm-short');
    await assert.rejects(QemuVm.restore({ id: 'full-restore-2', runDir, snapshotDir: base, network }), hasCode('no_space'));
    assert.deepEqual(qemuProcessesMentioning(runDir), []);
    assert.equal(fs.existsSync(runDir), false);
  });

  test('while a guest runs: its RAM file is reserved, so touching memory it never used does not kill it', { timeout: 300_000 }, async () => {
    const data = fault.ext4('data-run', 512);
    const vm = await bootOn(data, 'full-run');
    try {
      fillFilesystem(data);
      // Without the reservation QEMU died of SIGBUS at the first request here (measured).
      for (let i = 1; i <= 30; i++) assert.equal(await httpGet(url(vm, '/cgi-bin/count'), 20_000), String(i));
      assert.equal(vm.exited, false);
    } finally {
      await vm.destroy();
    }
  });

  test('while a guest writes its disk: QEMU pauses it (no space for its disk layer), nothing is lost, the space watcher continues it once there is room', { timeout: 300_000 }, async () => {
    const data = fault.ext4('data-disk', 512);
    const vm = await QemuVm.restore({ id: 'full-disk', runDir: path.join(data, 'vm'), snapshotDir: base, network });
    try {
      assert.equal(await httpGet(url(vm, '/cgi-bin/count')), '1');
      // The space watcher (what the lifecycle attaches to every microVM) continues the guest
      // once there is room again; nothing else does.
      let pausedSeen = false;
      const continued = new Promise<void>((resolve) =>
        watchDiskSpace(vm, { path: data, intervalMs: 200, onPaused: () => (pausedSeen = true), onContinued: resolve }),
      );
      const stopped = vm.qmp.waitForEvent('BLOCK_IO_ERROR', 60_000, (event) => event.data?.nospace === true);
      const filler = fillFilesystem(data);
      // The guest writes and syncs its disk: the qcow2 layer needs space that is not there.
      const write = httpGet(url(vm, '/cgi-bin/write?survives-a-full-disk'), 120_000);
      await stopped;
      const status = await vm.qmp.execute('query-status', {});
      assert.equal(status.status, 'io-error', 'paused by QEMU, not dead');
      assert.equal(vm.exited, false);
      await new Promise((resolve) => setTimeout(resolve, 600)); // a few checks of the watcher
      assert.equal(pausedSeen, true);
      assert.equal((await vm.qmp.execute('query-status', {})).status, 'io-error', 'still paused while the disk is full');
      fs.rmSync(filler);
      await continued;
      assert.equal(await write, 'written', 'the write completes once there is space');
      assert.equal(await httpGet(url(vm, '/cgi-bin/file')), 'survives-a-full-disk');
      assert.equal(await httpGet(url(vm, '/cgi-bin/count')), '2');
    } finally {
      await vm.destroy();
    }
  });
});
