/**
 * Commands in a microVM: `run` (wait for the result, output through callbacks as it comes),
 * `start` (a background process and a handle to wait on, kill, or feed), `session` (an
 * interactive process over a WebSocket: stdin, a PTY), and the running processes' list.
 *
 *   const { exitCode, stdout } = await cocoon.exec.run(vm.id, ['ls', '-l', '/'])
 *   await cocoon.exec.run(vm.id, 'make test', { onStdout: (text) => console.log(text), timeoutSeconds: 600 })
 *   const server = await cocoon.exec.start(vm.id, ['python3', '-m', 'http.server'])
 *   await server.kill()
 */
import { CocoonError, InvalidArgumentError } from './errors.ts';
import {
  checkSignal,
  execBody,
  parseExecEvent,
  processFields,
  type CommandLine,
  type ExitStatus,
  type ProcessSpec,
} from './exec-protocol.ts';
import { lines, segment, type CallOptions, type Transport } from './http.ts';
import { gatewayTarget } from './microvms.ts';
import type { MicroVM } from './types.ts';
import { ExecSession, webSocketUrl, type SessionOptions, type WebSocketFactory } from './session.ts';

export interface OutputCallbacks {
  /** Each chunk of stdout as it arrives: decoded as UTF-8 (across chunks), and the raw bytes. */
  onStdout?: (text: string, bytes: Uint8Array) => void | Promise<void>;
  onStderr?: (text: string, bytes: Uint8Array) => void | Promise<void>;
}

export interface RunOptions extends ProcessSpec, OutputCallbacks {
  /** Input for the process (≤ 1 MiB; then its stdin is closed). Use `session` to stream more. */
  stdin?: string | Uint8Array;
  /**
   * How much of each stream the result keeps as text (default 16 MiB; 0: none, when the
   * callbacks take the output). The callbacks always see all of it.
   */
  maxOutputBytes?: number;
  /** Called with the process's pid once the guest started it. */
  onStart?: (pid: number) => void;
  /** Cancels the call; the process is killed. */
  signal?: AbortSignal;
  /** How long to wait for the server to answer the request (not how long the process may run: see `timeoutSeconds`). */
  timeoutMs?: number;
}

export interface ExecResult extends ExitStatus {
  pid: number | undefined;
  /** The output as text (up to `maxOutputBytes` each; `truncated` says when more was left out). */
  stdout: string;
  stderr: string;
  truncated: boolean;
}

export interface ProcessInfo {
  pid: number;
  command: string[];
  tty: boolean;
  startedAt: string;
}

const DEFAULT_MAX_OUTPUT = 16 * 1024 * 1024;
/** The longest ndjson line a server may send (base64 of an output chunk is far shorter). */
const MAX_EVENT_LINE = 8 * 1024 * 1024;

/** Collects what the result keeps of one stream, and feeds the callback. */
class StreamSink {
  readonly #decoder = new TextDecoder();
  readonly #limit: number;
  readonly #callback: OutputCallbacks['onStdout'];
  readonly #chunks: Uint8Array[] = [];
  #kept = 0;
  truncated = false;

  constructor(limit: number, callback: OutputCallbacks['onStdout']) {
    this.#limit = limit;
    this.#callback = callback;
  }

  async push(bytes: Uint8Array): Promise<void> {
    if (this.#kept < this.#limit) {
      const take = Math.min(bytes.length, this.#limit - this.#kept);
      this.#chunks.push(bytes.slice(0, take));
      this.#kept += take;
      if (take < bytes.length) this.truncated = true;
    } else if (bytes.length > 0) {
      this.truncated = true;
    }
    if (this.#callback) await this.#callback(this.#decoder.decode(bytes, { stream: true }), bytes);
  }

  async end(): Promise<void> {
    const rest = this.#decoder.decode();
    if (rest && this.#callback) await this.#callback(rest, new Uint8Array());
  }

  text(): string {
    const all = new Uint8Array(this.#kept);
    let at = 0;
    for (const chunk of this.#chunks) {
      all.set(chunk, at);
      at += chunk.length;
    }
    return new TextDecoder().decode(all);
  }
}

/**
 * Reads an exec event stream to its end: output to the sinks, `start` to `onStart`; resolves
 * with the exit, rejects on an `error` event or a stream that ends without an exit.
 */
async function consume(
  body: ReadableStream<Uint8Array>,
  label: string,
  sinks: { stdout: StreamSink; stderr: StreamSink },
  onStart: (pid: number) => void,
  signal?: AbortSignal,
): Promise<ExitStatus> {
  for await (const line of lines(body, signal, MAX_EVENT_LINE)) {
    if (line.trim() === '') continue;
    const event = parseExecEvent(line, label);
    if (!event) continue;
    if (event.type === 'start') onStart(event.pid);
    else if (event.type === 'stdout' || event.type === 'stderr') await sinks[event.type].push(event.data);
    else if (event.type === 'error') throw event.error;
    else {
      await sinks.stdout.end();
      await sinks.stderr.end();
      const { type: _type, ...exit } = event;
      return exit;
    }
  }
  throw new CocoonError(`${label}: the stream ended before the process did (the connection broke, or the server stopped)`);
}

export interface ExecDeps {
  http: Transport;
  webSocket: WebSocketFactory;
}

export class Exec {
  readonly #http: Transport;
  readonly #webSocket: WebSocketFactory;

  constructor(deps: ExecDeps) {
    this.#http = deps.http;
    this.#webSocket = deps.webSocket;
  }

  /**
   * Runs a command and waits for it to end: `{exitCode, signal, timedOut, stdout, stderr}`.
   * A non-zero exit is a result, not an error; errors are for what kept it from running
   * (no such microVM, no such program → exit 127 from the guest, no shell for a string).
   */
  async run(microvmId: string, command: CommandLine, options: RunOptions = {}): Promise<ExecResult> {
    const label = `exec in ${microvmId}`;
    const body = execBody(command, options);
    const limit = options.maxOutputBytes ?? DEFAULT_MAX_OUTPUT;
    if (!Number.isInteger(limit) || limit < 0) throw new InvalidArgumentError('maxOutputBytes is a whole number ≥ 0');
    const response = await this.#http.send({
      method: 'POST',
      path: `/microvms/${segment(microvmId)}/exec`,
      json: body,
      headers: { accept: 'application/x-ndjson' },
      stream: true,
      signal: options.signal,
      timeoutMs: options.timeoutMs,
    });
    const sinks = { stdout: new StreamSink(limit, options.onStdout), stderr: new StreamSink(limit, options.onStderr) };
    let pid: number | undefined;
    const onAbort = () => {
      // The caller gave up: do not leave the process running.
      if (pid !== undefined) void this.signal(microvmId, pid, 'SIGKILL').catch(() => undefined);
    };
    options.signal?.addEventListener('abort', onAbort, { once: true });
    try {
      const exit = await consume(response.body ?? new ReadableStream(), label, sinks, (p) => {
        pid = p;
        options.onStart?.(p);
      }, options.signal);
      return { ...exit, pid, stdout: sinks.stdout.text(), stderr: sinks.stderr.text(), truncated: sinks.stdout.truncated || sinks.stderr.truncated };
    } finally {
      options.signal?.removeEventListener('abort', onAbort);
    }
  }

  /**
   * Starts a command in the background and answers at once with a handle (its pid; `wait`,
   * `kill`, `sendStdin`). The process keeps running across suspend and resume.
   */
  async start(microvmId: string, command: CommandLine, options: ProcessSpec & OutputCallbacks & CallOptions & { stdin?: string | Uint8Array } = {}): Promise<ProcessHandle> {
    const { onStdout, onStderr, signal, timeoutMs, ...spec } = options;
    const answer = await this.#http.json<{ pid: number }>({
      method: 'POST',
      path: `/microvms/${segment(microvmId)}/exec`,
      json: execBody(command, { ...spec, background: true }),
      signal,
      timeoutMs,
    });
    if (!Number.isInteger(answer?.pid)) throw new CocoonError('the server did not say which pid it started');
    const handle = new ProcessHandle(this, microvmId, answer.pid);
    // Attach at once when the caller wants the output as it comes, and answer once following.
    if (onStdout || onStderr) {
      void handle.attach({ onStdout, onStderr });
      await handle.attached.catch(() => undefined);
    }
    return handle;
  }

  /** A handle on a process started earlier (by `start`, or listed by `list`). */
  connect(microvmId: string, pid: number, callbacks: OutputCallbacks = {}): ProcessHandle {
    if (!Number.isInteger(pid) || pid <= 0) throw new InvalidArgumentError('pid is a whole number > 0');
    const handle = new ProcessHandle(this, microvmId, pid);
    if (callbacks.onStdout || callbacks.onStderr) handle.attach(callbacks);
    return handle;
  }

  /** The microVM's running processes started through exec. */
  async list(microvmId: string, options: CallOptions = {}): Promise<ProcessInfo[]> {
    const page = await this.#http.json<{ items: ProcessInfo[] }>({ method: 'GET', path: `/microvms/${segment(microvmId)}/processes`, ...options });
    return page.items;
  }

  /** Sends a signal to a process (default SIGTERM). */
  async signal(microvmId: string, pid: number, signal = 'SIGTERM', options: CallOptions = {}): Promise<void> {
    await this.#http.send({ method: 'POST', path: `/microvms/${segment(microvmId)}/processes/${pid}/signal`, json: { signal: checkSignal(signal) }, ...options });
  }

  /** Writes to a process's stdin; `eof: true` closes it afterwards. */
  async writeStdin(microvmId: string, pid: number, data: string | Uint8Array, options: CallOptions & { eof?: boolean } = {}): Promise<void> {
    const bytes = typeof data === 'string' ? new TextEncoder().encode(data) : data;
    await this.#http.send({
      method: 'POST',
      path: `/microvms/${segment(microvmId)}/processes/${pid}/stdin`,
      query: options.eof ? { eof: 1 } : undefined,
      body: new Blob([bytes as Uint8Array<ArrayBuffer>]),
      headers: { 'content-type': 'application/octet-stream' },
      signal: options.signal,
      timeoutMs: options.timeoutMs,
    });
  }

  /** Resizes a PTY process. */
  async resize(microvmId: string, pid: number, cols: number, rows: number, options: CallOptions = {}): Promise<void> {
    await this.#http.send({ method: 'POST', path: `/microvms/${segment(microvmId)}/processes/${pid}/resize`, json: { cols, rows }, ...options });
  }

  /**
   * Streams a process's output from now on until it ends (used by `ProcessHandle.wait`);
   * `onAttached` is called once the server follows it.
   */
  async output(microvmId: string, pid: number, callbacks: OutputCallbacks & { signal?: AbortSignal; maxOutputBytes?: number; onAttached?: () => void } = {}): Promise<ExecResult> {
    const label = `output of process ${pid} in ${microvmId}`;
    const response = await this.#http.send({
      method: 'GET',
      path: `/microvms/${segment(microvmId)}/processes/${pid}/output`,
      headers: { accept: 'application/x-ndjson' },
      stream: true,
      signal: callbacks.signal,
    });
    callbacks.onAttached?.();
    const limit = callbacks.maxOutputBytes ?? DEFAULT_MAX_OUTPUT;
    const sinks = { stdout: new StreamSink(limit, callbacks.onStdout), stderr: new StreamSink(limit, callbacks.onStderr) };
    const exit = await consume(response.body ?? new ReadableStream(), label, sinks, () => undefined, callbacks.signal);
    return { ...exit, pid, stdout: sinks.stdout.text(), stderr: sinks.stderr.text(), truncated: sinks.stdout.truncated || sinks.stderr.truncated };
  }

  /**
   * An interactive process over a WebSocket: stdin as you write it, output through the
   * callbacks, a PTY with `tty: true` (resize it as the terminal changes). Resolves once the
   * guest started it.
   *
   *   const sh = await cocoon.exec.session(vm.id, { command: ['cat'], onStdout: (t) => console.log(t) })
   *   await sh.write('hello\n'); sh.closeStdin(); await sh.wait()
   */
  async session(microvmId: string, options: SessionOptions = {}): Promise<ExecSession> {
    processFields(options);
    const session = new ExecSession({
      url: webSocketUrl(`${this.#http.apiUrl}/api/v1/microvms/${segment(microvmId)}/exec/ws`),
      apiKey: this.#http.options.apiKey,
      headers: this.#http.options.headers,
      factory: this.#webSocket,
      label: `${options.tty ? 'terminal' : 'session'} in ${microvmId}`,
    }, options);
    try {
      await session.ready;
    } catch (error) {
      // An exit before `started` (the guest could not start it) is a result, not an error.
      if (session.done) {
        const exit = await session.wait().catch(() => undefined);
        if (exit) return session;
      }
      throw error;
    }
    return session;
  }
}

/** A process running in the background: wait for it, signal it, write to its stdin. */
export class ProcessHandle {
  readonly microvmId: string;
  readonly pid: number;
  readonly #exec: Exec;
  #following: Promise<ExecResult> | undefined;
  #attached: Promise<void> | undefined;

  constructor(exec: Exec, microvmId: string, pid: number) {
    this.#exec = exec;
    this.microvmId = microvmId;
    this.pid = pid;
  }

  /**
   * Follows the output from now on (once; `wait` reuses it). Resolves when the process ends;
   * `attached` resolves as soon as the output is followed (what it prints from then on is seen).
   */
  attach(callbacks: OutputCallbacks = {}): Promise<ExecResult> {
    if (!this.#following) {
      let onAttached!: () => void;
      this.#attached = new Promise<void>((resolve) => (onAttached = resolve));
      this.#following = this.#exec.output(this.microvmId, this.pid, { ...callbacks, onAttached });
      // A failure to attach settles `attached` too (the error is `wait()`'s).
      this.#following.then(onAttached, onAttached);
    }
    return this.#following;
  }

  /** Resolves once the output is followed (after `attach` or `wait`). */
  get attached(): Promise<void> {
    if (!this.#attached) void this.attach().catch(() => undefined);
    return this.#attached!;
  }

  /** Waits until the process ends: its exit and the output seen since attaching. */
  wait(): Promise<ExecResult> {
    return this.attach();
  }

  /** Sends SIGKILL (or another signal). */
  kill(signal = 'SIGKILL'): Promise<void> {
    return this.#exec.signal(this.microvmId, this.pid, signal);
  }

  signal(signal: string): Promise<void> {
    return this.#exec.signal(this.microvmId, this.pid, signal);
  }

  sendStdin(data: string | Uint8Array): Promise<void> {
    return this.#exec.writeStdin(this.microvmId, this.pid, data);
  }

  closeStdin(): Promise<void> {
    return this.#exec.writeStdin(this.microvmId, this.pid, new Uint8Array(), { eof: true });
  }
}

/** Where the gateway serves shells to holders of a `shell` token. */
export const GATEWAY_SHELL_PATH = '/.cocoon/shell';
/** Browsers cannot set headers on a WebSocket: the token rides in a subprotocol. */
export const TOKEN_SUBPROTOCOL_PREFIX = 'cocoon.token.';

/** PTYs (an interactive terminal in the microVM), E2B-style. */
export class Pty {
  readonly #exec: Exec;
  readonly #webSocket: WebSocketFactory;
  readonly #gatewayUrl: string | undefined;

  constructor(exec: Exec, webSocket: WebSocketFactory, gatewayUrl?: string) {
    this.#exec = exec;
    this.#webSocket = webSocket;
    this.#gatewayUrl = gatewayUrl;
  }

  /**
   * A terminal through the gateway with a token of scope `shell`
   * (`cocoon.tokens.create(id, { scope: 'shell' })`), no API key needed: for a browser or a
   * program that was handed only a token. `microvm` is the microVM as the API describes it (its
   * `url` says where the gateway is). A socket factory that sends headers (Node) reaches
   * `*.localhost` gateways on 127.0.0.1 with `X-Cocoon-MicroVM`; the platform WebSocket
   * (browsers) goes to the microVM's own URL with the token as a subprotocol.
   */
  async openWithToken(microvm: MicroVM, token: string, options: Omit<SessionOptions, 'tty' | 'onStdout' | 'onStderr'> & { onData?: SessionOptions['onStdout'] } = {}): Promise<ExecSession> {
    if (typeof token !== 'string' || !/^[\x21-\x7e]+$/.test(token)) throw new InvalidArgumentError('a shell token is required');
    const { onData, ...rest } = options;
    const headers: Record<string, string> = {};
    let url: string;
    let protocols: string[] | undefined;
    if (this.#webSocket.sendsHeaders) {
      const target = gatewayTarget(microvm, GATEWAY_SHELL_PATH, this.#gatewayUrl);
      url = target.url;
      headers['x-cocoon-token'] = token;
      if (target.microvmHeader) headers['x-cocoon-microvm'] = microvm.id;
    } else {
      url = `${new URL(microvm.url).origin}${GATEWAY_SHELL_PATH}`;
      protocols = [`${TOKEN_SUBPROTOCOL_PREFIX}${token}`];
    }
    const session = new ExecSession({ url: webSocketUrl(url), headers, protocols, factory: this.#webSocket, label: `shell in ${microvm.id}` },
      { cols: 80, rows: 24, ...rest, tty: true, onStdout: onData });
    await session.ready;
    return session;
  }

  /**
   * Opens a terminal (the user's login shell unless `command` says otherwise) of `cols` × `rows`;
   * `onData` gets what it prints. Write keystrokes with `write`, follow the window with `resize`.
   */
  open(microvmId: string, options: Omit<SessionOptions, 'tty' | 'onStdout' | 'onStderr'> & { onData?: SessionOptions['onStdout'] } = {}): Promise<ExecSession> {
    const { onData, ...rest } = options;
    return this.#exec.session(microvmId, { cols: 80, rows: 24, ...rest, tty: true, onStdout: onData });
  }
}


