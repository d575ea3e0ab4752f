/**
 * The guest's serial console, kept on disk within a bound. QEMU writes it to a unix socket that
 * we read; we append to `serial.log` and, when that reaches half the bound, rotate it to
 * `serial.log.1`. A guest that floods its console costs at most `maxBytes` of disk.
 */
import fs from 'node:fs';
import type net from 'node:net';
import { connectUnix } from './qmp.ts';

export const DEFAULT_SERIAL_LOG_MAX_BYTES = 4 * 1024 * 1024;

export class SerialLog {
  readonly path: string;
  private readonly halfBound: number;
  private fd: number;
  private size: number;
  private socket: net.Socket | undefined;

  constructor(path: string, maxBytes = DEFAULT_SERIAL_LOG_MAX_BYTES) {
    this.path = path;
    this.halfBound = Math.max(4096, Math.floor(maxBytes / 2));
    this.fd = fs.openSync(path, 'a');
    this.size = fs.fstatSync(this.fd).size;
  }

  /** Starts copying from QEMU's serial socket. Resolves once connected. */
  async attach(socketPath: string, timeoutMs = 5000, signal?: AbortSignal): Promise<void> {
    const socket = await connectUnix(socketPath, timeoutMs, signal);
    this.socket = socket;
    socket.on('data', (chunk: Buffer) => this.append(chunk));
    socket.on('error', () => undefined); // QEMU exiting closes it; nothing to report
  }

  append(chunk: Buffer): void {
    if (this.fd < 0) return;
    if (this.size + chunk.length > this.halfBound) this.rotate();
    const bounded = chunk.length > this.halfBound ? chunk.subarray(chunk.length - this.halfBound) : chunk;
    fs.writeSync(this.fd, bounded);
    this.size += bounded.length;
  }

  close(): void {
    this.socket?.destroy();
    if (this.fd >= 0) fs.closeSync(this.fd);
    this.fd = -1;
  }

  private rotate(): void {
    fs.closeSync(this.fd);
    fs.renameSync(this.path, `${this.path}.1`);
    this.fd = fs.openSync(this.path, 'a');
    this.size = 0;
  }
}

/** The last `lines` lines of a serial log (its rotated half included), for error messages. */
export function tailSerialLog(path: string, lines = 30): string {
  const read = (file: string) => {
    try {
      return fs.readFileSync(file, 'latin1');
    } catch {
      return '';
    }
  };
  const text = read(`${path}.1`) + read(path);
  return text.split('\n').slice(-lines - 1).join('\n').replace(/[^\x09\x0a\x20-\x7e]/g, '?').trimEnd();
}
