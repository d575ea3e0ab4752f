/**
 * Durable snapshots: every restore checks the memory file and the disk against the checksums in
 * the manifest, and refuses a damaged snapshot (`snapshot_corrupt`) before QEMU loads anything;
 * an fsync error abandons a snapshot and is never retried.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { isCocoonError, type ErrorCode } from '../../src/common/errors.ts';
import { loadGuestArtifacts } from '../../src/guest/artifacts.ts';
import { QemuVm } from '../../src/vmm/qemu/qemu.ts';
import { dataChecksums, readSnapshotManifest } from '../../src/vmm/snapshot.ts';
import { verifiedFileHits } from '../../src/vmm/verified-files.ts';
import type { SnapshotManifest } from '../../src/vmm/types.ts';
import { fillFilesystem, useFaultDir } from '../support/faults.ts';
import { makeTestRootDisk } from '../support/rootfs.ts';
import { cleanupDir, httpGet, qemuProcessesMentioning, tempDir } from '../support/vm.ts';

const APP_PORT = 8080;
const network = { forwards: [{ guestPort: APP_PORT }] };
const PAGE = 4096;

function hasCode(code: ErrorCode, message?: RegExp) {
  return (error: unknown) => {
    assert.ok(isCocoonError(error, code), `expected ${code}, got ${(error as Error)?.stack ?? String(error)}`);
    if (message) assert.match((error as Error).message, message);
    return true;
  };
}

/** Offset of the first page of `file` that holds a non-zero byte, scanning from `from`. */
function firstDataPage(file: string, from = 0): number {
  const fd = fs.openSync(file, 'r');
  try {
    const buffer = Buffer.alloc(1024 * 1024);
    for (let at = from; ; at += buffer.length) {
      const read = fs.readSync(fd, buffer, 0, buffer.length, at);
      if (read === 0) throw new Error(`no data in ${file}`);
      for (let page = 0; page < read; page += PAGE) {
        if (buffer.subarray(page, page + PAGE).some((byte) => byte !== 0)) return at + page;
      }
    }
  } finally {
    fs.closeSync(fd);
  }
}

function patch(file: string, offset: number, bytes: Buffer): void {
  const fd = fs.openSync(file, 'r+');
  try {
    fs.writeSync(fd, bytes, 0, bytes.length, offset);
  } finally {
    fs.closeSync(fd);
  }
}

function readAt(file: string, offset: number, length: number): Buffer {
  const fd = fs.openSync(file, 'r');
  try {
    const buffer = Buffer.alloc(length);
    fs.readSync(fd, buffer, 0, length, offset);
    return buffer;
  } finally {
    fs.closeSync(fd);
  }
}

describe('snapshot integrity', () => {
  const dir = tempDir('cocoon-integrity-');
  const guest = loadGuestArtifacts();
  const snapshotDir = path.join(dir, 'snapshot');
  let manifest: SnapshotManifest | undefined;

  before(async () => {
    makeTestRootDisk(path.join(dir, 'root.raw'));
    const vm = await QemuVm.boot({
      id: 'integrity',
      runDir: path.join(dir, 'integrity'),
      vcpus: 1,
      memoryMiB: 256,
      accel: 'tcg',
      guest,
      disk: { path: path.join(dir, 'root.raw'), format: 'raw' },
      network,
    });
    try {
      assert.equal(await httpGet(`http://127.0.0.1:${vm.hostPort(APP_PORT)}/cgi-bin/count`), '1');
      manifest = await vm.snapshot(snapshotDir, { compact: true });
    } finally {
      await vm.destroy();
    }
  });
  after(() => {
    assert.deepEqual(cleanupDir(dir), [], 'a test left QEMU processes running');
  });

  test('the manifest carries checksums of the memory file and the disk, computed from their data', async () => {
    assert.ok(manifest);
    for (const file of [manifest.files.mem, manifest.files.disk]) {
      assert.equal(file.checksum?.algorithm, 'xxh64-pages');
      assert.match(file.checksum?.value ?? '', /^[0-9a-f]{16}$/);
    }
    const [mem, disk] = await dataChecksums([path.join(snapshotDir, 'mem'), path.join(snapshotDir, 'disk.raw')]);
    assert.deepEqual(mem, manifest.files.mem.checksum);
    assert.deepEqual(disk, manifest.files.disk.checksum);
  });

  test('the checksum is the content\'s, not the layout\'s: full, sparse and reserved copies agree, one byte changes it', async () => {
    const mem = path.join(snapshotDir, 'mem');
    const full = path.join(dir, 'mem-full');
    const sparse = path.join(dir, 'mem-sparse');
    const reserved = path.join(dir, 'mem-reserved');
    execFileSync('cp', ['--sparse=never', mem, full]);
    execFileSync('cp', ['--sparse=always', full, sparse]);
    execFileSync('cp', ['--sparse=always', mem, reserved]);
    execFileSync('fallocate', ['-l', String(fs.statSync(mem).size), reserved]); // unwritten extents
    try {
      assert.ok(fs.statSync(full).blocks > 4 * fs.statSync(sparse).blocks, 'the copies really differ in layout');
      const sums = await dataChecksums([mem, full, sparse, reserved]);
      assert.equal(new Set(sums.map((sum) => sum.value)).size, 1, JSON.stringify(sums));
      patch(full, fs.statSync(full).size - 1, Buffer.from([1]));
      const [changed] = await dataChecksums([full]);
      assert.notEqual(changed?.value, sums[0]?.value);
    } finally {
      for (const file of [full, sparse, reserved]) fs.rmSync(file, { force: true });
    }
  });

  const damages: Array<[string, RegExp, (snapshot: string) => void]> = [
    ['a flipped byte in a data page of the memory file', /mem does not match its checksum/, (s) => {
      const mem = path.join(s, 'mem');
      const at = firstDataPage(mem, 1024 * 1024) + 123;
      patch(mem, at, Buffer.from([(readAt(mem, at, 1)[0] ?? 0) ^ 0x01]));
    }],
    ['a byte written into a hole of the memory file', /mem does not match its checksum/, (s) => {
      const mem = path.join(s, 'mem');
      patch(mem, fs.statSync(mem).size - PAGE + 17, Buffer.from([0x42]));
    }],
    ['a data page of the memory file zeroed', /mem does not match its checksum/, (s) => {
      const mem = path.join(s, 'mem');
      patch(mem, firstDataPage(mem, 2 * 1024 * 1024), Buffer.alloc(PAGE));
    }],
    ['a memory file one page short', /mem is \d+ bytes, expected/, (s) => {
      const mem = path.join(s, 'mem');
      fs.truncateSync(mem, fs.statSync(mem).size - PAGE);
    }],
    ['a memory file one page too long', /mem is \d+ bytes, expected/, (s) => {
      const mem = path.join(s, 'mem');
      fs.truncateSync(mem, fs.statSync(mem).size + PAGE);
    }],
    ['a memory file truncated to nothing', /mem is 0 bytes/, (s) => fs.truncateSync(path.join(s, 'mem'), 0)],
    ['a flipped byte in the disk', /disk\.raw does not match its checksum/, (s) => {
      const disk = path.join(s, 'disk.raw');
      const at = firstDataPage(disk, 0) + 7;
      patch(disk, at, Buffer.from([(readAt(disk, at, 1)[0] ?? 0) ^ 0x80]));
    }],
    ['a manifest without the memory checksum', /no checksum for mem/, (s) => {
      const file = path.join(s, 'manifest.json');
      const m = JSON.parse(fs.readFileSync(file, 'utf8')) as SnapshotManifest;
      delete m.files.mem.checksum;
      fs.writeFileSync(file, JSON.stringify(m));
    }],
    ['a manifest whose disk checksum was changed', /disk\.raw does not match its checksum/, (s) => {
      const file = path.join(s, 'manifest.json');
      const m = JSON.parse(fs.readFileSync(file, 'utf8')) as SnapshotManifest;
      m.files.disk.checksum = { algorithm: 'xxh64-pages', value: '0123456789abcdef' };
      fs.writeFileSync(file, JSON.stringify(m));
    }],
  ];
  for (const [index, [what, message, damage]] of damages.entries()) {
    test(`${what} is found before the restore (snapshot_corrupt) and nothing runs`, { timeout: 120_000 }, async () => {
      const copy = path.join(dir, `damaged-${index}`);
      execFileSync('cp', ['-a', '--sparse=always', snapshotDir, copy]);
      try {
        damage(copy);
        const id = `damaged-${index}`;
        const runDir = path.join(dir, `run-${index}`);
        await assert.rejects(QemuVm.restore({ id, runDir, snapshotDir: copy, network }), hasCode('snapshot_corrupt', message));
        assert.deepEqual(qemuProcessesMentioning(runDir), [], 'no QEMU is left');
        assert.equal(fs.existsSync(runDir), false, 'no run directory is left');
      } finally {
        fs.rmSync(copy, { recursive: true, force: true });
      }
    });
  }

  test('the undamaged snapshot still restores, with its state', { timeout: 120_000 }, async () => {
    const vm = await QemuVm.restore({ id: 'intact', runDir: path.join(dir, 'intact'), snapshotDir, network });
    try {
      assert.equal(await httpGet(`http://127.0.0.1:${vm.hostPort(APP_PORT)}/cgi-bin/count`), '2');
    } finally {
      await vm.destroy();
    }
  });

  test('a snapshot verified once restores again without its files read for checksums; a file changed since is refused', { timeout: 300_000 }, async () => {
    // The damages a remembered verification must not hide: each on its own copy of the snapshot,
    // verified (restored) first, then changed with its modification time put back.
    const keepTimes = (file: string, change: () => void) => {
      const { atime, mtime } = fs.statSync(file);
      change();
      fs.utimesSync(file, atime, mtime);
    };
    const changes: Array<[string, RegExp, (snapshot: string) => void]> = [
      ['a byte of the memory file changed', /mem does not match its checksum/, (s) => {
        const mem = path.join(s, 'mem');
        const at = firstDataPage(mem, 1024 * 1024) + 99;
        keepTimes(mem, () => patch(mem, at, Buffer.from([(readAt(mem, at, 1)[0] ?? 0) ^ 0x04])));
      }],
      ['the device state changed', /state does not match its checksum/, (s) => {
        const state = path.join(s, 'state');
        const at = Math.floor(fs.statSync(state).size / 2);
        keepTimes(state, () => patch(state, at, Buffer.from([(readAt(state, at, 1)[0] ?? 0) ^ 0x10])));
      }],
      ['the memory file one page longer', /mem is \d+ bytes, expected/, (s) => {
        const mem = path.join(s, 'mem');
        keepTimes(mem, () => fs.truncateSync(mem, fs.statSync(mem).size + PAGE));
      }],
      ['the disk replaced by another file (a copy with one byte changed, same times)', /disk\.raw does not match its checksum/, (s) => {
        const disk = path.join(s, 'disk.raw');
        const other = path.join(s, 'disk.other');
        execFileSync('cp', ['-a', '--sparse=always', disk, other]);
        const at = firstDataPage(other, 0) + 11;
        keepTimes(other, () => patch(other, at, Buffer.from([(readAt(other, at, 1)[0] ?? 0) ^ 0x20])));
        fs.renameSync(other, disk);
      }],
    ];
    const copies = [-1, ...changes.keys()].map((index) => {
      const copy = path.join(dir, `remembered-${index}`);
      execFileSync('cp', ['-a', '--sparse=always', snapshotDir, copy]);
      return copy;
    });
    try {
      // Files changed in the last 2 s are verified but not remembered (timestamps tick coarsely).
      await new Promise((resolve) => setTimeout(resolve, 2500));
      const restore = async (copy: string, name: string) => {
        const vm = await QemuVm.restore({ id: name, runDir: path.join(dir, `run-${name}`), snapshotDir: copy, network });
        try {
          return await httpGet(`http://127.0.0.1:${vm.hostPort(APP_PORT)}/cgi-bin/count`);
        } finally {
          await vm.destroy();
        }
      };
      for (const [index, copy] of copies.entries()) assert.equal(await restore(copy, `first-${index}`), '2', 'verified in full, restored');
      const hits = verifiedFileHits();
      assert.equal(await restore(copies[0]!, 'again'), '2');
      assert.ok(verifiedFileHits() >= hits + 3, 'the second restore took the device state, memory file and disk as verified');

      for (const [index, [what, message, change]] of changes.entries()) {
        const copy = copies[index + 1]!;
        change(copy);
        const runDir = path.join(dir, `run-changed-${index}`);
        await assert.rejects(QemuVm.restore({ id: `changed-${index}`, runDir, snapshotDir: copy, network }), hasCode('snapshot_corrupt', message), what);
        assert.deepEqual(qemuProcessesMentioning(runDir), [], `${what}: no QEMU is left`);
      }
    } finally {
      for (const copy of copies) fs.rmSync(copy, { recursive: true, force: true });
    }
  });

  test('(the check is the content\'s) a snapshot read back after its manifest was written still verifies', async () => {
    const again = await readSnapshotManifest(snapshotDir);
    assert.deepEqual(again.files.mem.checksum, manifest?.files.mem.checksum);
  });
});

describe('an fsync error abandons the snapshot and is never retried', () => {
  const hooks = { after };
  const fault = useFaultDir(hooks, 'cocoon-fsync-');
  const guest = loadGuestArtifacts();

  test('writes that the device cannot store make fsync fail: no snapshot, the VM runs on, no second try', { timeout: 300_000 }, async () => {
    // A thin disk for the run directory (the RAM file) and the snapshot: the filesystem believes
    // it has 512 MiB, its device holds 160 MiB more than the empty filesystem. The guest's own
    // disk lives elsewhere, so that only the RAM file and the snapshot meet the full device
    // (a guest disk flush there would pause the VM with an I/O error, a different story).
    const { mount, device } = fault.thinExt4('thin', 512, 160);
    makeTestRootDisk(path.join(fault.dir, 'root.raw'));
    const vm = await QemuVm.boot({
      id: 'thin-vm',
      runDir: path.join(mount, 'vm'),
      vcpus: 1,
      memoryMiB: 256,
      accel: 'tcg',
      guest,
      disk: { path: path.join(fault.dir, 'root.raw'), format: 'raw' },
      network,
    });
    const url = (route: string) => `http://127.0.0.1:${vm.hostPort(APP_PORT)}${route}`;
    try {
      assert.equal(await httpGet(url('/cgi-bin/count')), '1');
      execFileSync('sync', ['-f', path.join(mount, 'vm', 'mem')]);
      const filler = fillFilesystem(device); // the device is full from here on
      assert.equal(await httpGet(url('/cgi-bin/count')), '2', 'the guest dirties fresh memory');

      const snapshot = path.join(mount, 'suspended');
      const failure = await vm.snapshot(snapshot).then(
        () => assert.fail('the snapshot must not commit'),
        (error: unknown) => error,
      );
      hasCode('snapshot_failed', /abandoned.*(fsync|fdatasync)/)(failure);
      assert.equal(fs.existsSync(snapshot), false, 'no snapshot directory');
      assert.equal(fs.existsSync(`${snapshot}.partial`), false, 'no partial directory');
      assert.equal((failure as { details?: { vmRunning?: boolean } }).details?.vmRunning, true);
      assert.equal(await httpGet(url('/cgi-bin/count')), '3', 'the VM runs on with its state');

      // Space again: a retry would now "succeed" over pages the kernel could not write. It is refused.
      fs.rmSync(filler);
      await assert.rejects(vm.snapshot(snapshot), hasCode('snapshot_failed', /not snapshotted again/));
      assert.equal(fs.existsSync(snapshot), false);
      assert.equal(await httpGet(url('/cgi-bin/count')), '4', 'and it still runs');
    } finally {
      await vm.destroy();
    }
  });
});
