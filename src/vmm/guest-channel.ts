/**
 * The host end of the control channel to cocoon-init (docs/guest-protocol.md): a virtio-serial
 * port that QEMU exposes on the host as a unix socket. Lines of words; commands carry a
 * sequence number that the guest echoes in its answer.
 *
 * The guest is hostile: every line is bounded, parsed defensively, and nothing it says is
 * trusted beyond "this answer arrived".
 */
import { randomBytes } from 'node:crypto';
import { EventEmitter } from 'node:events';
import type net from 'node:net';
import { CocoonError } from '../common/errors.ts';
import { connectUnix } from '../net/unix-socket.ts';

const MAX_LINE = 4096;

/**
 * The control-channel protocol versions this host speaks (docs/guest-protocol.md): 1, the
 * channel alone; 2, with the guest agent's port. A guest saying another is refused.
 */
export const GUEST_PROTOCOL = { min: 1, max: 2 } as const;

/** Throws `guest_protocol_unsupported` for a version outside `GUEST_PROTOCOL`. */
export function checkGuestProtocol(version: number, what: string): void {
  if (!Number.isInteger(version) || version < GUEST_PROTOCOL.min || version > GUEST_PROTOCOL.max) {
    throw new CocoonError(
      'guest_protocol_unsupported',
      `${what} speaks guest protocol ${String(version)}, this host ${GUEST_PROTOCOL.min} to ${GUEST_PROTOCOL.max}: rebuild the image with this Cocoon's guest artifacts`,
      { status: 422 },
    );
  }
}

export interface GuestEvents {
  hello: [version: number];
  started: [pid: number];
  exit: [code: number];
  close: [];
  line: [words: string[]];
}

export class GuestChannel extends EventEmitter<GuestEvents> {
  private readonly socket: net.Socket;
  private buffer = '';
  private nextSeq = 1;
  private closed = false;
  /** Set once cocoon-init said hello (on boot) or answered a command (after a restore). */
  helloSeen = false;
  /** The protocol version cocoon-init said hello with (undefined until then, and on a channel to a restored or adopted guest). */
  protocolVersion: number | undefined;
  exitCode: number | undefined;
  /** The workload's pid once cocoon-init said `started`. */
  workloadPid: number | undefined;

  private constructor(socket: net.Socket) {
    super();
    this.setMaxListeners(64);
    this.socket = socket;
    socket.setEncoding('latin1');
    socket.on('data', (chunk: string) => this.onData(chunk));
    socket.on('close', () => this.onClose());
    socket.on('error', () => this.onClose());
  }

  static async connect(path: string, timeoutMs = 5000, signal?: AbortSignal): Promise<GuestChannel> {
    return new GuestChannel(await connectUnix(path, timeoutMs, signal));
  }

  get isClosed(): boolean {
    return this.closed;
  }

  /** Resolves once cocoon-init has said hello (it does so before starting the workload). */
  waitForHello(timeoutMs: number, signal?: AbortSignal): Promise<void> {
    const check = () => {
      if (this.protocolVersion !== undefined) checkGuestProtocol(this.protocolVersion, 'the guest');
    };
    if (this.helloSeen) return Promise.resolve().then(check);
    return this.waitFor((words) => words[0] === 'hello', timeoutMs, 'the guest to boot', signal).then(check);
  }

  /** Resolves once cocoon-init has started the workload (an image without an app port is ready then). */
  waitForWorkloadStart(timeoutMs: number, signal?: AbortSignal): Promise<void> {
    if (this.workloadPid !== undefined) return Promise.resolve();
    return this.waitFor((words) => words[0] === 'started', timeoutMs, 'the workload to start', signal).then(() => undefined);
  }

  ping(timeoutMs = 2000): Promise<void> {
    return this.request('ping', [], timeoutMs).then(() => undefined);
  }

  /** After a snapshot restore: set the guest's clock to ours and reseed its kernel RNG. */
  restoreFromSnapshot(timeoutMs = 2000): Promise<void> {
    const now = Date.now();
    const seconds = Math.floor(now / 1000);
    const nanos = (now % 1000) * 1_000_000;
    return this.request('restore', [String(seconds), String(nanos), randomBytes(64).toString('hex')], timeoutMs).then(
      () => undefined,
    );
  }

  /** Resolves true once a TCP connect to the port inside the guest succeeds, false at the timeout. */
  async waitForPort(port: number, timeoutMs: number, signal?: AbortSignal): Promise<boolean> {
    const words = await this.request('waitport', [String(port), String(timeoutMs)], timeoutMs + 2000, signal);
    return words[3] === 'ok';
  }

  /** Runs an image hook inside the guest; resolves with its exit status, 'timeout' or 'none'. */
  async runHook(name: string, timeoutMs: number): Promise<string> {
    const words = await this.request('hook', [name, String(timeoutMs)], timeoutMs + 2000);
    return words[3] ?? 'none';
  }

  /** Asks the guest to stop its workload and power off. Does not wait. */
  shutdown(graceMs: number): void {
    this.send('shutdown', String(this.nextSeq++), String(graceMs));
  }

  close(): void {
    this.socket.destroy();
    this.onClose();
  }

  private async request(command: string, args: string[], timeoutMs: number, signal?: AbortSignal): Promise<string[]> {
    const seq = String(this.nextSeq++);
    const answer = this.waitFor((words) => words[1] === seq && words[0] !== 'hello', timeoutMs, command, signal);
    this.send(command, seq, ...args);
    const words = await answer;
    if (words[0] === 'error') {
      throw new CocoonError('guest_command_failed', `the guest could not ${command}: ${words.slice(2).join(' ')}`);
    }
    return words;
  }

  private send(...words: string[]): void {
    if (this.closed) return;
    this.socket.write(words.join(' ') + '\n');
  }

  private waitFor(
    match: (words: string[]) => boolean,
    timeoutMs: number,
    what: string,
    signal?: AbortSignal,
  ): Promise<string[]> {
    return new Promise((resolve, reject) => {
      if (this.closed) return reject(channelGone(what));
      const onLine = (words: string[]) => {
        if (!match(words)) return;
        cleanup();
        resolve(words);
      };
      const onClose = () => {
        cleanup();
        reject(channelGone(what));
      };
      const onAbort = () => {
        cleanup();
        reject(signal?.reason ?? new CocoonError('aborted', `stopped waiting for ${what}`));
      };
      const timer = setTimeout(() => {
        cleanup();
        reject(new CocoonError('guest_timeout', `timed out after ${timeoutMs} ms waiting for ${what}`));
      }, timeoutMs);
      const cleanup = () => {
        clearTimeout(timer);
        this.off('line', onLine);
        this.off('close', onClose);
        signal?.removeEventListener('abort', onAbort);
      };
      this.on('line', onLine);
      this.on('close', onClose);
      signal?.addEventListener('abort', onAbort, { once: true });
    });
  }

  private onData(chunk: string): void {
    this.buffer += chunk;
    let newline: number;
    while ((newline = this.buffer.indexOf('\n')) >= 0) {
      const line = this.buffer.slice(0, newline);
      this.buffer = this.buffer.slice(newline + 1);
      if (line.length <= MAX_LINE) this.onLine(line.split(' '));
    }
    if (this.buffer.length > MAX_LINE) this.buffer = ''; // an overlong line from the guest: drop it
  }

  private onLine(words: string[]): void {
    const [kind, value] = words;
    if (kind === 'hello') {
      this.helloSeen = true;
      this.protocolVersion = Number(value);
      this.emit('hello', Number(value));
    } else if (kind === 'started') {
      this.workloadPid = Number(value);
      this.emit('started', Number(value));
    } else if (kind === 'exit') {
      this.exitCode = Number(value);
      this.emit('exit', this.exitCode);
    }
    this.emit('line', words);
  }

  private onClose(): void {
    if (this.closed) return;
    this.closed = true;
    this.emit('close');
  }
}

function channelGone(what: string): CocoonError {
  return new CocoonError('vm_gone', `the guest's control channel closed while waiting for ${what}`);
}
