/**
 * Least privilege for QEMU, each property tried for real: QEMU's own uid (not root, one per
 * VM), no capabilities, no_new_privs and seccomp; what it can open and what it cannot (asked
 * through QMP's blockdev-add, which opens files as the QEMU process); spawning denied; per-VM
 * cgroups with their CPU and memory limits enforced.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { isCocoonError } from '../../src/common/errors.ts';
import { loadConfig } from '../../src/config/config.ts';
import { loadGuestArtifacts } from '../../src/guest/artifacts.ts';
import { ADMIN_KEY_FILE, type RunningServer, startServer } from '../../src/server.ts';
import { DATABASE_FILE } from '../../src/store/open.ts';
import { cgroupSupport } from '../../src/host/cgroups.ts';
import { ensureEgressGuard } from '../../src/net/egress-guard.ts';
import { QemuVm } from '../../src/vmm/qemu/qemu.ts';
import { VM_UID_BASE, VM_UID_COUNT, ensureVmAccount } from '../../src/host/sandbox.ts';
import { makeHostileRootDisk } from '../support/hostile-rootfs.ts';
import { cleanupDir, httpGet, qemuProcessesMentioning, tempDir } from '../support/vm.ts';

const APP_PORT = 8080;
const network = { forwards: [{ guestPort: APP_PORT }] };
const isRoot = process.getuid?.() === 0;

function status(pid: number): Record<string, string> {
  return Object.fromEntries(
    fs
      .readFileSync(`/proc/${pid}/status`, 'utf8')
      .split('\n')
      .map((line) => line.split(/:\s*/, 2) as [string, string]),
  );
}

/** Opens `file` inside the QEMU process (QMP blockdev-add, file driver); the error text or 'opened'. */
async function qemuOpens(vm: QemuVm, file: string, readOnly = true): Promise<string> {
  const execute = vm.qmp.execute.bind(vm.qmp) as unknown as (name: string, args: Record<string, unknown>) => Promise<unknown>;
  const node = `probe${Math.random().toString(36).slice(2, 10)}`;
  try {
    await execute('blockdev-add', { driver: 'file', 'node-name': node, filename: file, 'read-only': readOnly, locking: 'off' });
  } catch (error) {
    return (error as Error).message;
  }
  await execute('blockdev-del', { 'node-name': node });
  return 'opened';
}

describe('least privilege for QEMU', { skip: isRoot ? false : 'needs root (the daemon drops privileges only when it has them)' }, () => {
  const dir = tempDir('cocoon-privilege-');
  const dataDir = path.join(dir, 'data');
  const guest = loadGuestArtifacts();
  let server: RunningServer | undefined;
  const vms: QemuVm[] = [];
  let base = '';

  before(async () => {
    // The real server's data directory: database and admin key as the daemon makes them.
    server = await startServer(loadConfig({ COCOON_DATA_DIR: dataDir, COCOON_API_PORT: '0', COCOON_GATEWAY_PORT: '0' }));
    makeHostileRootDisk(path.join(dir, 'root.raw'), 32);
    base = path.join(dataDir, 'images', 'base-snapshot');
    fs.mkdirSync(path.dirname(base), { recursive: true, mode: 0o700 });
    const builder = await QemuVm.boot({
      id: 'priv-base',
      runDir: path.join(dataDir, 'vms', 'priv-base'),
      vcpus: 1,
      memoryMiB: 256,
      accel: 'tcg',
      guest,
      disk: { path: path.join(dir, 'root.raw'), format: 'raw' },
      network,
    });
    await builder.snapshot(base, { compact: true });
    await builder.destroy();
    for (const id of ['priv-a', 'priv-b']) {
      vms.push(await QemuVm.restore({ id, runDir: path.join(dataDir, 'vms', id), snapshotDir: base, network }));
    }
  });
  after(async () => {
    for (const vm of vms) await vm.destroy();
    await server?.close();
    assert.deepEqual(cleanupDir(dir), [], 'a test left QEMU processes running');
  });

  test('QEMU runs as its own unprivileged uid (one per VM) in the cocoon-qemu group, without capabilities, with no_new_privs and seccomp', async () => {
    const account = await ensureVmAccount('cocoon-qemu');
    const uids = new Set<number>();
    for (const vm of vms) {
      const s = status(vm.pid);
      const [uid, euid, suid, fsuid] = (s.Uid ?? '').split(/\s+/).map(Number);
      assert.ok(uid !== undefined && uid >= VM_UID_BASE && uid < VM_UID_BASE + VM_UID_COUNT, `uid ${uid}`);
      assert.deepEqual([euid, suid, fsuid], [uid, uid, uid], 'real, effective, saved and filesystem uids alike');
      assert.deepEqual((s.Gid ?? '').split(/\s+/).map(Number), [account.gid, account.gid, account.gid, account.gid]);
      assert.equal((s.Groups ?? '').trim(), '', 'no supplementary groups');
      for (const set of ['CapInh', 'CapPrm', 'CapEff', 'CapBnd', 'CapAmb']) assert.equal(Number.parseInt(s[set] ?? 'x', 16), 0, `${set} ${s[set]}`);
      assert.equal(s.NoNewPrivs, '1');
      assert.equal(s.Seccomp, '2', 'a seccomp filter is on');
      uids.add(uid as number);
    }
    assert.equal(uids.size, vms.length, 'every VM has its own uid');
  });

  test('files: the run directory is root\'s, QEMU owns its RAM file, disk layer and socket directory; a snapshot is root\'s, its disk read-only to QEMU', () => {
    const [vm] = vms;
    assert.ok(vm);
    const uid = Number((status(vm.pid).Uid ?? '').split(/\s+/)[0]);
    const gid = fs.statSync(vm.ramPath).gid;
    const mode = (file: string) => fs.statSync(file).mode & 0o7777;
    assert.deepEqual([fs.statSync(vm.runDir).uid, mode(vm.runDir)], [0, 0o710]);
    for (const file of [vm.ramPath, vm.disk.path]) assert.deepEqual([fs.statSync(file).uid, mode(file)], [uid, 0o600], file);
    assert.deepEqual([fs.statSync(path.join(vm.runDir, 'qemu')).uid, mode(path.join(vm.runDir, 'qemu'))], [uid, 0o700]);
    for (const file of ['qemu.log', 'serial.log']) assert.equal(fs.statSync(path.join(vm.runDir, file)).uid, 0, file);
    for (const file of ['mem', 'state', 'manifest.json']) assert.deepEqual([fs.statSync(path.join(base, file)).uid, mode(path.join(base, file))], [0, 0o600], file);
    const disk = fs.statSync(path.join(base, 'disk.raw'));
    assert.deepEqual([disk.uid, disk.gid, disk.mode & 0o7777], [0, gid, 0o640]);
  });

  test('QEMU cannot open the metadata database, the admin key, another VM\'s files or a snapshot\'s memory; it can open its backing disk read-only only', async () => {
    const [a, b] = vms;
    assert.ok(a && b);
    const denied = [
      path.join(dataDir, DATABASE_FILE),
      path.join(dataDir, ADMIN_KEY_FILE),
      b.ramPath,
      b.disk.path,
      path.join(b.runDir, 'qemu', 'qemu.pid'),
      path.join(base, 'mem'),
      path.join(base, 'state'),
      path.join(base, 'manifest.json'),
      '/etc/shadow',
    ];
    for (const file of denied) {
      assert.ok(fs.existsSync(file), `${file} exists`);
      assert.match(await qemuOpens(a, file), /Permission denied/, `QEMU of ${a.id} must not open ${file}`);
    }
    assert.match(await qemuOpens(a, path.join(base, 'disk.raw'), false), /Permission denied/, 'the backing disk is not writable');
    // Controls: the probe does open what QEMU may open.
    assert.equal(await qemuOpens(a, path.join(base, 'disk.raw')), 'opened');
    assert.equal(await qemuOpens(a, guest.kernel), 'opened');
    assert.equal(await qemuOpens(a, a.ramPath), 'opened');
  });

  test('a process with a QEMU uid (a QEMU that escaped its guest) cannot connect to the host\'s loopback services; root can', { timeout: 60_000 }, async () => {
    const listener = net.createServer((socket) => socket.end('hello\n'));
    await new Promise<void>((resolve) => listener.listen(0, '127.0.0.1', resolve));
    const port = (listener.address() as net.AddressInfo).port;
    const account = await ensureVmAccount('cocoon-qemu');
    await ensureEgressGuard({ uid: VM_UID_BASE + 4242, gid: account.gid, group: 'cocoon-qemu' }); // in place since the first VM; waits if still going
    const connect = (asQemu: boolean) =>
      new Promise<number | null>((resolve) => {
        const argv = ['busybox', 'nc', '-w', '3', '127.0.0.1', String(port)];
        const command = asQemu ? ['setpriv', `--reuid=${VM_UID_BASE + 4242}`, `--regid=${account.gid}`, '--clear-groups', ...argv] : argv;
        const child = spawn(command[0] as string, command.slice(1), { stdio: ['ignore', 'ignore', 'ignore'] });
        child.once('exit', (code) => resolve(code));
      });
    try {
      assert.equal(await connect(false), 0, 'control: root reaches the service');
      assert.notEqual(await connect(true), 0, 'a QEMU uid is refused');
    } finally {
      listener.close();
    }
  });

  test('QEMU may not spawn processes: a migration to `exec:` runs nothing', { timeout: 120_000 }, async () => {
    const vm = await QemuVm.restore({ id: 'priv-spawn', runDir: path.join(dataDir, 'vms', 'priv-spawn'), snapshotDir: base, network });
    const marker = path.join(dir, 'spawned');
    try {
      const execute = vm.qmp.execute.bind(vm.qmp) as unknown as (name: string, args: Record<string, unknown>) => Promise<unknown>;
      await execute('migrate', { uri: `exec:touch ${marker}` }).catch(() => undefined);
      await Promise.race([vm.waitForExit(), new Promise((resolve) => setTimeout(resolve, 3000))]);
      assert.equal(fs.existsSync(marker), false, 'nothing was executed');
    } finally {
      await vm.destroy();
    }
  });

  test('a guest kernel in a directory QEMU\'s user cannot search still boots unprivileged (it is passed as an open file)', { timeout: 180_000 }, async () => {
    const hidden = path.join(dir, 'hidden-kernel');
    fs.mkdirSync(hidden, { mode: 0o700 });
    const kernel = path.join(hidden, 'vmlinux');
    const initramfs = path.join(hidden, 'initramfs.cpio');
    fs.copyFileSync(guest.kernel, kernel);
    fs.copyFileSync(guest.initramfs, initramfs);
    for (const file of [kernel, initramfs]) fs.chmodSync(file, 0o644);
    makeHostileRootDisk(path.join(dir, 'hidden.raw'), 32);
    const vm = await QemuVm.boot({
      id: 'priv-hidden',
      runDir: path.join(dataDir, 'vms', 'priv-hidden'),
      vcpus: 1,
      memoryMiB: 256,
      accel: 'tcg',
      guest: { ...guest, kernel, initramfs },
      disk: { path: path.join(dir, 'hidden.raw'), format: 'raw' },
      network,
    });
    try {
      assert.equal(await httpGet(`http://127.0.0.1:${vm.hostPort(APP_PORT)}/`), 'hostile');
      assert.ok(Number((status(vm.pid).Uid ?? '').split(/\s+/)[0]) >= VM_UID_BASE);
      assert.equal(fs.statSync(hidden).mode & 0o777, 0o700, 'the kernel\'s directory was left alone');
    } finally {
      await vm.destroy();
    }
  });

  test('a run directory QEMU\'s user cannot reach: refused with qemu_no_access when required, else QEMU runs as root (logged)', { timeout: 180_000 }, async () => {
    // Outside the data and temp directories Cocoon opens nothing up: a private parent stays private.
    const outside = fs.mkdtempSync('/var/tmp/cocoon-private-');
    try {
      const options = { id: 'priv-outside', runDir: path.join(outside, 'vm'), snapshotDir: base, network };
      process.env.COCOON_QEMU_USER_REQUIRED = '1';
      try {
        await assert.rejects(QemuVm.restore(options), (error: unknown) => {
          assert.ok(isCocoonError(error, 'qemu_no_access'), String(error));
          assert.match((error as Error).message, /cocoon-private-.*not searchable/);
          return true;
        });
      } finally {
        delete process.env.COCOON_QEMU_USER_REQUIRED;
      }
      assert.equal(fs.statSync(outside).mode & 0o777, 0o700);
      const vm = await QemuVm.restore(options);
      try {
        assert.equal(await httpGet(`http://127.0.0.1:${vm.hostPort(APP_PORT)}/`), 'hostile');
        assert.equal(Number((status(vm.pid).Uid ?? '').split(/\s+/)[0]), 0, 'the fallback: QEMU as root');
      } finally {
        await vm.destroy();
      }
    } finally {
      cleanupDir(outside);
    }
  });

  const cgroups = cgroupSupport();
  describe('per-VM cgroups', { skip: cgroups.version === 0 ? `cgroups are not usable here: ${cgroups.reason}` : false }, () => {
    function groupsOf(pid: number): string[] {
      return fs
        .readFileSync(`/proc/${pid}/cgroup`, 'utf8')
        .split('\n')
        .filter((line) => line.includes('/cocoon-vms/'));
    }
    function groupDir(pid: number, controller: string): string {
      const line = groupsOf(pid).find((entry) => cgroups.version === 2 || entry.split(':')[1]?.split(',').includes(controller));
      assert.ok(line, `QEMU ${pid} is in a ${controller} group`);
      const where = line.slice(line.indexOf(':', line.indexOf(':') + 1) + 1);
      return cgroups.version === 2 ? path.join('/sys/fs/cgroup', where) : path.join('/sys/fs/cgroup', controller, where);
    }
    const read = (file: string) => fs.readFileSync(file, 'utf8').trim();

    test('each QEMU is in its own group with its CPU, memory and process limits; the group goes with it', { timeout: 120_000 }, async () => {
      const vm = await QemuVm.restore({ id: 'priv-limits', runDir: path.join(dataDir, 'vms', 'priv-limits'), snapshotDir: base, network });
      let dirs: string[] = [];
      try {
        const cpu = groupDir(vm.pid, 'cpu');
        const memory = groupDir(vm.pid, 'memory');
        const pids = groupDir(vm.pid, 'pids');
        dirs = [cpu, memory, pids];
        assert.notEqual(groupDir(vms[0]?.pid ?? -1, 'cpu'), cpu, 'not shared with another VM');
        const limit = (256 + 1024 + 256) * 1024 * 1024;
        if (cgroups.version === 1) {
          assert.equal(read(path.join(cpu, 'cpu.cfs_quota_us')), '100000');
          assert.equal(read(path.join(cpu, 'cpu.cfs_period_us')), '100000');
          assert.equal(Number(read(path.join(memory, 'memory.limit_in_bytes'))), limit);
        } else {
          assert.equal(read(path.join(cpu, 'cpu.max')), '100000 100000');
          assert.equal(Number(read(path.join(memory, 'memory.max'))), limit);
        }
        assert.equal(read(path.join(pids, 'pids.max')), '256');
      } finally {
        await vm.destroy();
      }
      for (const group of dirs) assert.equal(fs.existsSync(group), false, `${group} is removed with its VM`);
    });

    test('the CPU limit holds: a guest spinning under a 0.5-core limit gets at most about half a core', { timeout: 180_000 }, async () => {
      const vm = await QemuVm.restore({
        id: 'priv-cpu',
        runDir: path.join(dataDir, 'vms', 'priv-cpu'),
        snapshotDir: base,
        network,
        limits: { cpus: 0.5 },
      });
      try {
        assert.equal(await httpGet(`http://127.0.0.1:${vm.hostPort(APP_PORT)}/cgi-bin/start?spin`), 'started spin');
        await new Promise((resolve) => setTimeout(resolve, 1000));
        const before = vm.stats().cpuMs;
        const start = performance.now();
        await new Promise((resolve) => setTimeout(resolve, 3000));
        const cores = (vm.stats().cpuMs - before) / (performance.now() - start);
        assert.ok(cores <= 0.5 * 1.2, `QEMU used ${cores.toFixed(2)} cores under a 0.5-core limit`);
        const stat = read(path.join(groupDir(vm.pid, 'cpu'), 'cpu.stat'));
        assert.ok(Number(/nr_throttled (\d+)/.exec(stat)?.[1]) > 0, `the kernel throttled it: ${stat}`);
      } finally {
        await vm.destroy();
      }
    });

    test('the memory limit holds: a guest filling more memory than its QEMU may hold stays within it and keeps running', { timeout: 180_000 }, async () => {
      const limit = 192 * 1024 * 1024;
      const vm = await QemuVm.restore({
        id: 'priv-mem',
        runDir: path.join(dataDir, 'vms', 'priv-mem'),
        snapshotDir: base,
        network,
        limits: { memoryBytes: limit },
      });
      try {
        const memory = groupDir(vm.pid, 'memory');
        assert.equal(await httpGet(`http://127.0.0.1:${vm.hostPort(APP_PORT)}/`), 'hostile');
        // One request with a long deadline (a retried one would start filling again): under the
        // limit the kernel writes guest pages back to the RAM file to make room, which takes time.
        const response = await fetch(`http://127.0.0.1:${vm.hostPort(APP_PORT)}/cgi-bin/touch?160`, { signal: AbortSignal.timeout(150_000) });
        assert.equal((await response.text()).trim(), 'touched');
        assert.equal(await httpGet(`http://127.0.0.1:${vm.hostPort(APP_PORT)}/cgi-bin/count`), '1', 'the guest runs on');
        assert.equal(vm.exited, false);
        if (cgroups.version === 1) {
          assert.ok(Number(read(path.join(memory, 'memory.max_usage_in_bytes'))) <= limit);
          assert.ok(Number(read(path.join(memory, 'memory.failcnt'))) > 0, 'the limit was reached (and pages reclaimed)');
        } else {
          assert.ok(Number(read(path.join(memory, 'memory.peak'))) <= limit);
          assert.ok(Number(/max (\d+)/.exec(read(path.join(memory, 'memory.events')))?.[1]) > 0);
        }
      } finally {
        await vm.destroy();
      }
    });
  });

  test('no QEMU of this suite is left', () => {
    assert.deepEqual(qemuProcessesMentioning(path.join(dataDir, 'vms', 'priv-spawn')), []);
  });
});
