/**
 * The signal the VM-level benches time a restore, resume or boot against: the first real HTTP
 * answer of the test app, through the VM's forwarded port (no gateway in between).
 */
import type { QemuVm } from '../src/vmm/qemu/qemu.ts';

export const APP_PORT = 8080;
/** The port forward every VM-level bench gives its VMs. */
export const network = { forwards: [{ guestPort: APP_PORT }] };

/** Polls the app every 2 ms until it answers 200. */
export async function firstByte(vm: QemuVm, timeoutMs = 120_000): Promise<void> {
  const url = `http://127.0.0.1:${vm.hostPort(APP_PORT)}/`;
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      const response = await fetch(url);
      await response.arrayBuffer();
      if (response.ok) return;
    } catch {
      // not up yet
    }
    if (Date.now() > deadline) throw new Error(`no HTTP answer from ${vm.id} within ${timeoutMs} ms`);
    await new Promise((resolve) => setTimeout(resolve, 2));
  }
}
