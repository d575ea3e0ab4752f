/**
 * The exec service (types.ts) on the lifecycle's runtime service and the guest agent: checks the tenant,
 * wakes the microVM as the gateway does, keeps one agent connection per running microVM,
 * counts sessions as activity and ends them when the microVM stops.
 */
import os from 'node:os';
import { Readable } from 'node:stream';
import { CocoonError } from '../common/errors.ts';
import { log } from '../common/log.ts';
import { AgentClient, type AgentStream, type OpenKind, guestError } from '../guest/agent/client.ts';
import { type Fields, FrameType, decodeFields, field, fieldsAll } from '../guest/agent/wire.ts';
import type { MicrovmRuntime } from '../lifecycle/service.ts';
import { findTenantMicrovm } from '../store/microvms.ts';
import type { Db } from '../store/sql.ts';
import type { DirWatch, ExecEvent, ExecRequest, ExecService, ExecSession, ExitReason, FileStat, ProcessInfo, WatchEvent } from './types.ts';
import { STREAM_WINDOW } from '../guest/agent/client.ts';

export interface ExecServiceOptions {
  db: Db;
  engine: () => MicrovmRuntime;
  /** Open sessions one microVM may have (default 32); more → 429 too_many_sessions. */
  maxSessionsPerMicrovm?: number;
  /** How long a call waits for a SUSPENDED microVM to wake (default 60 s). */
  wakeTimeoutMs?: number;
}

export const MAX_PATH_BYTES = 4096;
const SIGNALS = os.constants.signals as Record<string, number>;
const SIGNAL_NAMES = new Map(Object.entries(SIGNALS).map(([name, n]) => [n, name]));

/** Validates a guest path at the boundary: absolute, no NUL, at most 4096 bytes. */
export function checkGuestPath(path: string, what = 'path'): string {
  if (typeof path !== 'string' || !path.startsWith('/') || path.includes('\0') || Buffer.byteLength(path) > MAX_PATH_BYTES) {
    throw new CocoonError('invalid_path', `${what} must be an absolute guest path without NUL bytes, at most ${MAX_PATH_BYTES} bytes`, { status: 400 });
  }
  return path;
}

export function signalNumber(name: string): number {
  const n = SIGNALS[name.startsWith('SIG') ? name : `SIG${name}`];
  if (n === undefined || n < 1 || n > 64) throw new CocoonError('invalid_signal', `unknown signal ${name}; use a name such as SIGTERM, SIGINT or SIGKILL`, { status: 400 });
  return n;
}

const MODE = /^0?[0-7]{3,4}$/;
function checkMode(mode: string | undefined): string | undefined {
  if (mode === undefined) return undefined;
  if (!MODE.test(mode)) throw new CocoonError('invalid_mode', `mode ${mode} is not octal permission bits such as 0644`, { status: 400 });
  return mode;
}

function execFields(request: ExecRequest, background: boolean): Fields {
  const fields: Fields = [];
  if (typeof request.command === 'string') {
    if (request.command.length === 0) throw new CocoonError('invalid_request', 'command is empty', { status: 400 });
    fields.push(['shell', request.command]);
  } else {
    if (request.command.length === 0 || request.command.length > 256) throw new CocoonError('invalid_request', 'command needs 1 to 256 arguments', { status: 400 });
    for (const arg of request.command) fields.push(['arg', arg]);
  }
  for (const [name, value] of Object.entries(request.env ?? {})) {
    if (!/^[A-Za-z_][A-Za-z0-9_]{0,255}$/.test(name)) throw new CocoonError('invalid_env', `environment variable name ${JSON.stringify(name).slice(0, 80)} is not valid`, { status: 400 });
    fields.push(['env', `${name}=${value}`]);
  }
  if (request.cwd !== undefined) fields.push(['cwd', checkGuestPath(request.cwd, 'cwd')]);
  if (request.user !== undefined) {
    if (!/^[A-Za-z0-9_.][A-Za-z0-9_.-]{0,63}$/.test(request.user)) throw new CocoonError('invalid_user', 'user is a user name or a numeric uid', { status: 400 });
    fields.push(['user', request.user]);
  }
  if (request.tty) {
    fields.push(['tty', '1'], ['cols', String(request.cols ?? 80)], ['rows', String(request.rows ?? 24)]);
  }
  // A background process keeps its stdin open for POST /processes/{pid}/stdin (docs/exec.md, "Non-interactive exec").
  if (request.stdin || request.tty || background) fields.push(['stdin', '1']);
  if (request.timeoutSeconds !== undefined) fields.push(['timeout_ms', String(Math.round(request.timeoutSeconds * 1000))]);
  if (background) fields.push(['keep', '1']);
  for (const [, v] of fields) if (v.includes('\0')) throw new CocoonError('invalid_request', 'arguments, environment and paths cannot contain NUL bytes', { status: 400 });
  const bytes = fields.reduce((sum, [k, v]) => sum + Buffer.byteLength(k) + Buffer.byteLength(v) + 2, 0);
  if (bytes > 60 * 1024) throw new CocoonError('invalid_request', 'command and environment together are limited to 60 KiB', { status: 400 });
  return fields;
}

export function toStat(fields: Fields): FileStat {
  const type = field(fields, 'type');
  const mtime = Number(field(fields, 'mtime') ?? 0);
  const stat: FileStat = {
    path: field(fields, 'path') ?? '',
    name: field(fields, 'name') ?? '',
    type: type === 'file' || type === 'directory' || type === 'symlink' ? type : 'other',
    size: Number(field(fields, 'size') ?? 0),
    mode: field(fields, 'mode') ?? '0000',
    uid: Number(field(fields, 'uid') ?? 0),
    gid: Number(field(fields, 'gid') ?? 0),
    mtime: new Date(Number.isFinite(mtime) ? mtime * 1000 : 0).toISOString(),
  };
  const link = field(fields, 'link');
  if (link !== undefined) stat.linkTarget = link;
  return stat;
}

/** How long the guest agent may take to answer an open (STARTED, a stat…) before the call fails. */
const ANSWER_TIMEOUT_MS = 30_000;
/** Streams (sessions, transfers, requests) one microVM's agent connection may have open. */
const MAX_STREAMS_PER_MICROVM = 100;

/** The first frame of a stream, or a clear error when the guest ends it or does not answer in time. */
async function firstFrame(stream: AgentStream, what: string): Promise<{ type: number; fields: Fields; payload: Buffer }> {
  const timer = setTimeout(
    () => stream.fail(new CocoonError('agent_timeout', `the guest agent did not answer ${what} within ${ANSWER_TIMEOUT_MS / 1000} s`, { status: 504 })),
    ANSWER_TIMEOUT_MS,
  );
  try {
    const frame = await stream.next();
    if (frame === null) throw stream.error ?? new CocoonError('agent_gone', `the guest agent ended ${what}`, { status: 503 });
    const fields = decodeFields(frame.payload) ?? [];
    if (frame.type === FrameType.ERROR) throw guestError(fields);
    return { type: frame.type, fields, payload: frame.payload };
  } catch (error) {
    stream.close();
    throw error;
  } finally {
    clearTimeout(timer);
  }
}

interface Agent {
  socketPath: string;
  client: Promise<AgentClient>;
}

class Session implements ExecSession {
  readonly pid: number;
  readonly tty: boolean;
  readonly #stream: AgentStream;
  readonly #done: () => void;
  #reason: ExitReason | undefined;
  #finished = false;

  constructor(stream: AgentStream, pid: number, tty: boolean, done: () => void) {
    this.#stream = stream;
    this.pid = pid;
    this.tty = tty;
    this.#done = done;
  }

  /** The microVM stops: the session ends with this reason. */
  end(reason: ExitReason): void {
    this.#reason ??= reason;
    this.#stream.fail(undefined);
  }

  async *events(): AsyncIterable<ExecEvent> {
    try {
      for (;;) {
        const frame = await this.#stream.next();
        if (frame === null) {
          if (this.#reason !== undefined) {
            yield { type: 'exit', exitCode: null, signal: null, timedOut: false, reason: this.#reason };
          } else {
            const error = this.#stream.error ?? new CocoonError('agent_gone', 'the connection to the guest agent was lost', { status: 503 });
            yield { type: 'error', error: { code: error.code, message: error.message } };
          }
          return;
        }
        if (frame.type === FrameType.OUT) yield { type: 'stdout', data: frame.payload };
        else if (frame.type === FrameType.ERR) yield { type: 'stderr', data: frame.payload };
        else if (frame.type === FrameType.EXIT || frame.type === FrameType.ERROR) {
          const fields = decodeFields(frame.payload) ?? [];
          if (frame.type === FrameType.ERROR) {
            const error = guestError(fields);
            yield { type: 'error', error: { code: error.code, message: error.message } };
          } else {
            const code = field(fields, 'code');
            const signal = field(fields, 'signal');
            yield {
              type: 'exit',
              exitCode: code === undefined ? null : Number(code),
              signal: signal === undefined ? null : (SIGNAL_NAMES.get(Number(signal)) ?? `SIG${signal}`),
              timedOut: field(fields, 'timedout') === '1',
            };
          }
          return;
        }
      }
    } finally {
      this.close();
    }
  }

  write(data: Buffer): Promise<void> {
    return this.#stream.write(data);
  }

  closeStdin(): void {
    this.#stream.control(FrameType.EOF);
  }

  resize(cols: number, rows: number): void {
    this.#stream.control(FrameType.RESIZE, [['cols', String(cols)], ['rows', String(rows)]]);
  }

  kill(signal: string): void {
    this.#stream.control(FrameType.SIGNAL, [['signal', String(signalNumber(signal))]]);
  }

  close(): void {
    this.#stream.close();
    if (this.#finished) return;
    this.#finished = true;
    this.#done();
  }
}

export class AgentExecService implements ExecService {
  readonly #db: Db;
  readonly #engine: () => MicrovmRuntime;
  readonly #maxSessions: number;
  readonly #wakeTimeoutMs: number;
  readonly #agents = new Map<string, Agent>();
  /** Open sessions (exec sessions and directory watches) by microVM: a stop ends them. */
  readonly #sessions = new Map<string, Set<{ end(reason: ExitReason): void }>>();
  #unsubscribe: (() => void) | undefined;
  readonly #shutdown = new AbortController();

  constructor(options: ExecServiceOptions) {
    this.#db = options.db;
    this.#engine = options.engine;
    this.#maxSessions = options.maxSessionsPerMicrovm ?? 32;
    this.#wakeTimeoutMs = options.wakeTimeoutMs ?? 60_000;
  }

  #subscribe(): void {
    if (this.#unsubscribe) return;
    this.#unsubscribe = this.#engine().onVmStopping((microvmId, reason) => {
      for (const session of this.#sessions.get(microvmId) ?? []) session.end(reason);
      const agent = this.#agents.get(microvmId);
      this.#agents.delete(microvmId);
      void agent?.client.then((c) => c.close(), () => undefined);
    });
  }

  /** The tenant's microVM, woken, and a greeted agent connection to it. */
  async #agent(tenantId: string, microvmId: string): Promise<{ id: string; client: AgentClient }> {
    this.#subscribe();
    const microvm = await findTenantMicrovm(this.#db, tenantId, microvmId);
    if (!microvm) throw new CocoonError('microvm_not_found', `no microVM '${microvmId}'`, { status: 404 });
    const id = microvm.id;
    const engine = this.#engine();
    const wake = AbortSignal.any([this.#shutdown.signal, AbortSignal.timeout(this.#wakeTimeoutMs)]);
    for (let attempt = 0; ; attempt++) {
      await engine.ensureRunning(id, wake);
      const socketPath = engine.agentSocketPath(id);
      if (!socketPath) {
        if (attempt < 3) continue;
        throw new CocoonError('microvm_not_running', `microVM ${id} is not running`, { status: 409 });
      }
      let agent = this.#agents.get(id);
      if (!agent || agent.socketPath !== socketPath) {
        const client = AgentClient.connect(socketPath);
        agent = { socketPath, client };
        const entry = agent;
        this.#agents.set(id, entry);
        client.then(
          (c) => c.onClose(() => this.#agents.get(id) === entry && this.#agents.delete(id)),
          () => this.#agents.get(id) === entry && this.#agents.delete(id),
        );
      }
      try {
        const client = await agent.client;
        if (!client.closed) return { id, client };
      } catch (error) {
        // A guest that does not greet (or speaks another version) will not on a retry either.
        if (attempt >= 2 || !(error instanceof CocoonError) || error.code !== 'agent_gone') throw error;
      }
    }
  }

  /** Opens a stream within the per-microVM bound. */
  #open(client: AgentClient, kind: OpenKind, fields: Fields): AgentStream {
    if (client.openStreams >= MAX_STREAMS_PER_MICROVM) {
      throw new CocoonError('too_many_sessions', `this microVM has ${MAX_STREAMS_PER_MICROVM} sessions and transfers open already; retry once some end`, { status: 429 });
    }
    return client.open(kind, fields);
  }

  /** Marks work in flight on the microVM (idle suspend waits); returns its release, safe to call twice. */
  #busy(id: string): () => void {
    const engine = this.#engine();
    engine.requestStarted(id);
    let done = false;
    return () => {
      if (done) return;
      done = true;
      engine.requestFinished(id);
    };
  }

  #count(id: string): Set<{ end(reason: ExitReason): void }> {
    let set = this.#sessions.get(id);
    if (!set) this.#sessions.set(id, (set = new Set()));
    return set;
  }

  #admit(id: string): void {
    if ((this.#sessions.get(id)?.size ?? 0) >= this.#maxSessions) {
      throw new CocoonError('too_many_sessions', `microVM ${id} has ${this.#maxSessions} open sessions already; close one first`, { status: 429 });
    }
  }

  async #openSession(id: string, client: AgentClient, kind: typeof FrameType.EXEC | typeof FrameType.ATTACH, fields: Fields, tty: boolean): Promise<Session> {
    this.#admit(id);
    const stream = this.#open(client, kind, fields);
    const first = await firstFrame(stream, 'the start of the process');
    const decoded = first.fields;
    if (first.type !== FrameType.STARTED) {
      stream.close();
      throw new CocoonError('agent_protocol_error', 'the guest agent answered an exec with something else than STARTED', { status: 502 });
    }
    const pid = Number(field(decoded, 'pid'));
    const sessions = this.#count(id);
    const engine = this.#engine();
    const session: Session = new Session(stream, pid, kind === FrameType.ATTACH ? field(decoded, 'tty') === '1' : tty, () => {
      sessions.delete(session);
      if (sessions.size === 0) this.#sessions.delete(id);
      engine.webSocketClosed(id);
    });
    sessions.add(session);
    // An open session is activity: the idle timer waits for it, as for an open WebSocket.
    engine.webSocketOpened(id);
    return session;
  }

  async exec(tenantId: string, microvmId: string, request: ExecRequest): Promise<ExecSession> {
    const fields = execFields(request, request.background ?? false);
    const { id, client } = await this.#agent(tenantId, microvmId);
    return this.#openSession(id, client, FrameType.EXEC, fields, request.tty ?? false);
  }

  async start(tenantId: string, microvmId: string, request: ExecRequest): Promise<{ pid: number }> {
    const fields = execFields(request, true);
    const { client } = await this.#agent(tenantId, microvmId);
    const stream = this.#open(client, FrameType.EXEC, fields);
    try {
      const first = await firstFrame(stream, 'the start of the process');
      return { pid: Number(field(first.fields, 'pid')) };
    } finally {
      stream.close(); // a background process keeps running: only the stream goes
    }
  }

  async listProcesses(tenantId: string, microvmId: string): Promise<ProcessInfo[]> {
    const { client } = await this.#agent(tenantId, microvmId);
    const { items } = await client.request([['op', 'ps']]);
    return items.map((item) => ({
      pid: Number(field(item, 'pid')),
      command: fieldsAll(item, 'arg'),
      tty: field(item, 'tty') === '1',
      startedAt: new Date(Number(field(item, 'started') ?? 0)).toISOString(),
    }));
  }

  async attach(tenantId: string, microvmId: string, pid: number): Promise<ExecSession> {
    const { id, client } = await this.#agent(tenantId, microvmId);
    return this.#openSession(id, client, FrameType.ATTACH, [['pid', String(pid)]], false);
  }

  async writeStdin(tenantId: string, microvmId: string, pid: number, data: Readable | Buffer, options: { eof?: boolean } = {}): Promise<void> {
    const { client } = await this.#agent(tenantId, microvmId);
    const stream = this.#open(client, FrameType.ATTACH, [['pid', String(pid)], ['output', '0']]);
    try {
      await firstFrame(stream, 'the attach');
      for await (const chunk of Buffer.isBuffer(data) ? [data] : data) await stream.write(chunk as Buffer);
      if (options.eof) stream.control(FrameType.EOF);
      // Make sure the guest has the bytes before answering: a no-op request behind them.
      await client.request([['op', 'ping']]);
    } finally {
      stream.close();
    }
  }

  async signal(tenantId: string, microvmId: string, pid: number, signal: string): Promise<void> {
    const n = signalNumber(signal);
    const { client } = await this.#agent(tenantId, microvmId);
    await client.request([['op', 'signal'], ['pid', String(pid)], ['signal', String(n)]]);
  }

  async resize(tenantId: string, microvmId: string, pid: number, cols: number, rows: number): Promise<void> {
    const { client } = await this.#agent(tenantId, microvmId);
    await client.request([['op', 'resize'], ['pid', String(pid)], ['cols', String(cols)], ['rows', String(rows)]]);
  }

  async readFile(tenantId: string, microvmId: string, path: string): Promise<{ stat: FileStat; body: Readable }> {
    checkGuestPath(path);
    const { id, client } = await this.#agent(tenantId, microvmId);
    const stream = this.#open(client, FrameType.READ, [['path', path]]);
    const first = await firstFrame(stream, 'the download');
    const stat = toStat(first.fields);
    // A transfer is activity: the idle timer waits for it, as for a gateway request.
    const release = this.#busy(id);
    async function* chunks(): AsyncGenerator<Buffer> {
      try {
        for (;;) {
          const frame = await stream.next();
          if (frame === null) throw stream.error ?? new CocoonError('agent_gone', 'the guest agent ended the download', { status: 503 });
          if (frame.type === FrameType.OUT) yield frame.payload;
          else if (frame.type === FrameType.END) return;
          else if (frame.type === FrameType.ERROR) throw guestError(decodeFields(frame.payload) ?? []);
        }
      } finally {
        stream.close();
        release();
      }
    }
    return { stat, body: Readable.from(chunks(), { objectMode: false, highWaterMark: 64 * 1024 }) };
  }

  async writeFile(tenantId: string, microvmId: string, path: string, body: Readable | Buffer, options: { mode?: string } = {}): Promise<FileStat> {
    checkGuestPath(path);
    const mode = checkMode(options.mode);
    const { id, client } = await this.#agent(tenantId, microvmId);
    const stream = this.#open(client, FrameType.WRITE, [['path', path], ...(mode ? [['mode', mode] as [string, string]] : [])]);
    const release = this.#busy(id);
    try {
      try {
        for await (const chunk of Buffer.isBuffer(body) ? [body] : body) await stream.write(chunk as Buffer);
      } catch (error) {
        if (!stream.ended) throw error;
        // The guest ended the upload (disk full, no such directory…): its answer says why.
      }
      stream.control(FrameType.EOF);
      const timer = setTimeout(
        () => stream.fail(new CocoonError('agent_timeout', 'the guest agent did not confirm the upload in time', { status: 504 })),
        ANSWER_TIMEOUT_MS,
      );
      timer.unref();
      for (;;) {
        const frame = await stream.next();
        if (frame === null) throw stream.error ?? new CocoonError('agent_gone', 'the guest agent ended the upload', { status: 503 });
        const decoded = decodeFields(frame.payload) ?? [];
        if (frame.type === FrameType.ERROR) throw guestError(decoded);
        if (frame.type === FrameType.RESULT) return toStat(decoded);
      }
    } finally {
      stream.close();
      release();
    }
  }

  async #one(tenantId: string, microvmId: string, fields: Fields): Promise<FileStat> {
    const { client } = await this.#agent(tenantId, microvmId);
    const { result } = await client.request(fields);
    if (!result) throw new CocoonError('agent_protocol_error', 'the guest agent answered without a result', { status: 502 });
    return toStat(result);
  }

  stat(tenantId: string, microvmId: string, path: string): Promise<FileStat> {
    return this.#one(tenantId, microvmId, [['op', 'stat'], ['path', checkGuestPath(path)]]);
  }

  async list(tenantId: string, microvmId: string, path: string): Promise<FileStat[]> {
    checkGuestPath(path);
    const { client } = await this.#agent(tenantId, microvmId);
    const { items } = await client.request([['op', 'list'], ['path', path]]);
    return items.map(toStat).sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  }

  mkdir(tenantId: string, microvmId: string, path: string, options: { mode?: string; parents?: boolean } = {}): Promise<FileStat> {
    const mode = checkMode(options.mode);
    return this.#one(tenantId, microvmId, [['op', 'mkdir'], ['path', checkGuestPath(path)], ...(mode ? [['mode', mode] as [string, string]] : []), ['parents', options.parents ? '1' : '0']]);
  }

  async remove(tenantId: string, microvmId: string, path: string, options: { recursive?: boolean } = {}): Promise<void> {
    checkGuestPath(path);
    const { client } = await this.#agent(tenantId, microvmId);
    await client.request([['op', 'remove'], ['path', path], ['recursive', options.recursive ? '1' : '0']], 300_000);
  }

  rename(tenantId: string, microvmId: string, from: string, to: string): Promise<FileStat> {
    return this.#one(tenantId, microvmId, [['op', 'rename'], ['from', checkGuestPath(from, 'from')], ['to', checkGuestPath(to, 'to')]]);
  }

  chmod(tenantId: string, microvmId: string, path: string, options: { mode?: string; uid?: number; gid?: number }): Promise<FileStat> {
    const mode = checkMode(options.mode);
    const fields: Fields = [['op', 'chmod'], ['path', checkGuestPath(path)]];
    if (mode) fields.push(['mode', mode]);
    if (options.uid !== undefined) fields.push(['uid', String(options.uid)]);
    if (options.gid !== undefined) fields.push(['gid', String(options.gid)]);
    return this.#one(tenantId, microvmId, fields);
  }

  async watchDir(tenantId: string, microvmId: string, path: string): Promise<DirWatch> {
    checkGuestPath(path);
    const { id, client } = await this.#agent(tenantId, microvmId);
    this.#admit(id);
    const stream = this.#open(client, FrameType.REQ, [['op', 'watch'], ['path', path]]);
    stream.grant(STREAM_WINDOW);
    await firstFrame(stream, 'the watch');
    // Counted like an exec session: activity for the idle timer, ended by a suspend.
    const sessions = this.#count(id);
    const engine = this.#engine();
    let closed = false;
    const handle = {
      end: (_reason: ExitReason) => stream.fail(undefined),
      close: () => {
        stream.close();
        if (closed) return;
        closed = true;
        sessions.delete(handle);
        if (sessions.size === 0) this.#sessions.delete(id);
        engine.webSocketClosed(id);
      },
    };
    sessions.add(handle);
    engine.webSocketOpened(id);
    return {
      close: handle.close,
      async *events(): AsyncIterable<WatchEvent> {
        try {
          for (;;) {
            const frame = await stream.next();
            if (frame === null || frame.type === FrameType.END) return;
            if (frame.type === FrameType.ERROR) throw guestError(decodeFields(frame.payload) ?? []);
            if (frame.type !== FrameType.OUT) continue;
            const fields = decodeFields(frame.payload);
            if (!fields) continue;
            const type = field(fields, 'event') as WatchEvent['type'] | undefined;
            if (!type) continue;
            yield { type, name: field(fields, 'name') ?? '', isDir: field(fields, 'dir') === '1' };
            if (type === 'gone') return;
          }
        } finally {
          handle.close();
        }
      },
    };
  }

  sessionCount(microvmId: string): number {
    return this.#sessions.get(microvmId)?.size ?? 0;
  }

  async close(): Promise<void> {
    this.#shutdown.abort(new CocoonError('shutting_down', 'the server is shutting down', { status: 503 }));
    this.#unsubscribe?.();
    for (const sessions of this.#sessions.values()) for (const session of sessions) session.end('agent_gone');
    for (const agent of this.#agents.values()) void agent.client.then((c) => c.close(), () => undefined);
    this.#agents.clear();
    log.debug('exec service closed');
  }
}
