/** The QEMU command line: the security-relevant defaults are asserted, not assumed. */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { kernelCmdline, qemuArgs, type QemuLaunch } from '../../src/vmm/qemu/qemu-args.ts';

const shape = { vcpus: 2, memoryMiB: 512, accel: 'tcg' as const, guest: { kernel: '/k/vmlinux', initramfs: '/k/initrd.cpio' } };
const launch = (overrides: Partial<QemuLaunch> = {}): QemuLaunch => ({
  shape,
  cmdline: kernelCmdline(shape, 'vm-1', 2_600_000),
  ram: { path: '/run/vm/mem', share: true },
  disk: { path: '/run/vm/disk.qcow2', format: 'qcow2' },
  forwards: [{ guestPort: 8080, hostPort: 40001 }],
  egress: false,
  sockets: { qmp: '/run/vm/qmp.sock', guest: '/run/vm/guest.sock', serial: '/run/vm/serial.sock' },
  pidFile: '/run/vm/qemu.pid',
  incoming: false,
  sandbox: true,
  ...overrides,
});
const argAfter = (args: string[], flag: string) => args.filter((_, i) => args[i - 1] === flag);

test('guest egress is off and forwarded ports listen on loopback only', () => {
  const [netdev] = argAfter(qemuArgs(launch()), '-netdev');
  assert.match(netdev ?? '', /restrict=on/);
  assert.match(netdev ?? '', /hostfwd=tcp:127\.0\.0\.1:40001-:8080/);
  assert.doesNotMatch(netdev ?? '', /hostfwd=tcp::|0\.0\.0\.0/);
  assert.match(argAfter(qemuArgs(launch({ egress: true })), '-netdev')[0] ?? '', /restrict=off/);
});

test('QEMU runs in its seccomp sandbox with spawning and privilege elevation denied', () => {
  const [sandbox] = argAfter(qemuArgs(launch()), '-sandbox');
  for (const option of ['on', 'spawn=deny', 'elevateprivileges=deny', 'obsolete=deny', 'resourcecontrol=deny']) {
    assert.ok(sandbox?.split(',').includes(option), `${option} in ${sandbox}`);
  }
});

test('guest RAM is a shared file mapping and a restore waits for its state', () => {
  const args = qemuArgs(launch({ incoming: true }));
  assert.ok(argAfter(args, '-object')[0]?.includes('mem-path=/run/vm/mem,share=on'));
  assert.deepEqual(argAfter(args, '-incoming'), ['defer']);
  assert.deepEqual(argAfter(qemuArgs(launch()), '-incoming'), []);
});

test('the machine shape and kernel command line are passed as given', () => {
  const args = qemuArgs(launch());
  assert.deepEqual(argAfter(args, '-smp'), ['2']);
  assert.deepEqual(argAfter(args, '-m'), ['512M']);
  assert.match(argAfter(args, '-append')[0] ?? '', /cocoon\.hostname=vm-1 .*tsc_early_khz=2600000/);
  assert.match(argAfter(args, '-M')[0] ?? '', /^microvm,accel=tcg/);
});
