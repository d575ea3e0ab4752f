/**
 * The VM driver conformance suite: one set of tests written against the interface in
 * src/vmm/driver.ts, run once per implementation (QEMU today). A driver that cannot do
 * something declares it in `skips` with the reason, and the test says so instead of passing.
 *
 * Lean by design: one guest is booted per driver and everything else restores, forks or adopts
 * from it (driver-specific depth — seccomp, cgroups, hostile guests, faults — is in test/vmm/
 * and test/reliability/).
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { loadGuestArtifacts } from '../../src/guest/artifacts.ts';
import type { Vm, VmDriver } from '../../src/vmm/driver.ts';
import type { Phases } from '../../src/vmm/phases.ts';
import { qemuDriver } from '../../src/vmm/qemu/driver.ts';
import { readSnapshotManifest } from '../../src/vmm/snapshot.ts';
import { makeTestRootDisk } from '../support/rootfs.ts';
import { cleanupDir, httpGet, tempDir } from '../support/vm.ts';

type Capability = 'adopt' | 'forkPoint' | 'diskLayers';

interface Implementation {
  driver: VmDriver;
  /** What this driver does not do, and why (the test is skipped with that reason). */
  skips: Partial<Record<Capability, string>>;
}

const IMPLEMENTATIONS: Implementation[] = [{ driver: qemuDriver, skips: {} }];

const APP_PORT = 8080;
const network = { forwards: [{ guestPort: APP_PORT }] };

function hasCode(code: string) {
  return (error: unknown) => {
    assert.equal((error as { code?: string }).code, code, String(error));
    return true;
  };
}

/**
 * A driver's phase record (src/vmm/phases.ts, for the benchmarks): some phases, each a duration,
 * together no longer than the whole the caller measured around it.
 */
function assertPhases(phases: Readonly<Phases>, wholeMs: number, what: string): void {
  const values = Object.values(phases);
  assert.ok(values.length >= 3, `${what} reports its phases: ${JSON.stringify(phases)}`);
  assert.ok(values.every((ms) => Number.isFinite(ms) && ms >= 0), JSON.stringify(phases));
  const sum = values.reduce((a, b) => a + b, 0);
  assert.ok(sum <= wholeMs + 1, `${what}'s phases (${sum.toFixed(1)} ms) fit in its ${wholeMs.toFixed(1)} ms`);
}

for (const { driver, skips } of IMPLEMENTATIONS) {
  describe(`VM driver conformance: ${driver.name}`, () => {
    const dir = tempDir(`cocoon-conformance-${driver.name}-`);
    const guest = loadGuestArtifacts();
    const rootDisk = path.join(dir, 'root.raw');
    const started: Vm[] = [];
    /** The one booted guest; later tests snapshot it, restore and fork from it. */
    let base: Vm;
    const get = (vm: Vm, route: string) => {
      const { host, port } = vm.endpoint(APP_PORT);
      return httpGet(`http://${host}:${port}${route}`);
    };
    const restore = async (id: string, snapshotDir: string, verifyData: boolean | 'if-present' = true) => {
      const vm = await driver.restore({ id, runDir: path.join(dir, id), snapshotDir, network, verifyData });
      started.push(vm);
      return vm;
    };
    const skip = (capability: Capability) => (skips[capability] ? { skip: `${driver.name}: ${skips[capability]}` } : {});

    before(async () => {
      makeTestRootDisk(rootDisk);
      const accel = await driver.chooseAccelerator('tcg', guest);
      assert.equal(accel, 'tcg', 'an explicit choice is kept');
      base = await driver.boot({ id: 'base', runDir: path.join(dir, 'base'), vcpus: 1, memoryMiB: 256, accel, guest, disk: { path: rootDisk, format: 'raw' }, network });
      started.push(base);
    });
    after(async () => {
      for (const vm of started) await vm.kill().catch(() => undefined);
      assert.deepEqual(cleanupDir(dir), [], 'a test left VM processes running');
    });

    test('boot: cocoon-init said hello; a forwarded port answers at its endpoint; stats and console are there', async () => {
      assert.equal(base.channel.helloSeen, true);
      assert.equal(await get(base, '/'), 'hello from cocoon');
      assert.equal(await get(base, '/cgi-bin/count'), '1');
      assert.equal(base.hostPorts.get(APP_PORT), base.endpoint(APP_PORT).port);
      assert.throws(() => base.endpoint(9), hasCode('port_not_forwarded'));
      const stats = base.stats();
      assert.equal(stats.pid, base.pid);
      assert.ok(stats.rssBytes > 0 && stats.cpuMs > 0, JSON.stringify(stats));
      assert.match(base.serialTail(), /cocoon-init/);
      assert.deepEqual(driver.processesUnder(base.runDir), [base.pid]);
      assert.equal(typeof base.agentSocketPath, 'string');
      await base.channel.ping();
    });

    test('detach, then adopt: the same process, reachable again, and running', skip('adopt'), async () => {
      const pid = base.pid;
      base.detach();
      const adopted = await driver.adopt({ id: 'base', runDir: base.runDir });
      started.push(adopted);
      base = adopted;
      assert.equal(adopted.pid, pid);
      await adopted.ensureRunning();
      assert.equal(await get(adopted, '/cgi-bin/count'), '2');
      await adopted.channel.ping();
    });

    test('adopt of a run directory whose VM is not running is vm_gone', skip('adopt'), async () => {
      fs.mkdirSync(path.join(dir, 'nobody'), { recursive: true });
      await assert.rejects(driver.adopt({ id: 'nobody', runDir: path.join(dir, 'nobody') }), hasCode('vm_gone'));
    });

    test('a fork point leaves the VM running; a restore of it continues from that instant', skip('forkPoint'), async () => {
      const before = Number(await get(base, '/cgi-bin/count'));
      const target = path.join(dir, 'fork-point');
      const point = await base.forkPoint(target);
      assert.ok(point.pausedMs >= 0);
      assert.equal(point.manifest.shape.memoryMiB, 256);
      assert.deepEqual(point.manifest.guestPorts, [APP_PORT]);
      assert.equal(Number(await get(base, '/cgi-bin/count')), before + 1, 'the source runs on');
      const fork = await restore('fork', target);
      assert.equal(Number(await get(fork, '/cgi-bin/count')), before + 1, 'the fork starts where the source was');
      await fork.kill();
      assert.equal(fork.exited, true);
    });

    test('snapshot ends the VM and commits a checked snapshot; restores are independent VMs', async () => {
      const count = Number(await get(base, '/cgi-bin/count'));
      const snapshotDir = path.join(dir, 'snapshot');
      const phases: Phases = {};
      const started = performance.now();
      const manifest = await base.snapshot(snapshotDir, { phases });
      assertPhases(phases, performance.now() - started, 'the snapshot');
      assert.equal(base.exited, true);
      assert.deepEqual(driver.processesUnder(base.runDir), []);
      const read = await readSnapshotManifest(snapshotDir);
      assert.deepEqual([read.createdAt, read.files.state.sha256, read.shape], [manifest.createdAt, manifest.files.state.sha256, manifest.shape]);
      assert.equal(read.vmm?.name, driver.name, 'the manifest names its VMM');
      assert.match(read.vmm?.version ?? '', /^\d+\.\d+\.\d+$/, 'and its version');
      assert.equal(read.arch, driver.arch);
      assert.equal(read.guestProtocol, base.channel.protocolVersion ?? read.guestProtocol, 'the guest protocol of its hello');
      assert.ok(Number.isInteger(read.guestProtocol), 'the guest protocol version is recorded');
      await assert.rejects(base.snapshot(snapshotDir), hasCode('snapshot_exists'));
      const restoreStarted = performance.now();
      const [a, b] = await Promise.all([restore('clone-a', snapshotDir), restore('clone-b', snapshotDir)]);
      assertPhases(a.startPhases ?? {}, performance.now() - restoreStarted, 'a restore');
      assert.notEqual(a.endpoint(APP_PORT).port, b.endpoint(APP_PORT).port);
      assert.equal(Number(await get(a, '/cgi-bin/count')), count + 1);
      assert.equal(Number(await get(a, '/cgi-bin/count')), count + 2);
      assert.equal(Number(await get(b, '/cgi-bin/count')), count + 1, 'a clone does not see the other\'s writes');
      await Promise.all([a.destroy(), b.destroy()]);
      assert.equal(fs.existsSync(a.runDir), false, 'destroy removes the run directory');
    });

    test('manifests: one without the VMM, arch and protocol fields (older) restores; another arch or protocol is refused', async () => {
      const copy = (name: string, change: (manifest: Record<string, unknown>) => void) => {
        const target = path.join(dir, name);
        fs.mkdirSync(target);
        for (const file of fs.readdirSync(path.join(dir, 'snapshot'))) fs.linkSync(path.join(dir, 'snapshot', file), path.join(target, file));
        const manifest = JSON.parse(fs.readFileSync(path.join(target, 'manifest.json'), 'utf8')) as Record<string, unknown>;
        change(manifest);
        fs.rmSync(path.join(target, 'manifest.json'));
        fs.writeFileSync(path.join(target, 'manifest.json'), JSON.stringify(manifest));
        return target;
      };
      const older = copy('older', (m) => {
        delete m.vmm;
        delete m.arch;
        delete m.guestProtocol;
      });
      const vm = await restore('older-vm', older);
      await get(vm, '/');
      await vm.destroy();
      const otherArch = copy('other-arch', (m) => {
        m.arch = 'riscv64';
      });
      await assert.rejects(driver.restore({ id: 'arch', runDir: path.join(dir, 'arch'), snapshotDir: otherArch, network }), hasCode('snapshot_incompatible'));
      const otherVmm = copy('other-vmm', (m) => {
        m.vmm = { name: 'elsewhere', version: '1.0.0' };
      });
      await assert.rejects(driver.restore({ id: 'vmm', runDir: path.join(dir, 'vmm'), snapshotDir: otherVmm, network }), hasCode('snapshot_incompatible'));
      const future = copy('future', (m) => {
        m.guestProtocol = 99;
      });
      await assert.rejects(driver.restore({ id: 'future', runDir: path.join(dir, 'future'), snapshotDir: future, network }), hasCode('guest_protocol_unsupported'));
      assert.deepEqual(driver.processesUnder(dir), [], 'refused restores start nothing');
    });

    test('sweep kills the VMs under a directory but those kept, and waits for them', async () => {
      const snapshotDir = path.join(dir, 'snapshot');
      const [kept, orphan] = await Promise.all([restore('kept', snapshotDir), restore('orphan', snapshotDir)]);
      const killed = await driver.sweep(dir, { keep: new Set([kept.pid]) });
      assert.deepEqual(killed, [orphan.pid]);
      await orphan.waitForExit();
      assert.equal(kept.exited, false);
      await get(kept, '/');
      assert.deepEqual(await driver.sweep(path.join(dir, 'kept')), [kept.pid]);
      await kept.waitForExit();
      await driver.clearRunFiles(kept.runDir);
    });

    test('recoverSnapshot: committed when complete, none when nothing was saved', async () => {
      assert.equal(await driver.recoverSnapshot(path.join(dir, 'snapshot')), 'committed');
      assert.equal(await driver.recoverSnapshot(path.join(dir, 'never-taken')), 'none');
    });

    test('restore of a missing snapshot is snapshot_not_found and leaves nothing', async () => {
      await assert.rejects(driver.restore({ id: 'missing', runDir: path.join(dir, 'missing'), snapshotDir: path.join(dir, 'nowhere'), network }), hasCode('snapshot_not_found'));
      assert.deepEqual(driver.processesUnder(path.join(dir, 'missing')), []);
    });

    test('a snapshot chain moved elsewhere (its layout kept) restores: layers name their backing files relatively', async () => {
      // A tree of its own: a (hard-linked) copy of the snapshot, a VM restored from it, whose
      // snapshot goes two levels deeper; then the whole tree is renamed, as a moved data
      // directory or a chain copied into another host's cache would be.
      const tree = path.join(dir, 'tree');
      fs.mkdirSync(path.join(tree, 'base'), { recursive: true });
      for (const file of fs.readdirSync(path.join(dir, 'snapshot'))) fs.linkSync(path.join(dir, 'snapshot', file), path.join(tree, 'base', file));
      const vm = await restore('chain-vm', path.join(tree, 'base'));
      const count = Number(await get(vm, '/cgi-bin/count'));
      await vm.snapshot(path.join(tree, 'deeper', 'still', 'gen'));
      await driver.clearRunFiles(vm.runDir);
      const moved = path.join(dir, 'moved-tree');
      fs.renameSync(tree, moved);
      const again = await restore('chain-again', path.join(moved, 'deeper', 'still', 'gen'));
      assert.equal(Number(await get(again, '/cgi-bin/count')), count + 1, 'the moved chain continues where it was');
      await again.destroy();
    });

    test('disk layers: a layer over a disk, rebased onto a copy of it', skip('diskLayers'), async () => {
      // The booted root disk became the snapshot's (a snapshot takes the VM's disk): layer over that.
      const backing = path.join(dir, 'snapshot', 'disk.raw');
      const layer = path.join(dir, 'layer.qcow2');
      await driver.createDiskLayer(backing, 'raw', layer);
      assert.ok(fs.statSync(layer).size > 0);
      const copy = path.join(dir, 'backing-link.raw');
      fs.linkSync(backing, copy);
      await driver.rebaseDisk(layer, { path: copy, format: 'raw', sameContent: true });
      await assert.rejects(driver.createDiskLayer(path.join(dir, 'absent.raw'), 'raw', path.join(dir, 'bad.qcow2')), hasCode('disk_layer_failed'));
    });
  });
}
