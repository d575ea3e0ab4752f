/**
 * QEMU processes started ahead (src/vmm/qemu/pool.ts) with real QEMU: a restore takes one and
 * the VM is the same as one started for it (its app answers, its memory and files survive a
 * suspend and a resume from a memory diff, a restarted daemon adopts it, the driver finds its
 * process by its run directory and it runs as the uid its run directory names); a failed
 * restore leaves nothing; a full disk pauses its guest as it does any; closing the pool leaves
 * no process. Clones restored into waiting QEMUs get their own randomness and the host's clock,
 * both ways a pooled restore can go (src/vmm/qemu/pooled-restore.ts); memory the pool copied
 * ahead serves a restore and a resume, and never one whose memory file changed since.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { loadGuestArtifacts } from '../../src/guest/artifacts.ts';
import { vmIdentity } from '../../src/host/sandbox.ts';
import { diffSnapshotMemory } from '../../src/vmm/mem-diff.ts';
import { type QemuPool, closeQemuPool, openQemuPool } from '../../src/vmm/qemu/pool.ts';
import { QemuVm, findQemuProcesses, restoreTuning, startQemu } from '../../src/vmm/qemu/qemu.ts';
import { isCocoonError } from '../../src/common/errors.ts';
import { makeTestRootDisk } from '../support/rootfs.ts';
import { fillFilesystem, useFaultDir } from '../support/faults.ts';
import { watchDiskSpace } from '../../src/vmm/qemu/space-watch.ts';
import { cleanupDir, httpGet, qemuProcessesMentioning } from '../support/vm.ts';

const APP_PORT = 8080;
const network = { forwards: [{ guestPort: APP_PORT }] };

async function until(what: string, check: () => boolean, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

function processUid(pid: number): number {
  const line = /^Uid:\s+(\d+)/m.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  return Number(line?.[1]);
}

describe('QEMU processes started ahead (the pool)', () => {
  const fault = useFaultDir({ after }, 'cocoon-pool-');
  const dir = fault.dir;
  const guest = loadGuestArtifacts();
  const snapshotDir = path.join(dir, 'snapshot');
  let pool: QemuPool | undefined;
  let snapshotTakenAt = 0;
  const url = (vm: QemuVm, route: string) => `http://127.0.0.1:${vm.hostPort(APP_PORT)}${route}`;
  const restore = (id: string, from = snapshotDir, extra: { memoryBase?: string; network?: { forwards: Array<{ guestPort: number; hostPort?: number }> } } = {}) =>
    QemuVm.restore({ id, runDir: path.join(dir, id), snapshotDir: from, network, ...extra });

  before(async () => {
    makeTestRootDisk(path.join(dir, 'root.raw'));
    const vm = await QemuVm.boot({ id: 'base', runDir: path.join(dir, 'base'), vcpus: 1, memoryMiB: 256, accel: 'tcg', guest, disk: { path: path.join(dir, 'root.raw'), format: 'raw' }, network });
    try {
      assert.equal(await httpGet(url(vm, '/')), 'hello from cocoon');
      await vm.snapshot(snapshotDir, { compact: true });
      snapshotTakenAt = Date.now();
    } finally {
      await vm.destroy();
    }
    pool = await openQemuPool(path.join(dir, 'vm-pool'), startQemu, 1);
    assert.ok(pool, 'a pool of one');
    // The pool learns the machine from a first restore (which starts its own QEMU).
    const first = await restore('first');
    assert.equal(first.startPhases?.pool_place, undefined, 'nothing waited for this machine yet');
    await first.destroy();
    await until('the pool to hold a QEMU for the machine', () => pool!.readyCount === 1);
  });

  after(async () => {
    await closeQemuPool();
    const leaked = [...cleanupDir(dir), ...findQemuProcesses(dir)];
    assert.deepEqual(leaked, [], 'a test left QEMU processes running');
  });

  test('a restore takes the waiting QEMU: the app answers, the driver finds it by its run directory, it runs as its run directory\'s uid, and an adopter re-attaches', async () => {
    const vm = await restore('pooled');
    let adopted: QemuVm | undefined;
    try {
      assert.ok(vm.startPhases?.pool_place !== undefined, `taken from the pool (phases: ${JSON.stringify(vm.startPhases)})`);
      assert.equal(await httpGet(url(vm, '/')), 'hello from cocoon');
      assert.deepEqual(findQemuProcesses(path.join(dir, 'pooled')), [vm.pid]);
      assert.deepEqual(qemuProcessesMentioning(path.join(dir, 'pooled')), [vm.pid]);
      const identity = await vmIdentity(path.join(dir, 'pooled'));
      if (identity) assert.equal(processUid(vm.pid), identity.uid, 'the uid a snapshot gives files to is the process\'s');
      vm.detach();
      adopted = await QemuVm.adopt({ id: 'pooled', runDir: path.join(dir, 'pooled') });
      assert.equal(adopted.pid, vm.pid);
      assert.equal(await httpGet(url(adopted, '/')), 'hello from cocoon');
    } finally {
      await (adopted ?? vm).destroy();
    }
    assert.deepEqual(findQemuProcesses(path.join(dir, 'pooled')), []);
  });

  for (const inline of [true, false]) {
    test(`restored into waiting QEMUs ${inline ? 'with the clock/RNG message written before cont' : 'step by step (restoreTuning.pooledInline off)'}, clones have their own randomness and the host's clock`, async () => {
      // Long enough after the snapshot that a guest clock left as it was would be seen.
      const wait = snapshotTakenAt + 5_000 - Date.now();
      if (wait > 0) await new Promise((resolve) => setTimeout(resolve, wait));
      restoreTuning.pooledInline = inline;
      const clones: QemuVm[] = [];
      try {
        for (const id of [`rng-${inline}-a`, `rng-${inline}-b`]) {
          await until('the pool to refill', () => pool!.readyCount === 1);
          clones.push(await restore(id));
        }
        const [a, b] = clones as [QemuVm, QemuVm];
        for (const clone of clones) assert.ok(clone.startPhases?.pool_place !== undefined && clone.startPhases.guest_clock_rng !== undefined, `taken from the pool (phases: ${JSON.stringify(clone.startPhases)})`);
        // Read right after the restores: each guest's kernel RNG was reseeded with host bytes before its restore returned.
        const [randomA, randomB] = await Promise.all([httpGet(url(a, '/cgi-bin/random')), httpGet(url(b, '/cgi-bin/random'))]);
        assert.match(randomA, /^[0-9a-f]{64}$/);
        assert.notEqual(randomA, randomB, 'clones of one snapshot must not produce the same random bytes');
        for (const clone of clones) {
          const guestSeconds = Number(await httpGet(url(clone, '/cgi-bin/time')));
          assert.ok(Math.abs(guestSeconds - Date.now() / 1000) <= 2, `guest clock ${guestSeconds} vs host ${Date.now() / 1000}`);
        }
      } finally {
        restoreTuning.pooledInline = true;
        await Promise.all(clones.map((clone) => clone.destroy()));
      }
    });
  }

  test('suspended and resumed from a memory diff into waiting QEMUs, a guest keeps its files and processes', async () => {
    await until('the pool to refill', () => pool!.readyCount === 1);
    const vm = await restore('cycle-1');
    const suspended = path.join(dir, 'cycle-1-suspended');
    let resumed: QemuVm | undefined;
    try {
      assert.ok(vm.startPhases?.pool_place !== undefined, 'taken from the pool');
      assert.equal(await httpGet(url(vm, '/cgi-bin/write?kept-across-pooled-resume')), 'written');
      const before = await httpGet(url(vm, '/cgi-bin/bg'));
      await vm.snapshot(suspended);
      await diffSnapshotMemory(suspended, snapshotDir, { durable: true });
      await until('the pool to refill', () => pool!.readyCount === 1);
      resumed = await restore('cycle-2', suspended, { memoryBase: snapshotDir });
      assert.ok(resumed.startPhases?.pool_place !== undefined, 'taken from the pool');
      assert.equal(await httpGet(url(resumed, '/cgi-bin/file')), 'kept-across-pooled-resume');
      const pidBefore = /^running (\d+)/.exec(before)?.[1];
      assert.ok(pidBefore);
      assert.match(await httpGet(url(resumed, '/cgi-bin/bg')), new RegExp(`^running ${pidBefore} `), 'the same background process');
    } finally {
      await vm.destroy();
      await resumed?.destroy();
    }
  });

  test('memory copied ahead: a restore of the verified image snapshot copies nothing, a resume from a diff against it writes only the diff; a memory file changed since the copy is refused', async () => {
    // A snapshot of its own (its memory file is damaged at the end), old enough to be remembered once verified.
    const image = path.join(dir, 'ahead-image');
    fs.cpSync(snapshotDir, image, { recursive: true });
    const settled = new Date(Date.now() - 10_000);
    for (const name of fs.readdirSync(image)) {
      const from = fs.statSync(path.join(snapshotDir, name));
      fs.chownSync(path.join(image, name), from.uid, from.gid); // as sealed: a restore changes nothing on it
      fs.utimesSync(path.join(image, name), settled, settled);
    }
    await new Promise((resolve) => setTimeout(resolve, 2_100)); // its ctimes (set now) settle too
    const made: QemuVm[] = [];
    try {
      // A verified restore (remembered) teaches the pool the memory; the next takes a QEMU with it copied ahead.
      made.push(await restore('ahead-teach', image));
      await until('the pool to refill', () => pool!.readyCount === 1);
      const vm = await restore('ahead-1', image);
      made.push(vm);
      assert.ok(vm.startPhases?.ram_prefilled_wait !== undefined, `nothing copied (phases: ${JSON.stringify(vm.startPhases)})`);
      assert.equal(await httpGet(url(vm, '/cgi-bin/count')), '1', 'the snapshot\'s memory: its counter starts as it was');
      assert.equal(await httpGet(url(vm, '/cgi-bin/write?kept-on-a-copied-base')), 'written');
      // Suspended as a diff against the image, resumed into a QEMU holding the image's memory.
      const suspended = path.join(dir, 'ahead-suspended');
      await vm.snapshot(suspended);
      made.splice(made.indexOf(vm), 1);
      await diffSnapshotMemory(suspended, image, { durable: true });
      await until('the pool to refill', () => pool!.readyCount === 1);
      const resumed = await restore('ahead-2', suspended, { memoryBase: image });
      made.push(resumed);
      assert.ok(Object.keys(resumed.startPhases ?? {}).some((name) => name.endsWith('_on_base_wait')), `only the diff written (phases: ${JSON.stringify(resumed.startPhases)})`);
      assert.equal(await httpGet(url(resumed, '/cgi-bin/file')), 'kept-on-a-copied-base');
      assert.equal(await httpGet(url(resumed, '/cgi-bin/count')), '2', 'its memory is the suspended one, not the image\'s');
      // The image's memory file changed after the pool copied it: that copy is not used, and the change is caught.
      await until('the pool to refill', () => pool!.readyCount === 1);
      const mem = path.join(image, 'mem');
      const fd = fs.openSync(mem, 'r+');
      try {
        const byte = Buffer.alloc(1);
        fs.readSync(fd, byte, 0, 1, 4096 * 100);
        byte[0] = byte[0]! ^ 0xff;
        fs.writeSync(fd, byte, 0, 1, 4096 * 100);
      } finally {
        fs.closeSync(fd);
      }
      await assert.rejects(restore('ahead-3', image), (error: unknown) => isCocoonError(error, 'snapshot_corrupt'));
      assert.deepEqual(findQemuProcesses(path.join(dir, 'ahead-3')), []);
    } finally {
      await Promise.all(made.map((vm) => vm.destroy()));
    }
  });

  test('a restore that fails after taking a QEMU (its host port is taken) kills it and leaves no files; the pool refills', async () => {
    await until('the pool to refill', () => pool!.readyCount === 1);
    const busy = net.createServer();
    await new Promise<void>((resolve) => busy.listen(0, '127.0.0.1', resolve));
    const port = (busy.address() as net.AddressInfo).port;
    try {
      await assert.rejects(restore('conflict', snapshotDir, { network: { forwards: [{ guestPort: APP_PORT, hostPort: port }] } }), (error: unknown) =>
        isCocoonError(error, 'port_in_use'),
      );
    } finally {
      busy.close();
    }
    assert.deepEqual(findQemuProcesses(path.join(dir, 'conflict')), []);
    assert.equal(fs.existsSync(path.join(dir, 'conflict')), false, 'the run directory it made is gone');
    await until('the pool to refill', () => pool!.readyCount === 1);
  });

  test('a full disk pauses a guest in a QEMU from the pool (its disk attached over QMP), and it goes on once there is room', { timeout: 300_000 }, async () => {
    // A pool on a small filesystem of its own, as the run directory must be (renames).
    const data = fault.ext4('data-disk', 512);
    await closeQemuPool();
    pool = await openQemuPool(path.join(data, 'vm-pool'), startQemu, 1);
    const teach = await QemuVm.restore({ id: 'full-teach', runDir: path.join(data, 'teach'), snapshotDir, network });
    await teach.destroy();
    await until('the pool to hold a QEMU', () => pool!.readyCount === 1);
    const vm = await QemuVm.restore({ id: 'full-disk', runDir: path.join(data, 'vm'), snapshotDir, network });
    try {
      assert.ok(vm.startPhases?.pool_place !== undefined, 'taken from the pool');
      assert.equal(await httpGet(url(vm, '/cgi-bin/count')), '1');
      const continued = new Promise<void>((resolve) => watchDiskSpace(vm, { path: data, intervalMs: 200, onContinued: resolve }));
      const stopped = vm.qmp.waitForEvent('BLOCK_IO_ERROR', 60_000, (event) => event.data?.nospace === true);
      await closeQemuPool(); // its waiting QEMU holds no space the guest needs then
      const filler = fillFilesystem(data);
      const write = httpGet(url(vm, '/cgi-bin/write?survives-a-full-disk'), 120_000);
      await stopped;
      assert.equal((await vm.qmp.execute('query-status', {})).status, 'io-error', 'paused by QEMU, not given an I/O error');
      fs.rmSync(filler);
      await continued;
      assert.equal(await write, 'written', 'the write completes once there is space');
      assert.equal(await httpGet(url(vm, '/cgi-bin/file')), 'survives-a-full-disk');
    } finally {
      await vm.destroy();
    }
    pool = await openQemuPool(path.join(dir, 'vm-pool'), startQemu, 1);
    await restore('relearn').then((again) => again.destroy());
  });

  test('closing the pool ends every QEMU it holds and removes its directory', async () => {
    await until('the pool to refill', () => pool!.readyCount === 1);
    const root = pool!.root;
    const waiting = fs.readdirSync(root);
    assert.equal(waiting.length, 1);
    await closeQemuPool(pool);
    assert.equal(fs.existsSync(root), false);
    assert.deepEqual(findQemuProcesses(dir), [], 'no QEMU left under the test directory');
    const vm = await restore('after-close');
    try {
      assert.equal(vm.startPhases?.pool_place, undefined, 'a restore after the close starts its own QEMU');
    } finally {
      await vm.destroy();
    }
  });
});
