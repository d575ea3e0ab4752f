/** Host ports for forwarded guest ports: loopback only, picked free by the kernel. */
import net from 'node:net';
import { CocoonError } from '../common/errors.ts';

export async function freeLoopbackPort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address() as net.AddressInfo;
      server.close(() => resolve(port));
    });
  });
}

/** Throws `port_in_use` when something already listens on 127.0.0.1:port. */
export async function assertPortFree(port: number): Promise<void> {
  if (!Number.isInteger(port) || port < 1 || port > 65535) {
    throw new CocoonError('invalid_port', `host port ${port} is not a TCP port (1-65535)`, { status: 400 });
  }
  await new Promise<void>((resolve, reject) => {
    const server = net.createServer();
    server.once('error', (error: NodeJS.ErrnoException) =>
      reject(
        error.code === 'EADDRINUSE'
          ? new CocoonError('port_in_use', `host port ${port} is already in use on 127.0.0.1; choose another or omit it`, {
              status: 409,
            })
          : error,
      ),
    );
    server.listen(port, '127.0.0.1', () => server.close(() => resolve()));
  });
}
