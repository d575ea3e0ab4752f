/**
 * An interactive process over the exec WebSocket (`GET /microvms/{id}/exec/ws`): stdin as
 * binary frames, output as binary frames tagged with their stream, resize / signal / eof as
 * JSON, and an exit event at the end. Used for `-i` and `-t` in the CLI, PTYs in the SDK and
 * the dashboard's terminal.
 *
 * The socket is the platform's `WebSocket` (browsers, Node 24) unless the client was given a
 * factory (the CLI passes one built on `ws`, which can send an Authorization header). Without
 * a header, the API key travels in the first message, as the API allows for browsers.
 */
import { CocoonConnectionError, CocoonError } from './errors.ts';
import {
  decodeOutputFrame,
  EOF_MESSAGE,
  resizeMessage,
  signalMessage,
  startMessage,
  streamError,
  type ExitStatus,
  type SessionSpec,
} from './exec-protocol.ts';

/** The subset of the WHATWG WebSocket that sessions use (`ws` and browsers both have it). */
export interface WebSocketLike {
  binaryType: string;
  readonly readyState: number;
  readonly bufferedAmount: number;
  onopen: ((event: unknown) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onerror: ((event: unknown) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  send(data: string | Uint8Array | ArrayBuffer): void;
  close(code?: number, reason?: string): void;
  /**
   * Set by a factory whose socket learnt why the handshake failed (an HTTP error answer);
   * the session reports it instead of a bare "connection closed".
   */
  failure?: Error;
}

export interface WebSocketInit {
  /** Headers for the handshake; factories that cannot send headers leave them out. */
  headers: Record<string, string>;
  protocols?: string[];
}

/**
 * Makes sockets. `sendsHeaders: true` says the factory sends `init.headers` (then the API key
 * goes in the Authorization header rather than in the first message).
 */
export interface WebSocketFactory {
  (url: string, init: WebSocketInit): WebSocketLike;
  sendsHeaders?: boolean;
}

/** The platform's WebSocket (browsers, Node 22+); it sends no custom headers. */
export const platformWebSocket: WebSocketFactory = (url, init) => {
  const Ctor = (globalThis as { WebSocket?: new (url: string, protocols?: string[]) => WebSocketLike }).WebSocket;
  if (!Ctor) throw new CocoonError('this platform has no WebSocket: pass { webSocket } to new Cocoon()');
  return new Ctor(url, init.protocols);
};

const OPEN = 1;

export interface SessionCallbacks {
  /** Output: a PTY's (stdout and stderr as one), or stdout's. `text` is decoded as UTF-8 across chunks. */
  onStdout?: (text: string, bytes: Uint8Array) => void;
  onStderr?: (text: string, bytes: Uint8Array) => void;
  /** Called once with how it ended. */
  onExit?: (exit: ExitStatus) => void;
}

export interface SessionOptions extends SessionSpec, SessionCallbacks {
  signal?: AbortSignal;
}

export interface SessionTarget {
  url: string;
  apiKey?: string;
  /** Extra handshake headers (e.g. X-Cocoon-Token / X-Cocoon-MicroVM for the gateway's shell). */
  headers?: Record<string, string>;
  protocols?: string[];
  factory: WebSocketFactory;
  /** For messages. */
  label: string;
}

/** Back-pressure: `write` resolves once the socket has sent what it buffered beyond this. */
const HIGH_WATER = 256 * 1024;

/**
 * A running interactive process. `ready` resolves with its pid once the guest started it;
 * `wait()` resolves with how it ended (or rejects if the session broke first).
 */
export class ExecSession {
  readonly label: string;
  pid: number | undefined;
  readonly ready: Promise<number>;
  readonly #exited: Promise<ExitStatus>;
  readonly #socket: WebSocketLike;
  readonly #decoders = { stdout: new TextDecoder(), stderr: new TextDecoder() };
  readonly #callbacks: SessionCallbacks;
  #exit: ExitStatus | undefined;
  #failure: Error | undefined;
  #pending: Array<string | Uint8Array> = [];
  #drains: Array<() => void> = [];
  #drainTimer: ReturnType<typeof setInterval> | undefined;
  #resolveReady!: (pid: number) => void;
  #rejectReady!: (error: Error) => void;
  #resolveExit!: (exit: ExitStatus) => void;
  #rejectExit!: (error: Error) => void;

  constructor(target: SessionTarget, options: SessionOptions) {
    this.label = target.label;
    this.#callbacks = options;
    const first = startMessage(options, target.factory.sendsHeaders ? undefined : target.apiKey);
    this.ready = new Promise<number>((resolve, reject) => {
      this.#resolveReady = resolve;
      this.#rejectReady = reject;
    });
    this.#exited = new Promise<ExitStatus>((resolve, reject) => {
      this.#resolveExit = resolve;
      this.#rejectExit = reject;
    });
    // Nobody may be listening to one of them; the other carries the error.
    this.ready.catch(() => undefined);
    this.#exited.catch(() => undefined);

    const headers: Record<string, string> = { ...target.headers };
    if (target.factory.sendsHeaders && target.apiKey) headers.authorization = `Bearer ${target.apiKey}`;
    const socket = target.factory(target.url, { headers, protocols: target.protocols });
    this.#socket = socket;
    socket.binaryType = 'arraybuffer';
    this.#pending.push(first);
    socket.onopen = () => this.#flush();
    socket.onmessage = (event) => this.#onMessage(event.data);
    socket.onerror = (event) => {
      const error = (event as { error?: unknown }).error;
      this.#fail(socket.failure ?? (error instanceof CocoonError ? error : undefined) ?? new CocoonConnectionError(target.url, error ?? (event as { message?: unknown }).message ?? 'WebSocket error'));
    };
    socket.onclose = (event) => {
      this.#stopDrainTimer();
      if (this.#exit) return;
      this.#fail(socket.failure ?? new CocoonError(
        `${this.label}: the connection closed before the process ended (WebSocket close ${event.code}${event.reason ? `: ${event.reason}` : ''})`,
      ));
    };
    if (options.signal) {
      const onAbort = () => {
        this.#fail(options.signal?.reason instanceof Error ? options.signal.reason : new CocoonError(`${this.label}: aborted`));
        this.close();
      };
      if (options.signal.aborted) onAbort();
      else options.signal.addEventListener('abort', onAbort, { once: true });
      this.#exited.finally(() => options.signal?.removeEventListener('abort', onAbort)).catch(() => undefined);
    }
  }

  /** Resolves with how the process ended. */
  wait(): Promise<ExitStatus> {
    return this.#exited;
  }

  /** Whether the process has ended (or the session broke). */
  get done(): boolean {
    return this.#exit !== undefined || this.#failure !== undefined;
  }

  /** Bytes the socket still has to send. */
  get bufferedAmount(): number {
    return this.#socket.bufferedAmount + this.#pending.reduce((n, item) => n + (typeof item === 'string' ? item.length : item.length), 0);
  }

  /** Sends input (stdin, or keystrokes to a PTY). Resolves when the socket can take more. */
  write(data: string | Uint8Array): Promise<void> {
    const bytes = typeof data === 'string' ? new TextEncoder().encode(data) : data;
    if (bytes.length === 0) return Promise.resolve();
    this.#send(bytes);
    return this.#drained();
  }

  /** A PTY's new size (the guest's programs get SIGWINCH). */
  resize(cols: number, rows: number): void {
    this.#send(resizeMessage(cols, rows));
  }

  /** Sends a signal to the process (`SIGINT`, `SIGTERM`, `SIGKILL`…). */
  signal(signal: string): void {
    this.#send(signalMessage(signal));
  }

  kill(): void {
    this.signal('SIGKILL');
  }

  /** Closes the process's stdin (it reads end of file). */
  closeStdin(): void {
    this.#send(EOF_MESSAGE);
  }

  /** Closes the connection (the server ends the process if it still runs). */
  close(): void {
    this.#stopDrainTimer();
    try {
      this.#socket.close(1000);
    } catch {
      // closing twice, or a socket that never opened
    }
    if (!this.#exit) this.#fail(new CocoonError(`${this.label}: closed by the client`));
  }

  #send(item: string | Uint8Array): void {
    if (this.done) throw new CocoonError(`${this.label}: the process has ended`);
    if (this.#socket.readyState === OPEN && this.#pending.length === 0) this.#socket.send(item);
    else this.#pending.push(item);
  }

  #flush(): void {
    for (const item of this.#pending) this.#socket.send(item);
    this.#pending = [];
  }

  #drained(): Promise<void> {
    if (this.bufferedAmount <= HIGH_WATER || this.done) return Promise.resolve();
    return new Promise((resolve) => {
      this.#drains.push(resolve);
      // WebSockets have no 'drain' event: poll the buffer while someone waits.
      this.#drainTimer ??= setInterval(() => this.#checkDrains(), 10);
    });
  }

  #checkDrains(): void {
    if (this.bufferedAmount > HIGH_WATER && !this.done) return;
    const waiting = this.#drains;
    this.#drains = [];
    this.#stopDrainTimer();
    for (const resolve of waiting) resolve();
  }

  #stopDrainTimer(): void {
    if (this.#drainTimer) clearInterval(this.#drainTimer);
    this.#drainTimer = undefined;
    if (this.done) {
      const waiting = this.#drains;
      this.#drains = [];
      for (const resolve of waiting) resolve();
    }
  }

  #onMessage(data: unknown): void {
    if (this.done) return;
    try {
      if (typeof data === 'string') {
        this.#onText(data);
        return;
      }
      const bytes = data instanceof ArrayBuffer ? new Uint8Array(data)
        : ArrayBuffer.isView(data) ? new Uint8Array(data.buffer, data.byteOffset, data.byteLength)
          : undefined;
      if (!bytes) return;
      const frame = decodeOutputFrame(bytes);
      if (!frame) return;
      const callback = frame.stream === 'stdout' ? this.#callbacks.onStdout : this.#callbacks.onStderr;
      if (callback) callback(this.#decoders[frame.stream].decode(frame.data, { stream: true }), frame.data);
    } catch (error) {
      this.#fail(error instanceof Error ? error : new CocoonError(String(error)));
      this.close();
    }
  }

  #onText(text: string): void {
    let message: Record<string, unknown>;
    try {
      message = JSON.parse(text) as Record<string, unknown>;
    } catch (error) {
      throw new CocoonError(`${this.label}: the server sent a message that is not JSON`, { cause: error });
    }
    if (!message || typeof message !== 'object') return;
    if (message.type === 'started') {
      const pid = message.pid;
      if (!Number.isInteger(pid) || (pid as number) <= 0) throw new CocoonError(`${this.label}: the server sent a bad pid`);
      this.pid = pid as number;
      this.#resolveReady(this.pid);
    } else if (message.type === 'exit') {
      const exitCode = message.exitCode;
      const exit: ExitStatus = {
        exitCode: Number.isInteger(exitCode) ? (exitCode as number) : null,
        signal: typeof message.signal === 'string' ? message.signal : null,
        timedOut: message.timedOut === true,
      };
      if (typeof message.reason === 'string') exit.reason = message.reason;
      // Flush what a decoder still holds (a split character at the very end).
      for (const stream of ['stdout', 'stderr'] as const) {
        const rest = this.#decoders[stream].decode();
        const callback = stream === 'stdout' ? this.#callbacks.onStdout : this.#callbacks.onStderr;
        if (rest && callback) callback(rest, new Uint8Array());
      }
      this.#exit = exit;
      this.#rejectReady(new CocoonError(`${this.label}: the process ended before it started`));
      this.#callbacks.onExit?.(exit);
      this.#resolveExit(exit);
      this.#stopDrainTimer();
    } else if (message.type === 'error') {
      this.#fail(streamError(message.error, this.label));
      try {
        this.#socket.close(1000);
      } catch {
        // already closing
      }
    }
  }

  #fail(error: Error): void {
    if (this.done) return;
    this.#failure = error;
    this.#rejectReady(error);
    this.#rejectExit(error);
    this.#stopDrainTimer();
  }
}

/** `http(s)://…` → `ws(s)://…`. */
export function webSocketUrl(httpUrl: string): string {
  return httpUrl.replace(/^http(s?):/, 'ws$1:');
}
