/**
 * Errors, not surprises: every way a boot or restore can fail gives a stable code and leaves
 * no QEMU process and no stray file behind.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { isCocoonError, type ErrorCode } from '../../src/common/errors.ts';
import { loadGuestArtifacts } from '../../src/guest/artifacts.ts';
import { QemuVm } from '../../src/vmm/qemu/qemu.ts';
import { DEFAULT_SERIAL_LOG_MAX_BYTES, SerialLog } from '../../src/vmm/qemu/serial-log.ts';
import type { BootOptions, SnapshotManifest } from '../../src/vmm/types.ts';
import { makeTestRootDisk } from '../support/rootfs.ts';
import { cleanupDir, qemuProcessesMentioning, tempDir } from '../support/vm.ts';

function hasCode(code: ErrorCode) {
  return (error: unknown) => {
    assert.ok(isCocoonError(error, code), `expected ${code}, got ${(error as Error)?.stack ?? String(error)}`);
    return true;
  };
}

describe('VM errors leave nothing behind', () => {
  const dir = tempDir('cocoon-vmerr-');
  const guest = loadGuestArtifacts();
  const disk = path.join(dir, 'root.raw');
  const snapshotDir = path.join(dir, 'snapshot');
  const bootOptions = (id: string, overrides: Partial<BootOptions> = {}): BootOptions => ({
    id,
    runDir: path.join(dir, id),
    vcpus: 1,
    memoryMiB: 256,
    accel: 'tcg',
    guest,
    disk: { path: disk, format: 'raw' },
    network: { forwards: [{ guestPort: 8080 }] },
    ...overrides,
  });

  /** Nothing of VM `id` may remain: no process, no run directory. */
  function assertNothingLeft(id: string): void {
    assert.deepEqual(qemuProcessesMentioning(path.join(dir, id)), [], `QEMU of ${id} still running`);
    assert.equal(fs.existsSync(path.join(dir, id)), false, `run directory of ${id} left behind`);
  }

  /** A private copy of the good snapshot to damage. */
  function copySnapshot(name: string): string {
    const copy = path.join(dir, name);
    execFileSync('cp', ['-a', '--sparse=always', snapshotDir, copy]);
    return copy;
  }

  before(async () => {
    makeTestRootDisk(disk);
    // A good snapshot to damage in different ways. The base disk is copied: the snapshot takes its own.
    fs.copyFileSync(disk, path.join(dir, 'snapshot-disk.raw'));
    const vm = await QemuVm.boot(bootOptions('good', { disk: { path: path.join(dir, 'snapshot-disk.raw'), format: 'raw' } }));
    await vm.snapshot(snapshotDir);
    await vm.destroy();
  });
  after(() => {
    assert.deepEqual(cleanupDir(dir), [], 'a test left QEMU processes running');
  });

  test('a missing guest kernel gives kernel_missing with the command that fixes it', () => {
    const empty = path.join(dir, 'no-cache');
    fs.mkdirSync(empty);
    assert.throws(() => loadGuestArtifacts(empty), (error: unknown) => {
      hasCode('kernel_missing')(error);
      assert.match((error as Error).message, /npm run setup/);
      return true;
    });
  });

  test('vCPUs or memory out of range give invalid_resources before anything starts', async () => {
    for (const [vcpus, memoryMiB] of [[0, 256], [17, 256], [1.5, 256], [1, 127], [1, 32 * 1024 + 1]] as const) {
      await assert.rejects(QemuVm.boot(bootOptions('bad-shape', { vcpus, memoryMiB })), hasCode('invalid_resources'));
      assertNothingLeft('bad-shape');
    }
  });

  test('a host port already taken gives port_in_use', async () => {
    const squatter = net.createServer();
    await new Promise<void>((resolve) => squatter.listen(0, '127.0.0.1', resolve));
    try {
      const port = (squatter.address() as net.AddressInfo).port;
      await assert.rejects(
        QemuVm.boot(bootOptions('taken', { network: { forwards: [{ guestPort: 8080, hostPort: port }] } })),
        hasCode('port_in_use'),
      );
      assertNothingLeft('taken');
    } finally {
      squatter.close();
    }
  });

  test('QEMU dying at start gives vm_start_failed with its own words', async () => {
    const missing = path.join(dir, 'does-not-exist.raw');
    await assert.rejects(QemuVm.boot(bootOptions('dies', { disk: { path: missing, format: 'raw' } })), (error: unknown) => {
      hasCode('vm_start_failed')(error);
      assert.match((error as Error).message, /does-not-exist\.raw/);
      return true;
    });
    assertNothingLeft('dies');
  });

  test('a missing snapshot gives snapshot_not_found', async () => {
    await assert.rejects(
      QemuVm.restore({ id: 'nosnap', runDir: path.join(dir, 'nosnap'), snapshotDir: path.join(dir, 'nowhere'), network: { forwards: [] } }),
      hasCode('snapshot_not_found'),
    );
    assertNothingLeft('nosnap');
  });

  const damages: Array<[string, (snapshot: string) => void]> = [
    ['a device state with a flipped byte', (s) => {
      const file = path.join(s, 'state');
      const bytes = fs.readFileSync(file);
      bytes[bytes.length >> 1] = (bytes[bytes.length >> 1] ?? 0) ^ 0xff;
      fs.writeFileSync(file, bytes);
    }],
    ['a truncated device state', (s) => fs.truncateSync(path.join(s, 'state'), 100)],
    ['a truncated memory file', (s) => fs.truncateSync(path.join(s, 'mem'), 1024 * 1024)],
    ['a missing disk', (s) => fs.rmSync(path.join(s, 'disk.raw'))],
    ['a manifest that is not JSON', (s) => fs.writeFileSync(path.join(s, 'manifest.json'), '{not json')],
    ['a manifest naming a file outside the snapshot', (s) => {
      const manifest = JSON.parse(fs.readFileSync(path.join(s, 'manifest.json'), 'utf8')) as SnapshotManifest;
      manifest.files.mem.name = '../../etc/passwd';
      fs.writeFileSync(path.join(s, 'manifest.json'), JSON.stringify(manifest));
    }],
    // Passes every file check (the checksum is updated too): QEMU itself refuses it.
    ['a device state that is garbage with a matching checksum', (s) => {
      const garbage = Buffer.alloc(4096, 0x5a);
      fs.writeFileSync(path.join(s, 'state'), garbage);
      const manifest = JSON.parse(fs.readFileSync(path.join(s, 'manifest.json'), 'utf8')) as SnapshotManifest;
      manifest.files.state.sizeBytes = garbage.length;
      manifest.files.state.sha256 = createHash('sha256').update(garbage).digest('hex');
      fs.writeFileSync(path.join(s, 'manifest.json'), JSON.stringify(manifest));
    }],
  ];
  for (const [index, [what, damage]] of damages.entries()) {
    test(`${what} is refused with snapshot_corrupt and nothing is restored`, async () => {
      const copy = copySnapshot(`damaged-${index}`);
      damage(copy);
      const id = `restore-damaged-${index}`;
      await assert.rejects(QemuVm.restore({ id, runDir: path.join(dir, id), snapshotDir: copy, network: { forwards: [{ guestPort: 8080 }] } }), hasCode('snapshot_corrupt'));
      assertNothingLeft(id);
      fs.rmSync(copy, { recursive: true, force: true });
    });
  }

  test('the serial console log stays within its bound however much the guest writes', () => {
    const logPath = path.join(dir, 'serial-bound.log');
    const maxBytes = 64 * 1024;
    const serial = new SerialLog(logPath, maxBytes);
    try {
      const line = Buffer.from('x'.repeat(999) + '\n');
      for (let i = 0; i < 2000; i++) serial.append(line); // ~2 MB of console output
    } finally {
      serial.close();
    }
    const total = fs.statSync(logPath).size + fs.statSync(`${logPath}.1`).size;
    assert.ok(total <= maxBytes, `${total} bytes kept for a bound of ${maxBytes}`);
    assert.ok(DEFAULT_SERIAL_LOG_MAX_BYTES > 0);
  });
});
