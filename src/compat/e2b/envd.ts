/**
 * E2B's envd, served by Cocoon on the gateway port instead of inside the guest: the SDK sends
 * its in-sandbox calls to E2B_SANDBOX_URL (Cocoon's gateway) with `E2b-Sandbox-Id`,
 * `E2b-Sandbox-Port` (49983) and `X-Access-Token`, or to the host `49983-<id>.<domain>`.
 * Everything is translated onto the ExecService (the guest agent), so images need no envd.
 *
 * - Connect (connect.ts): `process.Process` (Start, Connect, List, SendInput, SendSignal,
 *   CloseStdin, Update) and `filesystem.Filesystem` (Stat, MakeDir, Move, ListDir, Remove,
 *   WatchDir). Message shapes follow envd's API (proto3 JSON names, written here from reading
 *   it: nothing is generated from or copied out of its .proto files).
 * - HTTP: `GET /files` (download), `POST /files` (multipart field `file`, or octet-stream,
 *   optionally gzip), `GET /health`.
 * The access token is checked (constant time) before anything else; a sandbox paused through
 * E2B answers 502 (as E2B does) unless it has autoResume, which wakes it.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import path from 'node:path';
import { PassThrough, Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import zlib from 'node:zlib';
import Busboy from 'busboy';
import { CocoonError, isCocoonError, type ErrorCode } from '../../common/errors.ts';
import { log as rootLog } from '../../common/log.ts';
import type { ExecEvent, ExecService, ExecSession, FileStat } from '../../exec/types.ts';
import type { GatewaySurface } from '../../gateway/surfaces.ts';
import { ConnectError, DropConnection, serveConnect, type CallContext, type ConnectCode, type ConnectService, type Message } from './connect.ts';
import type { E2bSandboxes, SandboxView } from './sandboxes.ts';
import { GuestUsers } from './users.ts';

export const ENVD_PORT = 49983;
const MAX_UPLOAD_BYTES = 4 * 1024 * 1024 * 1024;
const MAX_LIST_ENTRIES = 100_000;
const MAX_DEPTH = 64;

const log = rootLog.child({ component: 'e2b-envd' });

/** Per call: the sandbox and its tenant, after the token check. */
interface Call {
  view: SandboxView;
  tenantId: string;
  id: string;
  /** From `Authorization: Basic base64("user:")` or the `username` query parameter. */
  user: string | undefined;
}

/** What envd reports for a process it started (List): argv, envs, cwd and tag as given. */
interface Started {
  cmd: string;
  args: string[];
  envs: Record<string, string>;
  cwd: string | undefined;
  tag: string | undefined;
}

const EXEC_ERROR_CODES: Partial<Record<ErrorCode, ConnectCode>> = {
  file_not_found: 'not_found',
  process_not_found: 'not_found',
  microvm_not_found: 'not_found',
  file_exists: 'already_exists',
  directory_not_empty: 'failed_precondition',
  permission_denied: 'permission_denied',
  no_space: 'resource_exhausted',
  too_many_sessions: 'resource_exhausted',
  too_many_processes: 'resource_exhausted',
  too_many_streams: 'resource_exhausted',
  microvm_suspended: 'unavailable',
  microvm_not_running: 'unavailable',
  microvm_terminated: 'unavailable',
  agent_unavailable: 'unavailable',
  agent_gone: 'unavailable',
  agent_timeout: 'unavailable',
  process_exited: 'not_found',
  not_a_tty: 'failed_precondition',
};

/** A Cocoon error as a Connect error (4xx → invalid_argument unless mapped). */
function connectError(error: unknown): unknown {
  if (error instanceof ConnectError) return error;
  if (isCocoonError(error)) {
    const code = EXEC_ERROR_CODES[error.code] ?? (error.status < 500 ? 'invalid_argument' : 'internal');
    return new ConnectError(code, error.message);
  }
  return error;
}

function str(value: unknown, what: string, optional = false): string {
  if (value === undefined || value === null || value === '') {
    if (optional) return '';
    throw new ConnectError('invalid_argument', `${what} is required`);
  }
  if (typeof value !== 'string') throw new ConnectError('invalid_argument', `${what} must be a string`);
  return value;
}

function u32(value: unknown, what: string): number | undefined {
  if (value === undefined || value === null) return undefined;
  const n = typeof value === 'string' && /^[0-9]{1,10}$/.test(value) ? Number(value) : value;
  if (typeof n !== 'number' || !Number.isInteger(n) || n < 0 || n > 0xffffffff) throw new ConnectError('invalid_argument', `${what} must be an unsigned integer`);
  return n;
}

function obj(value: unknown): Message {
  return value && typeof value === 'object' && !Array.isArray(value) ? (value as Message) : {};
}

function stringMap(value: unknown, what: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries(obj(value))) {
    if (typeof v !== 'string') throw new ConnectError('invalid_argument', `${what}.${k} must be a string`);
    out[k] = v;
  }
  return out;
}

function b64(value: unknown, what: string): Buffer {
  if (typeof value !== 'string') throw new ConnectError('invalid_argument', `${what} must be base64 bytes`);
  return Buffer.from(value, 'base64');
}

/** Go's FileMode.String() form, as envd reports `permissions`: "-rw-r--r--", "drwxr-xr-x". */
function permissions(stat: FileStat): string {
  const bits = parseInt(stat.mode, 8) & 0o777;
  const kind = stat.type === 'directory' ? 'd' : stat.type === 'symlink' ? 'L' : '-';
  let out = kind;
  for (let shift = 6; shift >= 0; shift -= 3) {
    const b = (bits >> shift) & 7;
    out += (b & 4 ? 'r' : '-') + (b & 2 ? 'w' : '-') + (b & 1 ? 'x' : '-');
  }
  return out;
}

const FILE_TYPES: Record<FileStat['type'], string> = {
  file: 'FILE_TYPE_FILE',
  directory: 'FILE_TYPE_DIRECTORY',
  symlink: 'FILE_TYPE_SYMLINK',
  other: 'FILE_TYPE_UNSPECIFIED',
};

/** The guest agent's temporary name for an upload in progress (src/guest/init/agent.c). */
const UPLOAD_TEMP = /^\..+\.cocoon-upload-[0-9]+$/;

const WATCH_TYPES: Record<string, string> = {
  create: 'EVENT_TYPE_CREATE',
  write: 'EVENT_TYPE_WRITE',
  remove: 'EVENT_TYPE_REMOVE',
  rename_from: 'EVENT_TYPE_RENAME',
  chmod: 'EVENT_TYPE_CHMOD',
};

function exitStatus(event: Extract<ExecEvent, { type: 'exit' }>): Message {
  if (event.signal) {
    const name = event.signal.replace(/^SIG/, '').toLowerCase();
    return { exitCode: -1, exited: false, status: `signal: ${name === 'kill' ? 'killed' : name === 'term' ? 'terminated' : name}` };
  }
  const code = event.exitCode ?? -1;
  return {
    exitCode: code,
    exited: true,
    status: `exit status ${code}`,
    ...(event.timedOut ? { error: 'timed out' } : {}),
  };
}

function basicUser(req: IncomingMessage): string | undefined {
  const header = req.headers.authorization;
  const match = typeof header === 'string' ? /^Basic ([A-Za-z0-9+/=]{1,400})$/.exec(header) : null;
  if (!match) return undefined;
  const decoded = Buffer.from(match[1]!, 'base64').toString('utf8');
  const user = decoded.split(':')[0];
  return user ? user : undefined;
}

export interface EnvdOptions {
  sandboxes: () => E2bSandboxes;
  exec: () => ExecService;
  /** The gateway's domain: `<port>-<id>.<domain>` hosts are claimed too. */
  domain: () => string;
}

export function createEnvdSurface(options: EnvdOptions): GatewaySurface & { close(): void } {
  const users = new GuestUsers({
    // Resolved lazily: the exec service exists once the microVM module started.
    exec: (...a) => options.exec().exec(...a),
    readFile: (...a) => options.exec().readFile(...a),
  } as ExecService);
  const started = new Map<string, Map<number, Started>>();
  const open = new Set<{ close(): void }>();

  const remember = (id: string, pid: number, info: Started) => {
    let m = started.get(id);
    if (!m) {
      // Bounded: what List reports of long-gone sandboxes is dropped first.
      if (started.size >= 10_000) started.delete(started.keys().next().value as string);
      started.set(id, (m = new Map()));
    }
    if (m.size > 4096) m.delete(m.keys().next().value as number);
    m.set(pid, info);
  };

  /** The pid a ProcessSelector names (`pid`, or a `tag` given at Start). */
  const selectPid = (call: Call, selector: unknown): number => {
    const s = obj(obj(selector).process ?? selector);
    const pid = u32(s.pid, 'process.pid');
    if (pid !== undefined && pid > 0) return pid;
    if (typeof s.tag === 'string' && s.tag) {
      for (const [p, info] of started.get(call.id) ?? []) if (info.tag === s.tag) return p;
      throw new ConnectError('not_found', `no process with tag '${s.tag}'`);
    }
    throw new ConnectError('invalid_argument', 'process.pid or process.tag is required');
  };

  /** Resolves a path as envd does: relative to the user's home. */
  const resolvePath = async (call: Call, raw: unknown, what = 'path'): Promise<string> => {
    const p = str(raw, what);
    if (p.includes('\0') || Buffer.byteLength(p) > 4096) throw new ConnectError('invalid_argument', `${what} is not a valid path`);
    if (p.startsWith('/')) return path.posix.normalize(p);
    const home = (await users.user(call.tenantId, call.id, call.user)).home;
    return path.posix.resolve(home, p.startsWith('~/') ? p.slice(2) : p === '~' ? '.' : p);
  };

  const entry = async (call: Call, stat: FileStat): Promise<Message> => {
    const names = await users.names(call.tenantId, call.id);
    return {
      name: stat.name,
      type: FILE_TYPES[stat.type],
      path: stat.path,
      size: String(stat.size),
      mode: parseInt(stat.mode, 8) & 0o7777,
      permissions: permissions(stat),
      owner: names.users.get(stat.uid) ?? String(stat.uid),
      group: names.groups.get(stat.gid) ?? String(stat.gid),
      modifiedTime: stat.mtime,
      ...(stat.linkTarget !== undefined ? { symlinkTarget: stat.linkTarget } : {}),
    };
  };

  /**
   * Files and directories envd creates belong to the calling user. The guest agent already gives
   * what it creates to the image's USER (the default user): only a named user needs a chown.
   */
  const own = async (call: Call, p: string, stat?: FileStat): Promise<FileStat> => {
    if (call.user === undefined) return stat ?? options.exec().stat(call.tenantId, call.id, p);
    const user = await users.user(call.tenantId, call.id, call.user);
    return options.exec().chmod(call.tenantId, call.id, p, { uid: user.uid, gid: user.gid });
  };

  /**
   * One agent session per process, fanned out to every envd stream on it (Start's and any
   * Connect's): the guest agent lets one client read a process's output at a time, envd lets
   * many. A hub pulls events at the pace of its slowest stream; when the last stream leaves,
   * the session closes (the process, started in the background, keeps running).
   */
  interface Sub {
    send(message: Message): Promise<void>;
    resolve(): void;
    reject(error: unknown): void;
  }
  interface Hub {
    session: ExecSession;
    subs: Set<Sub>;
    pumping: boolean;
    done: boolean;
  }
  const hubs = new Map<string, Hub>();

  const toMessage = (session: ExecSession, event: ExecEvent): Message | undefined => {
    if (event.type === 'stdout') return { event: { data: session.tty ? { pty: event.data.toString('base64') } : { stdout: event.data.toString('base64') } } };
    if (event.type === 'stderr') return { event: { data: { stderr: event.data.toString('base64') } } };
    return undefined;
  };

  const pump = async (key: string, hub: Hub): Promise<void> => {
    let failure: unknown;
    let last: Message | undefined;
    try {
      for await (const event of hub.session.events()) {
        if (event.type === 'exit') {
          // Paused, killed or failed under the stream: the connection ends as envd's would (the
          // process itself survives a pause and can be connected to again).
          if (event.reason) failure = new DropConnection(`the sandbox was ${event.reason}`);
          else last = { event: { end: exitStatus(event) } };
          break;
        }
        if (event.type === 'error') {
          failure = connectError(new CocoonError(event.error.code, event.error.message, { status: 400 }));
          break;
        }
        if (hub.done) break;
        const message = toMessage(hub.session, event);
        if (message) await Promise.all([...hub.subs].map((sub) => sub.send(message).catch(() => hub.subs.delete(sub))));
        if (hub.subs.size === 0) break;
      }
    } catch (error) {
      failure = connectError(error);
    }
    hub.done = true;
    if (hubs.get(key) === hub) hubs.delete(key);
    hub.session.close();
    open.delete(hub.session);
    for (const sub of hub.subs) {
      if (last) sub.send(last).then(() => sub.resolve(), (error: unknown) => sub.reject(error));
      else sub.reject(failure ?? new ConnectError('unavailable', 'the process stream ended'));
    }
    hub.subs.clear();
  };

  /** Streams a process's events to one envd stream (start first, then data, then end). */
  const relay = (key: string, hub: Hub, context: CallContext, send: (m: Message) => Promise<void>, killOnDeadline: boolean): Promise<void> =>
    new Promise<void>((resolve, reject) => {
      let keepalive: NodeJS.Timeout | undefined;
      const finish = () => {
        clearInterval(keepalive);
        context.signal.removeEventListener('abort', onAbort);
      };
      const sub: Sub = {
        send,
        resolve: () => (finish(), resolve()),
        reject: (error) => (finish(), reject(error)),
      };
      const onAbort = () => {
        if (context.deadlineExceeded() && killOnDeadline) hub.session.kill('SIGKILL');
        hub.subs.delete(sub);
        if (hub.subs.size === 0) {
          // The last reader left: this session is over at once, so that a later Connect attaches
          // anew instead of joining a session that is closing (and losing what it still holds).
          hub.done = true;
          if (hubs.get(key) === hub) hubs.delete(key);
          hub.session.close();
        }
        sub.resolve();
      };
      send({ event: { start: { pid: hub.session.pid } } }).then(() => {
        if (context.signal.aborted) return onAbort();
        if (hub.done) return sub.reject(new ConnectError('not_found', `process ${hub.session.pid} has exited`));
        hub.subs.add(sub);
        context.signal.addEventListener('abort', onAbort, { once: true });
        if (context.keepaliveSeconds) {
          keepalive = setInterval(() => void send({ event: { keepalive: {} } }).catch(() => undefined), context.keepaliveSeconds * 1000);
          keepalive.unref();
        }
        if (!hub.pumping) {
          hub.pumping = true;
          void pump(key, hub);
        }
      }, (error: unknown) => {
        if (hub.subs.size === 0 && !hub.pumping) hub.session.close();
        sub.reject(error);
      });
    });

  const newHub = (key: string, session: ExecSession): Hub => {
    const hub: Hub = { session, subs: new Set(), pumping: false, done: false };
    hubs.set(key, hub);
    open.add(session);
    return hub;
  };

  const withCall = (call: Call) => {
    const exec = () => options.exec();
    const process: ConnectService = {
      unary: {
        List: async () => {
          const items = await exec().listProcesses(call.tenantId, call.id);
          const known = started.get(call.id);
          return {
            processes: items.map((p) => {
              const info = known?.get(p.pid);
              const [cmd = '', ...args] = p.command;
              return {
                pid: p.pid,
                config: info ? { cmd: info.cmd, args: info.args, envs: info.envs, ...(info.cwd ? { cwd: info.cwd } : {}) } : { cmd, args, envs: {} },
                ...(info?.tag ? { tag: info.tag } : {}),
              };
            }),
          };
        },
        SendInput: async (request) => {
          const pid = selectPid(call, request);
          const input = obj(request.input);
          const data = input.pty !== undefined ? b64(input.pty, 'input.pty') : b64(input.stdin ?? '', 'input.stdin');
          await exec().writeStdin(call.tenantId, call.id, pid, data);
          return {};
        },
        SendSignal: async (request) => {
          const pid = selectPid(call, request);
          const signal = request.signal === 'SIGNAL_SIGKILL' || request.signal === 9 ? 'SIGKILL'
            : request.signal === 'SIGNAL_SIGTERM' || request.signal === 15 ? 'SIGTERM' : undefined;
          if (!signal) throw new ConnectError('invalid_argument', 'signal must be SIGNAL_SIGKILL or SIGNAL_SIGTERM');
          await exec().signal(call.tenantId, call.id, pid, signal);
          return {};
        },
        CloseStdin: async (request) => {
          const pid = selectPid(call, request);
          await exec().writeStdin(call.tenantId, call.id, pid, Buffer.alloc(0), { eof: true });
          return {};
        },
        Update: async (request) => {
          const pid = selectPid(call, request);
          const size = obj(obj(request.pty).size);
          const cols = u32(size.cols, 'pty.size.cols');
          const rows = u32(size.rows, 'pty.size.rows');
          if (cols && rows) await exec().resize(call.tenantId, call.id, pid, cols, rows);
          return {};
        },
      },
      stream: {
        Start: async (request, context, send) => {
          const config = obj(request.process);
          const cmd = str(config.cmd, 'process.cmd');
          const args = Array.isArray(config.args) ? config.args.map((a, i) => str(a, `process.args[${i}]`, true)) : [];
          const envs = stringMap(config.envs, 'process.envs');
          const cwd = config.cwd === undefined || config.cwd === '' ? undefined : await resolvePath(call, config.cwd, 'process.cwd');
          const pty = request.pty === undefined || request.pty === null ? undefined : obj(obj(request.pty).size);
          const tag = typeof request.tag === 'string' && request.tag ? request.tag : undefined;
          const session = await exec().exec(call.tenantId, call.id, {
            command: [cmd, ...args],
            env: { ...call.view.sandbox.envs, ...envs },
            ...(cwd ? { cwd } : {}),
            ...(call.user !== undefined ? { user: call.user } : {}),
            ...(pty ? { tty: true, cols: u32(pty.cols, 'pty.size.cols') || 80, rows: u32(pty.rows, 'pty.size.rows') || 24 } : {}),
            stdin: request.stdin === true || pty !== undefined,
            // envd's processes outlive the request that started them (disconnect, reconnect).
            background: true,
          });
          remember(call.id, session.pid, { cmd, args, envs, cwd, tag });
          const key = `${call.id}:${session.pid}`;
          // The process lives as long as the call's deadline (Connect-Timeout-Ms), as in envd.
          await relay(key, newHub(key, session), context, send, true);
        },
        Connect: async (request, context, send) => {
          const pid = selectPid(call, request);
          const key = `${call.id}:${pid}`;
          const hub = hubs.get(key) ?? newHub(key, await exec().attach(call.tenantId, call.id, pid));
          await relay(key, hub, context, send, false);
        },
      },
    };

    const filesystem: ConnectService = {
      unary: {
        Stat: async (request) => {
          const p = await resolvePath(call, request.path);
          return { entry: await entry(call, await exec().stat(call.tenantId, call.id, p)) };
        },
        MakeDir: async (request) => {
          const p = await resolvePath(call, request.path);
          try {
            const existing = await exec().stat(call.tenantId, call.id, p);
            throw new ConnectError('already_exists', `${existing.type === 'directory' ? 'directory' : 'a file'} ${p} exists already`);
          } catch (error) {
            if (error instanceof ConnectError) throw error;
            if (!(isCocoonError(error) && error.code === 'file_not_found')) throw error;
          }
          // envd creates missing parents too, owned by the user.
          const missing: string[] = [];
          for (let dir = p; dir !== '/'; dir = path.posix.dirname(dir)) {
            try {
              await exec().stat(call.tenantId, call.id, dir);
              break;
            } catch (error) {
              if (!(isCocoonError(error) && error.code === 'file_not_found')) throw error;
              missing.unshift(dir);
            }
          }
          let stat: FileStat | undefined;
          for (const dir of missing) stat = await own(call, dir, await exec().mkdir(call.tenantId, call.id, dir, { mode: '0755' }));
          return { entry: await entry(call, stat ?? (await exec().stat(call.tenantId, call.id, p))) };
        },
        Move: async (request) => {
          const from = await resolvePath(call, request.source, 'source');
          const to = await resolvePath(call, request.destination, 'destination');
          return { entry: await entry(call, await exec().rename(call.tenantId, call.id, from, to)) };
        },
        Remove: async (request) => {
          const p = await resolvePath(call, request.path);
          try {
            await exec().remove(call.tenantId, call.id, p, { recursive: true });
          } catch (error) {
            // envd removes like `rm -rf`: a missing path is no error.
            if (!(isCocoonError(error) && error.code === 'file_not_found')) throw error;
          }
          return {};
        },
        ListDir: async (request) => {
          const p = await resolvePath(call, request.path);
          const depth = u32(request.depth, 'depth') || 1;
          if (depth > MAX_DEPTH) throw new ConnectError('invalid_argument', `depth is at most ${MAX_DEPTH}`);
          const top = await exec().stat(call.tenantId, call.id, p);
          if (top.type !== 'directory') throw new ConnectError('invalid_argument', `${p} is not a directory`);
          const entries: Message[] = [];
          const walk = async (dir: string, level: number): Promise<void> => {
            for (const stat of await exec().list(call.tenantId, call.id, dir)) {
              if (entries.length >= MAX_LIST_ENTRIES) throw new ConnectError('resource_exhausted', `more than ${MAX_LIST_ENTRIES} entries`);
              entries.push(await entry(call, stat));
              if (stat.type === 'directory' && level < depth) await walk(stat.path, level + 1);
            }
          };
          await walk(p, 1);
          return { entries };
        },
        CreateWatcher: async () => {
          throw new ConnectError('unimplemented', 'polling watchers are not served by Cocoon; use WatchDir (the SDK\'s files.watchDir)');
        },
      },
      stream: {
        WatchDir: async (request, context, send) => {
          if (request.recursive === true) throw new ConnectError('unimplemented', 'recursive watching is not supported by Cocoon (the guest agent watches one directory)');
          const p = await resolvePath(call, request.path);
          const watch = await exec().watchDir(call.tenantId, call.id, p);
          open.add(watch);
          const onAbort = () => watch.close();
          context.signal.addEventListener('abort', onAbort, { once: true });
          let keepalive: NodeJS.Timeout | undefined;
          try {
            await send({ start: {} });
            if (context.keepaliveSeconds) {
              keepalive = setInterval(() => void send({ keepalive: {} }).catch(() => undefined), context.keepaliveSeconds * 1000);
              keepalive.unref();
            }
            for await (const event of watch.events()) {
              if (context.signal.aborted) break;
              if (event.type === 'gone') break;
              // The guest agent writes uploads aside (`.<name>.cocoon-upload-<n>`) and renames them
              // into place; envd writes in place. Watchers see envd's events: the temporary file
              // stays hidden and its arrival under the real name is a create and a write.
              if (UPLOAD_TEMP.test(event.name)) continue;
              if (event.type === 'rename_to') {
                await send({ filesystem: { name: event.name, type: 'EVENT_TYPE_CREATE' } });
                await send({ filesystem: { name: event.name, type: 'EVENT_TYPE_WRITE' } });
                continue;
              }
              const type = WATCH_TYPES[event.type];
              if (type) await send({ filesystem: { name: event.name, type } });
            }
          } finally {
            clearInterval(keepalive);
            context.signal.removeEventListener('abort', onAbort);
            watch.close();
            open.delete(watch);
          }
        },
      },
    };
    return { 'process.Process': process, 'filesystem.Filesystem': filesystem };
  };

  // ---- HTTP -------------------------------------------------------------------------------

  const send = (res: ServerResponse, status: number, body: unknown) => {
    if (res.headersSent) {
      res.destroy();
      return;
    }
    const json = JSON.stringify(body);
    res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(json) });
    res.end(json);
  };
  const httpError = (res: ServerResponse, error: unknown) => {
    if (isCocoonError(error)) {
      const status = error.code === 'file_not_found' ? 404 : error.status;
      send(res, status, { code: status, message: error.message });
      return;
    }
    if (error instanceof ConnectError) {
      const status = error.code === 'not_found' ? 404 : error.code === 'invalid_argument' ? 400 : 500;
      send(res, status, { code: status, message: error.message });
      return;
    }
    log.error({ err: error }, 'envd HTTP call failed');
    send(res, 500, { code: 500, message: 'internal error; see the server log' });
  };

  const download = async (call: Call, url: URL, res: ServerResponse) => {
    const p = await resolvePath(call, url.searchParams.get('path'));
    const { stat, body } = await options.exec().readFile(call.tenantId, call.id, p);
    // Sent as it is (no gzip even when accepted: fetch handles either, and the bytes stream).
    res.writeHead(200, {
      'content-type': 'application/octet-stream',
      'content-disposition': `attachment; filename="${encodeURIComponent(stat.name)}"`,
      'content-length': stat.size,
    });
    res.on('close', () => body.destroy());
    await pipeline(body, res);
  };

  const writeOne = async (call: Call, target: string, body: Readable): Promise<Message> => {
    const stat = await options.exec().writeFile(call.tenantId, call.id, target, body);
    const owned = await own(call, stat.path, stat);
    return { name: owned.name, type: 'file', path: owned.path };
  };

  /** Creates the missing parent directories of an upload (envd does), owned by the user. */
  const parents = async (call: Call, target: string) => {
    const dir = path.posix.dirname(target);
    try {
      await options.exec().stat(call.tenantId, call.id, dir);
    } catch (error) {
      if (!(isCocoonError(error) && error.code === 'file_not_found')) throw error;
      await filesystemFor(call).unary.MakeDir!({ path: dir }, undefined as unknown as CallContext).catch((e: unknown) => {
        if (!(e instanceof ConnectError && e.code === 'already_exists')) throw e;
      });
    }
  };
  const filesystemFor = (call: Call) => withCall(call)['filesystem.Filesystem'];

  const upload = async (call: Call, url: URL, req: IncomingMessage, res: ServerResponse) => {
    const contentType = String(req.headers['content-type'] ?? '').toLowerCase();
    const encoding = String(req.headers['content-encoding'] ?? '').toLowerCase();
    const limited = (source: Readable): Readable => {
      let size = 0;
      const out = new PassThrough();
      source.on('data', (chunk: Buffer) => {
        size += chunk.length;
        if (size > MAX_UPLOAD_BYTES) source.destroy(new ConnectError('resource_exhausted', 'the upload is too large'));
      });
      source.on('error', (e) => out.destroy(e));
      source.pipe(out);
      return out;
    };
    const decoded = (source: Readable): Readable => {
      if (encoding === 'gzip') {
        const gunzip = zlib.createGunzip();
        source.on('error', (e) => gunzip.destroy(e));
        source.pipe(gunzip);
        return limited(gunzip);
      }
      if (encoding && encoding !== 'identity') throw new ConnectError('invalid_argument', `content-encoding ${encoding} is not supported (gzip is)`);
      return limited(source);
    };
    if (contentType.startsWith('application/octet-stream')) {
      const target = await resolvePath(call, url.searchParams.get('path'));
      await parents(call, target);
      const written = await writeOne(call, target, decoded(req));
      send(res, 200, [written]);
      return;
    }
    if (!contentType.startsWith('multipart/form-data')) throw new ConnectError('invalid_argument', 'send multipart/form-data (field "file") or application/octet-stream');
    const queryPath = url.searchParams.get('path');
    const results: Message[] = [];
    await new Promise<void>((resolve, reject) => {
      const parser = Busboy({ headers: req.headers, preservePath: true, limits: { files: 1000, fileSize: MAX_UPLOAD_BYTES, fields: 100 } });
      let chain = Promise.resolve();
      let failed = false;
      parser.on('file', (field, stream, info) => {
        if (field !== 'file' || failed) {
          stream.resume();
          return;
        }
        // The part's filename is the path (several files); the query's path names a single one.
        const name = info.filename && info.filename !== 'blob' ? info.filename : undefined;
        const buffered = new PassThrough();
        stream.pipe(buffered);
        chain = chain.then(async () => {
          if (failed) return;
          const target = await resolvePath(call, name ?? queryPath);
          await parents(call, target);
          results.push(await writeOne(call, target, buffered));
        });
        chain.catch((error: unknown) => {
          failed = true;
          stream.resume();
          reject(error);
        });
      });
      parser.on('error', (error) => reject(new ConnectError('invalid_argument', `multipart: ${(error as Error).message}`)));
      parser.on('close', () => void chain.then(() => resolve(), reject));
      decoded(req).pipe(parser);
    });
    send(res, 200, results);
  };

  // ---- routing ------------------------------------------------------------------------------

  const target = (req: IncomingMessage): { sandboxId: string; port: number } | undefined => {
    const id = req.headers['e2b-sandbox-id'];
    if (typeof id === 'string') {
      const port = Number(req.headers['e2b-sandbox-port'] ?? ENVD_PORT);
      return { sandboxId: id.toLowerCase(), port };
    }
    const host = (req.headers.host ?? '').toLowerCase().replace(/:[0-9]+$/, '');
    const domain = options.domain();
    if (!host.endsWith(`.${domain}`)) return undefined;
    const label = host.slice(0, -domain.length - 1);
    const match = /^([0-9]{1,5})-([a-z0-9-]{1,63})$/.exec(label);
    return match ? { sandboxId: match[2]!, port: Number(match[1]) } : undefined;
  };

  return {
    // E2B's headers always; the host form only for envd's port (other ports are app traffic,
    // which the gateway routes itself from `<port>-<id>.<domain>`, with a Cocoon token).
    claims(req) {
      const t = target(req);
      return t !== undefined && (typeof req.headers['e2b-sandbox-id'] === 'string' || t.port === ENVD_PORT);
    },
    microvmOf: (req) => target(req)?.sandboxId,
    handle(req, res) {
      const t = target(req)!;
      void (async () => {
        if (t.port !== ENVD_PORT) {
          send(res, 502, { code: 502, message: `port ${t.port}: only envd (port ${ENVD_PORT}) is served through E2B's headers; reach app ports at <port>-<id>.<domain> with a Cocoon token (X-Cocoon-Token)` });
          return;
        }
        const url = new URL(req.url ?? '/', 'http://envd');
        // Refusals in the caller's protocol: Connect's error JSON on Connect paths, E2B's elsewhere.
        const connectPath = /^\/[a-z]+\.[A-Za-z]+\//.test(url.pathname);
        const refuse = (status: number, code: ConnectCode, message: string) =>
          send(res, status, connectPath ? { code, message } : { code: status, message });
        const token = req.headers['x-access-token'];
        if (!options.sandboxes().checkAccessToken(t.sandboxId, typeof token === 'string' ? token : undefined)) {
          refuse(401, 'unauthenticated', 'missing or wrong X-Access-Token for this sandbox');
          return;
        }
        const view = await options.sandboxes().find(t.sandboxId);
        if (!view || !(await options.sandboxes().admitTraffic(view))) {
          refuse(502, 'unavailable', view ? `sandbox ${t.sandboxId} is paused` : `sandbox ${t.sandboxId} was not found`);
          return;
        }
        const call: Call = {
          view,
          tenantId: view.sandbox.tenantId,
          id: view.sandbox.microvmId,
          user: basicUser(req) ?? (url.searchParams.get('username') || undefined),
        };
        if (url.pathname === '/health' && (req.method === 'GET' || req.method === 'HEAD')) {
          res.writeHead(204);
          res.end();
          return;
        }
        if (url.pathname === '/files') {
          try {
            if (req.method === 'GET') await download(call, url, res);
            else if (req.method === 'POST') await upload(call, url, req, res);
            else send(res, 405, { code: 405, message: 'GET or POST' });
          } catch (error) {
            httpError(res, error);
          }
          return;
        }
        const services = withCall(call);
        const wrapped: Record<string, ConnectService> = {};
        for (const [name, service] of Object.entries(services)) {
          wrapped[name] = {
            unary: Object.fromEntries(Object.entries(service.unary).map(([m, fn]) => [m, (r: Message, c: CallContext) => fn(r, c).catch((e: unknown) => Promise.reject(connectError(e)))])),
            stream: Object.fromEntries(Object.entries(service.stream).map(([m, fn]) => [m, (r: Message, c: CallContext, s: (m: Message) => Promise<void>) => fn(r, c, s).catch((e: unknown) => Promise.reject(connectError(e)))])),
          };
        }
        if (!serveConnect(wrapped, req, res, url.pathname, (error) => log.error({ err: error, path: url.pathname }, 'envd call failed'))) {
          send(res, 404, { code: 404, message: `envd has no ${url.pathname} here` });
        }
      })().catch((error: unknown) => httpError(res, error));
    },
    close() {
      for (const session of open) session.close();
      open.clear();
    },
  };
}
