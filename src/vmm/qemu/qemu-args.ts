/**
 * QEMU's command line for a Cocoon microVM, as a pure function so that boot and restore build
 * exactly the same machine (a restore into a different device set fails to load).
 *
 * The machine is QEMU's `microvm`: no PCI, no firmware, virtio-mmio devices, the kernel booted
 * directly (PVH). Measured recipe: docs/design.md.
 */
import fs from 'node:fs';
import type { DiskSpec, MachineShape, PortForward } from '../types.ts';

/** The host's TSC rate in kHz, from /proc/cpuinfo (the kernel reports tsc_khz there). */
export function hostTscKhz(): number | undefined {
  try {
    const mhz = /^cpu MHz\s*:\s*([\d.]+)/m.exec(fs.readFileSync('/proc/cpuinfo', 'utf8'))?.[1];
    return mhz ? Math.round(Number(mhz) * 1000) : undefined;
  } catch {
    return undefined;
  }
}

export interface QemuLaunch {
  shape: MachineShape;
  /** Guest RAM lives in this file; `share` maps it MAP_SHARED so a snapshot need not copy it. */
  ram: { path: string; share: boolean };
  disk: DiskSpec;
  forwards: Required<PortForward>[];
  egress: boolean;
  /** `agent`: the guest agent's port (absent in launch records written before it existed). */
  sockets: { qmp: string; guest: string; serial: string; agent?: string };
  pidFile: string;
  /** The kernel command line: a restore must pass the one its snapshot booted with. */
  cmdline: string;
  /** Wait for `migrate-incoming` instead of booting (a restore). */
  incoming: boolean;
  /** Seccomp: deny spawning, privilege elevation and obsolete syscalls (off only for diagnosis). */
  sandbox: boolean;
  /**
   * A QEMU started ahead (pool.ts): the disk is attached later, over QMP, so the block device
   * starts on a placeholder under a filter whose child is then swapped (`disk` is not used).
   */
  diskLater?: boolean;
}

/** Node names of the block graph of a QEMU started with `diskLater` (pool.ts swaps `DISK_PLACEHOLDER` for the layer). */
export const DISK_NODE = 'root';
export const DISK_PLACEHOLDER = 'root-placeholder';
export const DISK_THROTTLE_GROUP = 'root-tg';

/**
 * Cocoon's part of the kernel command line; cocoon-init reads the cocoon.* parameters.
 *
 * Under TCG the guest's TSC ticks at the host's rate, but microvm offers no reference timer
 * (HPET, PM timer) and PIT calibration fails on a busy host, leaving the kernel without a
 * usable clocksource (boot stalls). `tsc_early_khz` hands it the host's TSC rate instead.
 */
export function kernelCmdline(shape: MachineShape, hostname: string, tscKhz?: number): string {
  const base = [
    'console=ttyS0',
    'reboot=t', // triple-fault reboot: microvm has no other reset path, and QEMU exits on it
    'panic=-1', // a kernel panic reboots at once, which ends the QEMU process
    'quiet',
    'loglevel=4',
    'i8042.noaux', 'i8042.nomux', 'i8042.nopnp', 'i8042.dumbkbd', // no PS/2 probing delay
    'tsc=reliable',
    `cocoon.hostname=${hostname}`,
    ...(tscKhz ? [`tsc_early_khz=${tscKhz}`] : []),
  ];
  return [...base, shape.guest.extraCmdline ?? ''].join(' ').trim();
}

export function qemuArgs(launch: QemuLaunch): string[] {
  const { shape } = launch;
  const memory = `${shape.memoryMiB}M`;
  const hostfwd = launch.forwards
    .map((f) => `,hostfwd=tcp:127.0.0.1:${f.hostPort}-:${f.guestPort}`)
    .join('');
  const args = [
    '-M', `microvm,accel=${shape.accel},isa-serial=on,rtc=on`,
    '-nodefaults', '-no-user-config', '-display', 'none',
    '-cpu', shape.accel === 'kvm' ? 'host' : 'max',
    '-smp', String(shape.vcpus),
    '-m', memory,
    '-object', `memory-backend-file,id=ram,size=${memory},mem-path=${launch.ram.path},share=${launch.ram.share ? 'on' : 'off'}`,
    '-machine', 'memory-backend=ram',
    '-kernel', shape.guest.kernel,
    '-initrd', shape.guest.initramfs,
    '-append', launch.cmdline,
    '-chardev', `socket,id=serial0,path=${launch.sockets.serial},server=on,wait=off`,
    '-serial', 'chardev:serial0',
    ...(launch.diskLater
      ? [
          // A throttle filter with no limits (its group sets none): the one kind of node whose
          // child `blockdev-reopen` may swap. Errors as `-drive` has them (ENOSPC pauses the guest).
          '-object', `throttle-group,id=${DISK_THROTTLE_GROUP}`,
          '-blockdev', `driver=null-co,node-name=${DISK_PLACEHOLDER},size=1073741824,read-zeroes=on`,
          '-blockdev', `driver=throttle,node-name=${DISK_NODE},throttle-group=${DISK_THROTTLE_GROUP},file=${DISK_PLACEHOLDER}`,
          '-device', `virtio-blk-device,drive=${DISK_NODE},werror=enospc,rerror=report`,
        ]
      : [
          '-drive', `id=root,file=${launch.disk.path},format=${launch.disk.format},if=none,cache=writeback,discard=unmap,detect-zeroes=unmap${launch.disk.readOnly ? ',readonly=on' : ''}`,
          '-device', 'virtio-blk-device,drive=root',
        ]),
    '-netdev', `user,id=net0,restrict=${launch.egress ? 'off' : 'on'}${hostfwd}`,
    '-device', 'virtio-net-device,netdev=net0',
    '-device', 'virtio-serial-device',
    '-chardev', `socket,id=guest0,path=${launch.sockets.guest},server=on,wait=off`,
    '-device', 'virtserialport,chardev=guest0,name=cocoon.0',
    ...(launch.sockets.agent
      ? ['-chardev', `socket,id=agent0,path=${launch.sockets.agent},server=on,wait=off`, '-device', 'virtserialport,chardev=agent0,name=cocoon.agent']
      : []),
    '-qmp', `unix:${launch.sockets.qmp},server=on,wait=off`,
    '-pidfile', launch.pidFile,
  ];
  if (launch.sandbox) {
    args.push('-sandbox', 'on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny');
  }
  if (launch.incoming) args.push('-incoming', 'defer');
  // Its command line names no directory: this names it as Cocoon's for whoever looks for leaks.
  if (launch.diskLater) args.push('-name', 'cocoon-started-ahead');
  return args;
}
