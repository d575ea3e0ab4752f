/**
 * Hostile guests: a guest that floods its console, fills its disk, fork-bombs, spins every
 * vCPU or probes the host's network. None of it succeeds, and a host-side HTTP server (a
 * stand-in for the API, in this process, like the daemon that runs the VMs) keeps answering
 * with a p50 latency within 2x of the same measurement with the guest paused.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { loadGuestArtifacts } from '../../src/guest/artifacts.ts';
import { QemuVm } from '../../src/vmm/qemu/qemu.ts';
import { DEFAULT_SERIAL_BYTES_PER_SECOND } from '../../src/vmm/qemu/serial-log.ts';
import { latencyUnderLoad, startApiStandIn, waitUntil } from '../support/faults.ts';
import { makeHostileRootDisk } from '../support/hostile-rootfs.ts';
import { cleanupDir, httpGet, tempDir } from '../support/vm.ts';

const APP_PORT = 8080;
const VCPUS = 2;
const DISK_MIB = 32;
const MAX_LATENCY_RATIO = 2;

describe('hostile guests', () => {
  const dir = tempDir('cocoon-hostile-');
  const guest = loadGuestArtifacts();
  const base = path.join(dir, 'base');
  let api: Awaited<ReturnType<typeof startApiStandIn>> | undefined;
  const running = new Set<QemuVm>();
  const figures: Record<string, unknown> = {};

  before(async () => {
    api = await startApiStandIn();
    makeHostileRootDisk(path.join(dir, 'root.raw'), DISK_MIB);
    const vm = await QemuVm.boot({
      id: 'hostile-base',
      runDir: path.join(dir, 'hostile-base'),
      vcpus: VCPUS,
      memoryMiB: 256,
      accel: 'tcg',
      guest,
      disk: { path: path.join(dir, 'root.raw'), format: 'raw' },
      network: { forwards: [{ guestPort: APP_PORT }] },
    });
    assert.equal(await httpGet(`http://127.0.0.1:${vm.hostPort(APP_PORT)}/`), 'hostile');
    await vm.snapshot(base, { compact: true });
    await vm.destroy();
  });
  after(async () => {
    for (const vm of running) await vm.destroy().catch(() => undefined);
    await api?.close();
    console.error(`hostile-guest figures: ${JSON.stringify(figures)}`);
    assert.deepEqual(cleanupDir(dir), [], 'a test left QEMU processes running');
  });

  async function clone(id: string, options: { serialLogMaxBytes?: number; egress?: boolean } = {}): Promise<QemuVm> {
    const vm = await QemuVm.restore({
      id,
      runDir: path.join(dir, id),
      snapshotDir: base,
      network: { forwards: [{ guestPort: APP_PORT }], egress: options.egress },
      serialLogMaxBytes: options.serialLogMaxBytes,
    });
    running.add(vm);
    return vm;
  }
  async function destroy(vm: QemuVm): Promise<void> {
    await vm.destroy();
    running.delete(vm);
  }
  const get = (vm: QemuVm, route: string, timeoutMs?: number) => httpGet(`http://127.0.0.1:${vm.hostPort(APP_PORT)}${route}`, timeoutMs);

  /** The stand-in API's p50 with the guest attacking vs paused: at most 2x. */
  async function assertApiResponsive(vm: QemuVm, attack: string): Promise<void> {
    assert.ok(api);
    const result = await latencyUnderLoad(
      { pause: async () => void (await vm.qmp.execute('stop', {})), resume: async () => void (await vm.qmp.execute('cont', {})) },
      api.port,
    );
    figures[attack] = { idleP50Ms: +result.idleP50.toFixed(3), loadedP50Ms: +result.loadedP50.toFixed(3), ratio: +result.ratio.toFixed(2), requests: result.samples };
    assert.ok(
      result.ratio <= MAX_LATENCY_RATIO,
      `API p50 ${result.loadedP50.toFixed(3)} ms under ${attack} vs ${result.idleP50.toFixed(3)} ms idle: ${result.ratio.toFixed(2)}x`,
    );
  }

  test('a guest flooding its serial console: the host keeps at most the log bound, the API answers', { timeout: 300_000 }, async () => {
    const bound = 256 * 1024;
    const vm = await clone('flood', { serialLogMaxBytes: bound });
    try {
      assert.equal(await get(vm, '/cgi-bin/start?flood'), 'started flood');
      const log = path.join(vm.runDir, 'serial.log');
      const rotated = `${log}.1`;
      assert.ok(await waitUntil(() => fs.existsSync(rotated), 60_000, 50), 'the console log rotated: the flood reaches the host');
      // The console is read at a bounded rate (64 KiB/s): the guest cannot push more through.
      const kept = () => fs.statSync(log).size + (fs.existsSync(rotated) ? fs.statSync(rotated).size : 0);
      let received = 0;
      let last = fs.statSync(log).size;
      const start = performance.now();
      while (performance.now() - start < 3000) {
        await new Promise((resolve) => setTimeout(resolve, 20));
        const now = fs.statSync(log).size;
        // A rotation (one per ~2 s at most) made the file we followed serial.log.1: its end counts too.
        received += now >= last ? now - last : fs.statSync(rotated).size - last + now;
        last = now;
      }
      const rate = received / ((performance.now() - start) / 1000);
      figures.floodBytesPerSecond = Math.round(rate);
      assert.ok(rate <= DEFAULT_SERIAL_BYTES_PER_SECOND * 1.25, `${Math.round(rate)} B/s read from the console`);
      await assertApiResponsive(vm, 'flood');
      const total = kept();
      assert.ok(total <= bound, `${total} bytes of console kept for a bound of ${bound}`);
      assert.match(fs.readFileSync(rotated, 'latin1'), /FLOOD-0123456789/);
      figures.floodConsoleBytesKept = total;
      assert.equal(vm.exited, false);
    } finally {
      await destroy(vm);
    }
  });

  test('a guest filling its disk gets ENOSPC; its disk layer on the host stays within the virtual size', { timeout: 300_000 }, async () => {
    const vm = await clone('fill');
    try {
      const layer = path.join(vm.runDir, 'disk.qcow2');
      assert.equal(await get(vm, '/cgi-bin/start?fill'), 'started fill');
      let result = 'none';
      for (let i = 0; i < 600 && result === 'none'; i++) {
        await new Promise((resolve) => setTimeout(resolve, 500));
        result = await get(vm, '/cgi-bin/result?fill', 30_000);
      }
      assert.match(result, /No space left on device/, `the guest saw: ${result}`);
      const allocated = fs.statSync(layer).blocks * 512;
      const virtual = DISK_MIB * 1024 * 1024;
      figures.fillLayerAllocatedMiB = +(allocated / 1024 / 1024).toFixed(1);
      assert.ok(allocated <= virtual + 2 * 1024 * 1024, `the qcow2 layer holds ${allocated} bytes for a ${virtual}-byte disk`);
      // The layer is all the host storage a guest's writes can take (its RAM file is reserved
      // up front), and qcow2 cannot address more than the virtual size.
      const info = JSON.parse(execFileSync('qemu-img', ['info', '--output=json', '-U', layer], { encoding: 'utf8' })) as { 'virtual-size': number };
      assert.equal(info['virtual-size'], virtual);
      assert.equal(await get(vm, '/'), 'hostile', 'the guest still answers');
    } finally {
      await destroy(vm);
    }
  });

  test('a fork bomb stays inside the guest: QEMU keeps its limits, the API answers', { timeout: 300_000 }, async () => {
    const vm = await clone('forkbomb');
    try {
      assert.equal(await get(vm, '/cgi-bin/start?forkbomb'), 'started forkbomb');
      await new Promise((resolve) => setTimeout(resolve, 2000));
      await assertApiResponsive(vm, 'forkbomb');
      assert.equal(vm.exited, false, 'QEMU survives its guest');
      const threads = Number(/Threads:\s+(\d+)/.exec(fs.readFileSync(`/proc/${vm.pid}/status`, 'utf8'))?.[1]);
      assert.ok(threads <= 64, `QEMU has ${threads} threads`);
      const stats = vm.stats();
      figures.forkbombQemuRssMiB = +(stats.rssBytes / 1024 / 1024).toFixed(1);
      assert.ok(stats.rssBytes <= (256 + 1024 + 256) * 1024 * 1024, `QEMU uses ${stats.rssBytes} bytes`);
    } finally {
      await destroy(vm);
    }
  });

  test(`a guest spinning all ${VCPUS} vCPUs: the API answers`, { timeout: 300_000 }, async () => {
    const vm = await clone('spin');
    try {
      assert.equal(await get(vm, '/cgi-bin/start?spin'), 'started spin');
      let result = 'none';
      for (let i = 0; i < 60 && result === 'none'; i++) {
        await new Promise((resolve) => setTimeout(resolve, 250));
        result = await get(vm, '/cgi-bin/result?spin', 30_000);
      }
      assert.equal(result, `spinning ${VCPUS}`);
      const cpuBefore = vm.stats().cpuMs;
      const wallBefore = performance.now();
      await new Promise((resolve) => setTimeout(resolve, 2000));
      figures.spinQemuCores = +((vm.stats().cpuMs - cpuBefore) / (performance.now() - wallBefore)).toFixed(2);
      await assertApiResponsive(vm, 'spin');
    } finally {
      await destroy(vm);
    }
  });

  describe('a guest probing the network (egress off, the default)', () => {
    const servers: net.Server[] = [];
    let loopbackPort = 0;
    before(async () => {
      // A host service on loopback only, the kind a guest must never reach.
      const server = net.createServer((socket) => socket.end('secret\n'));
      await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
      servers.push(server);
      loopbackPort = (server.address() as net.AddressInfo).port;
    });
    after(() => {
      for (const server of servers) server.close();
    });

    test('reaches neither host loopback services, the API port, the slirp host and DNS addresses, nor 169.254.169.254', { timeout: 300_000 }, async () => {
      assert.ok(api);
      const vm = await clone('probe');
      try {
        const forbidden = [
          `10.0.2.2:${loopbackPort}`, // slirp's alias for the host's 127.0.0.1
          `10.0.2.2:${api.port}`, // the API (stand-in)
          `10.0.2.2:${vm.hostPort(APP_PORT)}`, // its own forwarded port, from inside
          '10.0.2.2:22',
          '10.0.2.3:53', // slirp's DNS
          '169.254.169.254:80', // cloud metadata
        ];
        const controls = ['127.0.0.1:8080', '10.0.2.15:8080']; // the guest's own server: the probe works
        const answer = await get(vm, `/cgi-bin/probe?${[...forbidden, ...controls].join(',')}`, 120_000);
        const results = Object.fromEntries(answer.split('\n').map((line) => line.split(' ') as [string, string]));
        figures.probes = results;
        for (const target of controls) assert.equal(results[target], 'open', `control ${target}: ${answer}`);
        for (const target of forbidden) assert.equal(results[target], 'closed', `${target} must be unreachable: ${answer}`);
      } finally {
        await destroy(vm);
      }
    });

    test('with egress on, the host loopback and the API stay out of reach (the egress guard)', { timeout: 300_000 }, async () => {
      assert.ok(api);
      const vm = await clone('probe-egress', { egress: true });
      try {
        // Only loopback targets here: with egress on, anything else would leave this machine.
        const forbidden = [`10.0.2.2:${loopbackPort}`, `10.0.2.2:${api.port}`, '10.0.2.2:22'];
        const controls = ['10.0.2.15:8080'];
        const answer = await get(vm, `/cgi-bin/probe?${[...forbidden, ...controls].join(',')}`, 120_000);
        const results = Object.fromEntries(answer.split('\n').map((line) => line.split(' ') as [string, string]));
        figures.egressProbes = results;
        for (const target of controls) assert.equal(results[target], 'open', `control ${target}: ${answer}`);
        for (const target of forbidden) assert.equal(results[target], 'closed', `${target} must be unreachable: ${answer}`);
        // And the forwarded port still works from the host (replies are not new connections).
        assert.equal(await get(vm, '/'), 'hostile');
      } finally {
        await destroy(vm);
      }
    });
  });
});
