/**
 * A small typed client for QEMU's Machine Protocol (QMP) over a unix socket.
 *
 * QMP is line-delimited JSON: a greeting, then `qmp_capabilities`, then commands answered in
 * order (matched here by `id`) with asynchronous events in between. No maintained npm client
 * exists, and the part Cocoon needs is small: commands with timeouts, typed errors, and
 * waiting for events.
 */
import { EventEmitter } from 'node:events';
import net from 'node:net';
import { CocoonError } from '../../common/errors.ts';
import { connectUnix } from '../../net/unix-socket.ts';

export interface QmpEvent {
  event: string;
  data?: Record<string, unknown>;
  timestamp?: { seconds: number; microseconds: number };
}

/** The subset of QMP commands Cocoon uses, with their argument and return types. */
export interface QmpCommands {
  qmp_capabilities: { args: Record<string, never>; ret: Record<string, never> };
  'query-status': { args: Record<string, never>; ret: { running: boolean; status: string } };
  stop: { args: Record<string, never>; ret: Record<string, never> };
  cont: { args: Record<string, never>; ret: Record<string, never> };
  quit: { args: Record<string, never>; ret: Record<string, never> };
  'migrate-set-capabilities': {
    args: { capabilities: Array<{ capability: string; state: boolean }> };
    ret: Record<string, never>;
  };
  migrate: { args: { uri: string }; ret: Record<string, never> };
  'migrate-incoming': { args: { uri: string }; ret: Record<string, never> };
  'query-migrate': {
    args: Record<string, never>;
    ret: { status?: string; 'error-desc'?: string; 'total-time'?: number; downtime?: number };
  };
  'query-cpus-fast': { args: Record<string, never>; ret: Array<{ 'cpu-index': number; 'thread-id': number }> };
  'query-balloon': { args: Record<string, never>; ret: { actual: number } };
  /** A human-monitor (HMP) command; its text output is the result (hostfwd_add has no QMP form). */
  'human-monitor-command': { args: { 'command-line': string }; ret: string };
  /** Block graph changes: a QEMU started ahead gets its disk this way (pool.ts). */
  'blockdev-add': { args: Record<string, unknown>; ret: Record<string, never> };
  'blockdev-reopen': { args: { options: Array<Record<string, unknown>> }; ret: Record<string, never> };
  'blockdev-del': { args: { 'node-name': string }; ret: Record<string, never> };
}

type CommandName = keyof QmpCommands;

/** QEMU refused a command: `errorClass` is QMP's class (GenericError, CommandNotFound, ...). */
export class QmpError extends CocoonError {
  readonly errorClass: string;
  constructor(command: string, errorClass: string, desc: string) {
    super('qmp_error', `QEMU refused ${command}: ${desc}`, { details: { command, errorClass } });
    this.errorClass = errorClass;
  }
}

interface Pending {
  command: string;
  resolve: (value: unknown) => void;
  reject: (error: Error) => void;
  timer: NodeJS.Timeout;
}

const MAX_LINE_BYTES = 1024 * 1024; // QMP answers Cocoon reads are small; a bigger line is a fault

export class QmpClient extends EventEmitter<{ event: [QmpEvent]; close: []; greeting: [] }> {
  /** QEMU's version (`major.minor.micro`) from its greeting; recorded in snapshot manifests. */
  version: string | undefined;
  private readonly socket: net.Socket;
  private readonly pending = new Map<number, Pending>();
  private nextId = 1;
  private buffer = '';
  private closed = false;

  private constructor(socket: net.Socket) {
    super();
    this.socket = socket;
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => this.onData(chunk));
    socket.on('close', () => this.onClose());
    socket.on('error', () => this.onClose());
  }

  /** Connects (retrying while QEMU creates the socket) and negotiates capabilities. */
  static async connect(path: string, options: { timeoutMs?: number; signal?: AbortSignal } = {}): Promise<QmpClient> {
    const socket = await connectUnix(path, options.timeoutMs ?? 5000, options.signal);
    const client = new QmpClient(socket);
    try {
      await client.greeting(options.timeoutMs ?? 5000);
      await client.execute('qmp_capabilities', {});
    } catch (error) {
      client.close();
      throw error;
    }
    return client;
  }

  get isClosed(): boolean {
    return this.closed;
  }

  execute<C extends CommandName>(
    command: C,
    args: QmpCommands[C]['args'],
    timeoutMs = 10_000,
  ): Promise<QmpCommands[C]['ret']> {
    if (this.closed) return Promise.reject(qmpGone(command));
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new CocoonError('qmp_timeout', `QEMU did not answer ${command} within ${timeoutMs} ms`));
      }, timeoutMs);
      this.pending.set(id, { command, resolve: resolve as (v: unknown) => void, reject, timer });
      const message = Object.keys(args).length ? { execute: command, arguments: args, id } : { execute: command, id };
      this.socket.write(JSON.stringify(message) + '\n');
    });
  }

  /** Resolves with the first event named `name` that satisfies `match`, or rejects at the timeout. */
  waitForEvent(name: string, timeoutMs: number, match: (event: QmpEvent) => boolean = () => true): Promise<QmpEvent> {
    return new Promise((resolve, reject) => {
      const onEvent = (event: QmpEvent) => {
        if (event.event !== name || !match(event)) return;
        cleanup();
        resolve(event);
      };
      const onClose = () => {
        cleanup();
        reject(qmpGone(`waiting for ${name}`));
      };
      const timer = setTimeout(() => {
        cleanup();
        reject(new CocoonError('qmp_timeout', `QEMU sent no ${name} event within ${timeoutMs} ms`));
      }, timeoutMs);
      const cleanup = () => {
        clearTimeout(timer);
        this.off('event', onEvent);
        this.off('close', onClose);
      };
      this.on('event', onEvent);
      this.on('close', onClose);
    });
  }

  close(): void {
    this.socket.destroy();
    this.onClose();
  }

  private greeting(timeoutMs: number): Promise<void> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new CocoonError('qmp_timeout', 'QEMU sent no QMP greeting')), timeoutMs);
      this.once('greeting', () => {
        clearTimeout(timer);
        resolve();
      });
      this.once('close', () => {
        clearTimeout(timer);
        reject(qmpGone('greeting'));
      });
    });
  }

  private onData(chunk: string): void {
    this.buffer += chunk;
    if (this.buffer.length > MAX_LINE_BYTES && !this.buffer.includes('\n')) {
      this.close();
      return;
    }
    let newline: number;
    while ((newline = this.buffer.indexOf('\n')) >= 0) {
      const line = this.buffer.slice(0, newline).trim();
      this.buffer = this.buffer.slice(newline + 1);
      if (line) this.onMessage(line);
    }
  }

  private onMessage(line: string): void {
    let message: Record<string, unknown>;
    try {
      message = JSON.parse(line) as Record<string, unknown>;
    } catch {
      return; // QEMU only sends JSON; ignore anything else rather than crash
    }
    if ('QMP' in message) {
      const qemu = (message.QMP as { version?: { qemu?: { major?: unknown; minor?: unknown; micro?: unknown } } } | undefined)?.version?.qemu;
      if (qemu && [qemu.major, qemu.minor, qemu.micro].every((n) => Number.isInteger(n))) this.version = `${qemu.major}.${qemu.minor}.${qemu.micro}`;
      this.emit('greeting');
    } else if ('event' in message) {
      this.emit('event', message as unknown as QmpEvent);
    } else if (typeof message.id === 'number') {
      const pending = this.pending.get(message.id);
      if (!pending) return;
      this.pending.delete(message.id);
      clearTimeout(pending.timer);
      const error = message.error as { class?: string; desc?: string } | undefined;
      if (error) pending.reject(new QmpError(pending.command, error.class ?? 'GenericError', error.desc ?? 'unknown error'));
      else pending.resolve(message.return ?? {});
    }
  }

  private onClose(): void {
    if (this.closed) return;
    this.closed = true;
    for (const [id, pending] of this.pending) {
      clearTimeout(pending.timer);
      pending.reject(qmpGone(pending.command));
      this.pending.delete(id);
    }
    this.emit('close');
  }
}

function qmpGone(what: string): CocoonError {
  return new CocoonError('vm_gone', `QEMU went away during ${what}`);
}
