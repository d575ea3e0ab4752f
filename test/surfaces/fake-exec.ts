/**
 * A stand-in for the exec / files part of the API (coord contract, docs/api.md), for the
 * client-side unit tests of the SDK and the CLI: it runs commands as host processes and keeps
 * "guest" files under a temporary root. It checks the Bearer key (or the first WebSocket
 * message's apiKey) and knows one microVM. The real thing is tested end to end in
 * exec-surfaces.test.ts; this one lets the clients' parsing, framing, exit codes and error
 * paths be tested on their own, and answers odd things on demand.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import type net from 'node:net';
import path from 'node:path';
import { WebSocketServer, type WebSocket } from 'ws';

export const FAKE_KEY = 'cocoon_ak_fake';
export const FAKE_VM = 'mvm-fake';

export interface FakeExec {
  url: string;
  root: string;
  /** Every request line seen, e.g. `POST /api/v1/microvms/mvm-fake/exec`. */
  requests: string[];
  /** Bodies of exec requests (JSON). */
  execBodies: Array<Record<string, unknown>>;
  /** First messages of WebSocket sessions. */
  startMessages: Array<Record<string, unknown>>;
  /** Control messages (resize, signal, eof) seen on sessions. */
  controls: Array<Record<string, unknown>>;
  /** Where the last WebSocket's auth came from. */
  lastAuth: 'header' | 'message' | undefined;
  close(): Promise<void>;
}

function error(res: http.ServerResponse, status: number, code: string, message: string): void {
  res.writeHead(status, { 'content-type': 'application/json' }).end(JSON.stringify({ error: { code, message } }));
}

function readBody(req: http.IncomingMessage): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => resolve(Buffer.concat(chunks)));
    req.on('error', reject);
  });
}

function spawnCommand(command: unknown, spec: Record<string, unknown>, root: string): ChildProcess {
  const argv = typeof command === 'string' ? ['/bin/sh', '-c', command] : (command as string[]);
  const cwd = typeof spec.cwd === 'string' ? path.join(root, spec.cwd) : root;
  return spawn(argv[0]!, argv.slice(1), { cwd, env: { PATH: process.env.PATH, ...(spec.env as Record<string, string> | undefined) }, stdio: ['pipe', 'pipe', 'pipe'] });
}

function exitEvent(code: number | null, signal: NodeJS.Signals | null, timedOut: boolean) {
  return { type: 'exit', exitCode: code, signal, timedOut };
}

function statOf(root: string, guest: string) {
  const full = path.join(root, guest);
  const stat = fs.lstatSync(full);
  return {
    path: guest,
    name: path.posix.basename(guest),
    type: stat.isFile() ? 'file' : stat.isDirectory() ? 'directory' : stat.isSymbolicLink() ? 'symlink' : 'other',
    size: stat.size,
    mode: (stat.mode & 0o7777).toString(8).padStart(4, '0'),
    uid: stat.uid,
    gid: stat.gid,
    mtime: stat.mtime.toISOString(),
    ...(stat.isSymbolicLink() ? { linkTarget: fs.readlinkSync(full) } : {}),
  };
}

export async function startFakeExec(root: string): Promise<FakeExec> {
  const processes = new Map<number, { child: ChildProcess; command: string[]; listeners: Set<(line: string) => void> }>();
  const state: Omit<FakeExec, 'url' | 'close'> = { root, requests: [], execBodies: [], startMessages: [], controls: [], lastAuth: undefined };

  const server = http.createServer(async (req, res) => {
    const url = new URL(req.url!, 'http://x');
    state.requests.push(`${req.method} ${url.pathname}`);
    if (req.headers.authorization !== `Bearer ${FAKE_KEY}`) return error(res, 401, 'unauthenticated', 'this API key is unknown or revoked');
    const match = /^\/api\/v1\/microvms\/([^/]+)\/(.+)$/.exec(url.pathname);
    if (!match) return error(res, 404, 'not_found', 'no such route');
    const [, id, rest] = match as unknown as [string, string, string];
    if (id !== FAKE_VM) return error(res, 404, 'not_found', `no microVM ${id}`);

    if (req.method === 'POST' && rest === 'exec') {
      const body = JSON.parse((await readBody(req)).toString()) as Record<string, unknown>;
      state.execBodies.push(body);
      if (body.command === 'no-shell-please') return error(res, 400, 'no_shell', 'this image has no /bin/sh');
      const child = spawnCommand(body.command, body, root);
      if (typeof body.stdin === 'string') child.stdin!.end(Buffer.from(body.stdin, 'base64'));
      else if (!body.background) child.stdin!.end();
      let timedOut = false;
      const timer = typeof body.timeoutSeconds === 'number' ? setTimeout(() => {
        timedOut = true;
        child.kill('SIGKILL');
      }, body.timeoutSeconds * 1000) : undefined;
      const entry = { child, command: Array.isArray(body.command) ? body.command as string[] : ['/bin/sh', '-c', String(body.command)], listeners: new Set<(line: string) => void>() };
      const emit = (event: unknown) => {
        const line = `${JSON.stringify(event)}\n`;
        for (const listener of entry.listeners) listener(line);
      };
      child.stdout!.on('data', (d: Buffer) => emit({ type: 'stdout', data: d.toString('base64') }));
      child.stderr!.on('data', (d: Buffer) => emit({ type: 'stderr', data: d.toString('base64') }));
      child.on('close', (code, signal) => {
        clearTimeout(timer);
        emit(exitEvent(code, signal, timedOut));
        processes.delete(child.pid!);
        for (const listener of entry.listeners) listener('');
      });
      processes.set(child.pid!, entry);
      if (body.background) {
        res.writeHead(201, { 'content-type': 'application/json' }).end(JSON.stringify({ pid: child.pid }));
        return;
      }
      res.writeHead(200, { 'content-type': 'application/x-ndjson' });
      res.write(`${JSON.stringify({ type: 'start', pid: child.pid })}\n`);
      entry.listeners.add((line) => (line ? res.write(line) : res.end()));
      return;
    }
    const proc = /^processes(?:\/(\d+)\/(output|stdin|signal|resize))?$/.exec(rest);
    if (proc) {
      if (!proc[1]) {
        return res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({
          items: [...processes.entries()].map(([pid, p]) => ({ pid, command: p.command, tty: false, startedAt: new Date().toISOString() })),
        }));
      }
      const entry = processes.get(Number(proc[1]));
      if (!entry) return error(res, 404, 'process_not_found', `no process ${proc[1]}`);
      if (proc[2] === 'output') {
        res.writeHead(200, { 'content-type': 'application/x-ndjson' });
        res.write(`${JSON.stringify({ type: 'start', pid: Number(proc[1]) })}\n`);
        entry.listeners.add((line) => (line ? res.write(line) : res.end()));
        return;
      }
      const body = await readBody(req);
      if (proc[2] === 'stdin') {
        entry.child.stdin!.write(body);
        if (url.searchParams.get('eof') === '1') entry.child.stdin!.end();
      } else if (proc[2] === 'signal') {
        entry.child.kill(JSON.parse(body.toString()).signal);
      }
      return res.writeHead(204).end();
    }
    if (rest.startsWith('files')) {
      const guest = url.searchParams.get('path') ?? '';
      try {
        if (rest === 'files' && req.method === 'PUT') {
          const full = path.join(root, guest);
          await new Promise<void>((resolve, reject) => {
            const out = fs.createWriteStream(full);
            req.pipe(out);
            out.on('finish', resolve);
            out.on('error', reject);
          });
          const mode = url.searchParams.get('mode');
          if (mode) fs.chmodSync(full, parseInt(mode, 8));
          return res.writeHead(201, { 'content-type': 'application/json' }).end(JSON.stringify(statOf(root, guest)));
        }
        if (rest === 'files' && req.method === 'GET') {
          const full = path.join(root, guest);
          if (!fs.existsSync(full)) return error(res, 404, 'file_not_found', `no file ${guest}`);
          if (fs.statSync(full).isDirectory()) return error(res, 400, 'is_a_directory', `${guest} is a folder`);
          res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': fs.statSync(full).size });
          fs.createReadStream(full).pipe(res);
          return;
        }
        if (rest === 'files/stat') {
          if (!fs.existsSync(path.join(root, guest)) && !fs.lstatSync(path.join(root, guest), { throwIfNoEntry: false })) return error(res, 404, 'file_not_found', `no file ${guest}`);
          return res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(statOf(root, guest)));
        }
        if (rest === 'files/list') {
          const names = fs.readdirSync(path.join(root, guest));
          return res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ items: names.map((n) => statOf(root, path.posix.join(guest, n))) }));
        }
        const body = JSON.parse((await readBody(req)).toString() || '{}') as Record<string, string>;
        if (rest === 'files/mkdir') {
          fs.mkdirSync(path.join(root, body.path!), { recursive: Boolean(body.parents), mode: body.mode ? parseInt(body.mode, 8) : 0o755 });
          return res.writeHead(201, { 'content-type': 'application/json' }).end(JSON.stringify(statOf(root, body.path!)));
        }
        if (rest === 'files/remove') {
          fs.rmSync(path.join(root, body.path!), { recursive: Boolean(body.recursive) });
          return res.writeHead(204).end();
        }
        if (rest === 'files/rename') {
          fs.renameSync(path.join(root, body.from!), path.join(root, body.to!));
          return res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(statOf(root, body.to!)));
        }
      } catch (e) {
        return error(res, 404, 'file_not_found', String(e));
      }
    }
    return error(res, 404, 'not_found', 'no such route');
  });

  const wss = new WebSocketServer({ noServer: true });
  server.on('upgrade', (req, socket, head) => {
    const url = new URL(req.url!, 'http://x');
    const match = /^\/api\/v1\/microvms\/([^/]+)\/exec\/ws$/.exec(url.pathname);
    const headerAuth = req.headers.authorization;
    if (!match || (headerAuth && headerAuth !== `Bearer ${FAKE_KEY}`) || (headerAuth && match[1] !== FAKE_VM)) {
      const [status, code] = !match || match[1] !== FAKE_VM ? [404, 'not_found'] : [401, 'unauthenticated'];
      (socket as net.Socket).end(`HTTP/1.1 ${status} Nope\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n${JSON.stringify({ error: { code, message: `refused: ${code}` } })}`);
      return;
    }
    wss.handleUpgrade(req, socket, head, (ws) => session(ws, match[1]!, Boolean(headerAuth)));
  });

  function session(ws: WebSocket, id: string, headerAuth: boolean): void {
    let child: ChildProcess | undefined;
    ws.on('message', (data, isBinary) => {
      if (isBinary) {
        child?.stdin!.write(data as Buffer);
        return;
      }
      const message = JSON.parse(data.toString()) as Record<string, unknown>;
      if (!child) {
        state.startMessages.push(message);
        state.lastAuth = headerAuth ? 'header' : 'message';
        if (!headerAuth && message.apiKey !== FAKE_KEY) {
          ws.send(JSON.stringify({ type: 'error', error: { code: 'unauthenticated', message: 'this API key is unknown or revoked' } }));
          ws.close(1000);
          return;
        }
        if (id !== FAKE_VM) {
          ws.send(JSON.stringify({ type: 'error', error: { code: 'not_found', message: `no microVM ${id}` } }));
          ws.close(1000);
          return;
        }
        child = spawnCommand(message.command ?? ['/bin/sh'], message, root);
        ws.send(JSON.stringify({ type: 'started', pid: child.pid }));
        child.stdout!.on('data', (d: Buffer) => ws.send(Buffer.concat([Buffer.from([1]), d])));
        child.stderr!.on('data', (d: Buffer) => ws.send(Buffer.concat([Buffer.from([message.tty ? 1 : 2]), d])));
        child.on('close', (code, signal) => {
          ws.send(JSON.stringify(exitEvent(code, signal, false)));
          ws.close(1000);
        });
        return;
      }
      state.controls.push(message);
      if (message.type === 'eof') child.stdin!.end();
      else if (message.type === 'signal') child.kill(message.signal as NodeJS.Signals);
    });
    ws.on('close', () => child?.kill('SIGKILL'));
  }

  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as net.AddressInfo;
  return Object.assign(state, {
    url: `http://127.0.0.1:${port}`,
    async close() {
      for (const { child } of processes.values()) child.kill('SIGKILL');
      for (const client of wss.clients) client.terminate();
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  });
}
