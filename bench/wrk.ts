/**
 * Debian's `wrk` and `nginx` for the gateway benchmark: wrk as the load generator (one C
 * process, so the Node load generator's own CPU does not decide the figures), nginx as the
 * reference reverse proxy in front of the same guest port (scripts/setup.sh installs both).
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { processStats } from '../src/host/processes.ts';

export interface WrkResult {
  rps: number;
  /** Requests answered (any status). */
  requests: number;
  /** wrk's socket errors: connect, read, write, timeout. */
  errors: { connect: number; read: number; write: number; timeout: number };
  /** Answers that were not 2xx or 3xx. */
  non2xx: number;
}

export function wrkAvailable(): boolean {
  return spawnSync('wrk', ['--version']).error === undefined;
}

/** Parses wrk's text report. */
export function parseWrk(out: string): WrkResult {
  const num = (re: RegExp) => Number(re.exec(out)?.[1] ?? 0);
  const err = /Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)/.exec(out);
  return {
    rps: num(/Requests\/sec:\s+([\d.]+)/),
    requests: num(/(\d+) requests in/),
    errors: {
      connect: Number(err?.[1] ?? 0),
      read: Number(err?.[2] ?? 0),
      write: Number(err?.[3] ?? 0),
      timeout: Number(err?.[4] ?? 0),
    },
    non2xx: num(/Non-2xx or 3xx responses: (\d+)/),
  };
}

/** Runs wrk against `url` with `connections` connections for `seconds`; headers as `name: value`. */
export async function runWrk(o: { url: string; connections: number; seconds: number; headers?: string[]; timeoutSeconds?: number }): Promise<WrkResult> {
  const args = ['-t', String(Math.min(2, o.connections)), '-c', String(o.connections), '-d', `${o.seconds}s`, '--timeout', `${o.timeoutSeconds ?? 5}s`];
  for (const h of o.headers ?? []) args.push('-H', h);
  args.push(o.url);
  const child = spawn('wrk', args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stdout.on('data', (c: Buffer) => (out += c.toString()));
  child.stderr.on('data', (c: Buffer) => (out += c.toString()));
  const code = await new Promise<number | null>((resolve) => child.once('exit', resolve));
  if (code !== 0) throw new Error(`wrk ${args.join(' ')} exited with ${code}: ${out}`);
  return parseWrk(out);
}

/** CPU time (user + system, ms) a process has used so far; 0 when it cannot be read. */
export function cpuMs(pid: number): number {
  try {
    return processStats(pid).cpuMs;
  } catch {
    return 0;
  }
}

async function freePort(): Promise<number> {
  return await new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address() as net.AddressInfo;
      server.close(() => resolve(port));
    });
  });
}

export interface Nginx {
  port: number;
  /** Its one process (master_process off). */
  pid: number;
  stop(): Promise<void>;
}

/**
 * Debian's nginx as a reverse proxy on 127.0.0.1 to 127.0.0.1:`upstreamPort`, in its own
 * prefix directory under `dir` (no system configuration touched), in the foreground, as one
 * worker (the gateway is one process too). Its upstream settings are nginx's defaults: a new
 * HTTP/1.0 connection per request.
 */
export async function startNginx(dir: string, upstreamPort: number): Promise<Nginx> {
  const prefix = fs.mkdtempSync(path.join(dir, 'nginx-'));
  for (const sub of ['logs', 'tmp']) fs.mkdirSync(path.join(prefix, sub));
  const port = await freePort();
  const conf = path.join(prefix, 'nginx.conf');
  fs.writeFileSync(
    conf,
    `daemon off;
master_process off;
worker_processes 1;
pid ${prefix}/nginx.pid;
error_log ${prefix}/logs/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path ${prefix}/tmp/body;
  proxy_temp_path ${prefix}/tmp/proxy;
  fastcgi_temp_path ${prefix}/tmp/fastcgi;
  uwsgi_temp_path ${prefix}/tmp/uwsgi;
  scgi_temp_path ${prefix}/tmp/scgi;
  server {
    listen 127.0.0.1:${port};
    location / { proxy_pass http://127.0.0.1:${upstreamPort}; }
  }
}
`,
  );
  const child: ChildProcess = spawn('nginx', ['-p', prefix, '-c', conf], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr!.on('data', (c: Buffer) => (stderr += c.toString()));
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  // Up once it accepts a connection.
  const deadline = Date.now() + 10_000;
  for (;;) {
    const ok = await new Promise<boolean>((resolve) => {
      const s = net.connect(port, '127.0.0.1');
      s.once('connect', () => (s.destroy(), resolve(true)));
      s.once('error', () => resolve(false));
    });
    if (ok) break;
    if (child.exitCode !== null || Date.now() > deadline) {
      child.kill('SIGKILL');
      throw new Error(`nginx did not start: ${stderr}`);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  return {
    port,
    pid: child.pid!,
    async stop() {
      child.kill('SIGKILL');
      await exited;
      fs.rmSync(prefix, { recursive: true, force: true });
    },
  };
}
