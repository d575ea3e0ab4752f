/**
 * A unix socket client connect that waits for the socket to appear: a VM process creates its
 * control sockets a little after it starts, and every driver's channels (the VMM's control
 * socket, the guest channel, the console) connect the same way.
 */
import net from 'node:net';
import { CocoonError } from '../common/errors.ts';

/** Connects to a unix socket, retrying while it does not exist yet (the VM's process is still starting). */
export async function connectUnix(path: string, timeoutMs: number, signal?: AbortSignal): Promise<net.Socket> {
  const deadline = Date.now() + timeoutMs;
  for (let delay = 1; ; delay = Math.min(delay * 2, 4)) { // QEMU creates its sockets ~30 ms in: poll finely
    signal?.throwIfAborted();
    try {
      return await new Promise<net.Socket>((resolve, reject) => {
        const socket = net.connect(path);
        socket.once('connect', () => {
          socket.off('error', reject);
          resolve(socket);
        });
        socket.once('error', reject);
      });
    } catch (error) {
      const code = (error as NodeJS.ErrnoException).code;
      if ((code !== 'ENOENT' && code !== 'ECONNREFUSED') || Date.now() > deadline) {
        throw new CocoonError('vm_connect_failed', `cannot connect to ${path}: ${(error as Error).message}`, { cause: error });
      }
      await new Promise((r) => setTimeout(r, delay));
    }
  }
}
