/**
 * Choosing the accelerator. KVM is only worth using where a guest really boots under it: on
 * nested, paravirtual KVM (as on Cocoon's CI machines) a stock kernel hangs in early boot. So
 * `auto` boots a probe guest under KVM with a short deadline and falls back to TCG.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { CocoonError } from '../../common/errors.ts';
import { log } from '../../common/log.ts';
import { GuestChannel } from '../guest-channel.ts';
import type { Accelerator, AcceleratorChoice, GuestKernel } from '../types.ts';
import { setting } from '../../common/settings.ts';

const PROBE_TIMEOUT_MS = 5000;
let probed: Promise<Accelerator> | undefined;

/** A COCOON_ACCEL value (the configuration's parser: src/common/settings.ts). */
export function parseAcceleratorChoice(value: string | undefined): AcceleratorChoice {
  return setting('COCOON_ACCEL', { COCOON_ACCEL: value });
}

/** Resolves the configured choice to the accelerator VMs will use; logs the decision once. */
export async function chooseAccelerator(choice: AcceleratorChoice, guest: GuestKernel): Promise<Accelerator> {
  if (choice === 'tcg') return 'tcg';
  if (choice === 'kvm') {
    if (!kvmDeviceUsable()) throw new CocoonError('kvm_unavailable', '/dev/kvm is missing or not accessible; use COCOON_ACCEL=tcg or auto');
    return 'kvm';
  }
  probed ??= probeKvm(guest).then((works) => {
    const accel: Accelerator = works ? 'kvm' : 'tcg';
    log.info({ accel }, works ? 'KVM boots guests here: using it' : 'KVM unusable here (no device or no boot within the probe): using TCG');
    return accel;
  });
  return probed;
}

function kvmDeviceUsable(): boolean {
  try {
    fs.accessSync('/dev/kvm', fs.constants.R_OK | fs.constants.W_OK);
    return true;
  } catch {
    return false;
  }
}

/** Boots kernel + initramfs under KVM with `cocoon.probe=1`: cocoon-init says hello and powers off. */
async function probeKvm(guest: GuestKernel): Promise<boolean> {
  if (!kvmDeviceUsable()) return false;
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cocoon-kvm-probe-'));
  const socket = path.join(dir, 'guest.sock');
  const child = spawn(
    setting('COCOON_QEMU'),
    [
      '-M', 'microvm,accel=kvm,isa-serial=on', '-nodefaults', '-no-user-config', '-display', 'none',
      '-cpu', 'host', '-m', '256M', '-kernel', guest.kernel, '-initrd', guest.initramfs,
      '-append', 'console=ttyS0 quiet panic=-1 reboot=t cocoon.probe=1',
      '-device', 'virtio-serial-device',
      '-chardev', `socket,id=guest0,path=${socket},server=on,wait=off`,
      '-device', 'virtserialport,chardev=guest0,name=cocoon.0',
    ],
    { stdio: 'ignore' },
  );
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  try {
    const channel = await GuestChannel.connect(socket, 2000);
    try {
      await channel.waitForHello(PROBE_TIMEOUT_MS);
      return true;
    } finally {
      channel.close();
    }
  } catch {
    return false;
  } finally {
    child.kill('SIGKILL');
    await exited;
    fs.rmSync(dir, { recursive: true, force: true });
  }
}
