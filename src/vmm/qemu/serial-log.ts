/**
 * The guest's serial console, kept on disk within a bound. QEMU writes it to a unix socket that
 * we read; we append to `serial.log` and, when that reaches half the bound, rotate it to
 * `serial.log.1`. A guest that floods its console costs at most `maxBytes` of disk.
 *
 * It is also read at a bounded rate, `DEFAULT_SERIAL_BYTES_PER_SECOND` (64 KiB/s, about six
 * times a real 115200-baud console): past a tenth of it within a tenth of a second, reading
 * pauses until that tenth ends. QEMU then cannot hand the guest's UART bytes on, and the
 * guest's console writes wait: a flooding guest slows itself down instead of the daemon.
 * (Measured: unthrottled, a flooding guest pushed ~330 KB/s through, in small reads, and the
 * daemon's HTTP p50 rose 1.6-2x; pausing after every read instead collapses QEMU's 1-byte
 * UART writes to a few KB/s, too slow for real logs.)
 */
import fs from 'node:fs';
import type net from 'node:net';
import { connectUnix } from '../../net/unix-socket.ts';

export const DEFAULT_SERIAL_LOG_MAX_BYTES = 4 * 1024 * 1024;
export const DEFAULT_SERIAL_BYTES_PER_SECOND = 64 * 1024;
const WINDOW_MS = 100;

export class SerialLog {
  readonly path: string;
  private readonly halfBound: number;
  private fd: number;
  private size: number;
  private socket: net.Socket | undefined;
  private readonly windowBudget: number;
  private windowStart = 0;
  private windowBytes = 0;
  private resumeTimer: NodeJS.Timeout | undefined;

  constructor(path: string, maxBytes = DEFAULT_SERIAL_LOG_MAX_BYTES, bytesPerSecond = DEFAULT_SERIAL_BYTES_PER_SECOND) {
    this.path = path;
    this.windowBudget = Math.max(1024, Math.floor((bytesPerSecond * WINDOW_MS) / 1000));
    this.halfBound = Math.max(4096, Math.floor(maxBytes / 2));
    this.fd = fs.openSync(path, 'a');
    this.size = fs.fstatSync(this.fd).size;
  }

  /** Starts copying from QEMU's serial socket. Resolves once connected. */
  async attach(socketPath: string, timeoutMs = 5000, signal?: AbortSignal): Promise<void> {
    this.attachSocket(await connectUnix(socketPath, timeoutMs, signal));
  }

  /** Starts copying from a connection to QEMU's serial socket made earlier (a QEMU started ahead: pool.ts). */
  attachSocket(socket: net.Socket): void {
    this.socket = socket;
    socket.on('data', (chunk: Buffer) => {
      this.throttle(socket, chunk.length);
      this.append(chunk);
    });
    socket.on('error', () => undefined); // QEMU exiting closes it; nothing to report
  }

  append(chunk: Buffer): void {
    if (this.fd < 0) return;
    if (this.size + chunk.length > this.halfBound) this.rotate();
    const bounded = chunk.length > this.halfBound ? chunk.subarray(chunk.length - this.halfBound) : chunk;
    fs.writeSync(this.fd, bounded);
    this.size += bounded.length;
  }

  /** Counts `bytes` read; once this window's budget is spent, pauses reading until the window ends. */
  private throttle(socket: net.Socket, bytes: number): void {
    const now = Date.now();
    if (now - this.windowStart >= WINDOW_MS) {
      this.windowStart = now;
      this.windowBytes = 0;
    }
    this.windowBytes += bytes;
    if (this.resumeTimer || this.windowBytes < this.windowBudget) return;
    socket.pause();
    this.resumeTimer = setTimeout(() => {
      this.resumeTimer = undefined;
      this.windowStart = Date.now();
      this.windowBytes = 0;
      if (!socket.destroyed) socket.resume();
    }, Math.max(1, WINDOW_MS - (now - this.windowStart)));
    this.resumeTimer.unref();
  }

  close(): void {
    if (this.resumeTimer) clearTimeout(this.resumeTimer);
    this.resumeTimer = undefined;
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
