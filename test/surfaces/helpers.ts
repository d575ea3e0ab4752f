/**
 * Shared scaffolding for the surface tests: a real server (startServer with the default modules,
 * ephemeral ports, a temp data directory), the CLI run as a user runs it (bin/cocoon), fake
 * HTTP servers for transport edge cases, the busybox sample app, and cleanup that leaves
 * nothing behind even when a test fails.
 */
import { execFile, spawn } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { registeredRoutes, type RegisteredRoute } from '../../src/api/app.ts';
import { unmountUnder } from '../../src/builder/buildah.ts';
import { cleanupAbandonedBuild } from '../../src/images/cleanup.ts';
import { isId } from '../../src/store/ids.ts';
import type { CocoonConfig } from '../../src/config/config.ts';
import { defaultModules } from '../../src/modules.ts';
import { parseAcceleratorChoice } from '../../src/vmm/qemu/accel.ts';
import { startServer, type RunningServer, type ServerModule } from '../../src/server.ts';
import { type Tree, writeTree } from '../support/tree.ts';

export const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
export const artifacts = path.join(repo, 'test-artifacts');

export function tempDir(prefix = 'cocoon-surfaces-'): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}

export function testConfig(dataDir: string): CocoonConfig {
  // TCG unless told otherwise: this machine's nested KVM does not boot a stock kernel (docs/design.md).
  const accel = parseAcceleratorChoice(process.env.COCOON_ACCEL ?? 'tcg');
  return { dataDir, host: '127.0.0.1', apiPort: 0, gatewayPort: 0, gatewayDomain: 'vm.localhost', region: 'local-1', accel };
}

export interface TestServer {
  server: RunningServer;
  modules: ServerModule[];
  dataDir: string;
  url: string;
  adminKey: string;
  routes: RegisteredRoute[];
  /** Whether a route exists, e.g. has('POST', '/api/v1/images'). */
  has(method: string, url: string): boolean;
  close(): Promise<void>;
}

/** A server with every default module (whatever has been merged: images, microVMs, gateway). */
export async function startTestServer(options: { modules?: ServerModule[]; dataDir?: string } = {}): Promise<TestServer> {
  const dataDir = options.dataDir ?? tempDir();
  const modules = options.modules ?? defaultModules();
  let server: RunningServer;
  try {
    server = await startServer(testConfig(dataDir), modules);
  } catch (error) {
    await removeDataDir(dataDir);
    throw error;
  }
  const adminKey = fs.readFileSync(path.join(dataDir, 'admin-api-key'), 'utf8').trim();
  const routes = registeredRoutes(server.api);
  let closed = false;
  return {
    server,
    modules,
    dataDir,
    url: server.apiUrl,
    adminKey,
    routes,
    has: (method, url) => routes.some((r) => r.method === method && r.url === url),
    async close() {
      if (closed) return;
      closed = true;
      try {
        await server.close();
      } finally {
        if (!options.dataDir) await removeDataDir(dataDir);
      }
    },
  };
}

/** Processes whose command line mentions `dir` (QEMU, buildah… started for a test server). */
export function processesUnder(dir: string): number[] {
  const found: number[] = [];
  for (const entry of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(entry) || Number(entry) === process.pid) continue;
    try {
      const cmdline = fs.readFileSync(`/proc/${entry}/cmdline`, 'utf8');
      if (cmdline.includes(dir)) found.push(Number(entry));
    } catch {
      // gone
    }
  }
  return found;
}

/**
 * Removes a server's data directory, also after a test that failed half-way: every image's
 * build leftovers first (processes, buildah containers and images, mounts: the images module's
 * own cleanup), then whatever still runs from the directory (QEMU), then the files.
 */
export async function removeDataDir(dir: string): Promise<void> {
  const images = path.join(dir, 'images');
  for (const id of fs.existsSync(images) ? fs.readdirSync(images) : []) {
    if (isId(id, 'image')) await cleanupAbandonedBuild(dir, id, 2000).catch(() => undefined);
  }
  for (const pid of processesUnder(dir)) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // gone already
    }
  }
  const mounts = fs.existsSync('/proc/mounts')
    ? fs.readFileSync('/proc/mounts', 'utf8').split('\n').map((l) => l.split(' ')[1] ?? '').filter((m) => m.startsWith(dir)).sort().reverse()
    : [];
  for (const mount of mounts) await run('umount', ['-l', mount]).catch(() => undefined);
  await unmountUnder(dir).catch(() => undefined);
  fs.rmSync(dir, { recursive: true, force: true, maxRetries: 3 });
}

export function run(command: string, args: string[], options: { cwd?: string } = {}): Promise<{ stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    execFile(command, args, { ...options, maxBuffer: 64 * 1024 * 1024 }, (error, stdout, stderr) => {
      if (error) reject(Object.assign(error, { stdout, stderr }));
      else resolve({ stdout, stderr });
    });
  });
}

export interface CliResult {
  code: number;
  stdout: string;
  /** stdout as bytes (for binary output). */
  stdoutBytes: Buffer;
  stderr: string;
  /** stdout parsed as JSON (for --json runs). */
  json: any;
  /** stderr's JSON error (for failing --json runs). */
  error: any;
}

/**
 * Runs `bin/cocoon` with `args` in `cwd` (default: a fresh empty directory, so no stray
 * .cocoon is found) with a clean environment plus `env`.
 */
export function cocoon(args: string[], options: { env?: Record<string, string>; cwd?: string; input?: string | Buffer; timeoutMs?: number } = {}): Promise<CliResult> {
  const env: Record<string, string> = { PATH: process.env.PATH ?? '/usr/bin:/bin', HOME: process.env.HOME ?? '/root', NODE_ENV: 'test', ...options.env };
  const cwd = options.cwd ?? emptyCwd();
  return new Promise((resolve, reject) => {
    const child = spawn(path.join(repo, 'bin/cocoon'), args, { cwd, env, stdio: ['pipe', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => out.push(d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    const timer = setTimeout(() => child.kill('SIGKILL'), options.timeoutMs ?? 600_000);
    child.on('error', reject);
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      const stdoutBytes = Buffer.concat(out);
      const stdout = stdoutBytes.toString('utf8');
      const parse = (text: string) => {
        try {
          return JSON.parse(text);
        } catch {
          return undefined;
        }
      };
      resolve({ code: code ?? (signal ? 128 : 1), stdout, stdoutBytes, stderr, json: parse(stdout), error: parse(stderr.trim().split('\n').at(-1) ?? '')?.error });
    });
    child.stdin.end(options.input ?? '');
  });
}

let sharedCwd: string | undefined;
function emptyCwd(): string {
  sharedCwd ??= tempDir('cocoon-surfaces-cwd-');
  return sharedCwd;
}
process.once('exit', () => {
  if (sharedCwd) fs.rmSync(sharedCwd, { recursive: true, force: true });
});

/** An HTTP server on an ephemeral port answering with `handler`; closed with `close()`. */
export async function fakeServer(handler: http.RequestListener): Promise<{ url: string; close(): Promise<void> }> {
  const server = http.createServer(handler);
  const sockets = new Set<net.Socket>();
  server.on('connection', (s) => {
    sockets.add(s);
    s.once('close', () => sockets.delete(s));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as net.AddressInfo;
  return {
    url: `http://127.0.0.1:${port}`,
    close: () => new Promise<void>((resolve) => {
      for (const s of sockets) s.destroy();
      server.close(() => resolve());
    }),
  };
}

/** A port nothing listens on (bound, then closed). */
export async function closedPort(): Promise<number> {
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as net.AddressInfo;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

export { type Tree, writeTree };

/** The busybox sample: busybox httpd serving a page and a CGI script, EXPOSE 8080. */
export const BUSYBOX_APP: Tree = {
  Dockerfile: [
    'FROM busybox',
    'ENV GREETING="hello from cocoon"',
    'COPY www/ /www/',
    'COPY start.sh /start.sh',
    'EXPOSE 8080',
    'CMD ["/bin/sh", "/start.sh"]',
    '',
  ].join('\n'),
  'start.sh': { content: '#!/bin/sh\necho "app: starting httpd on 8080"\nexec httpd -f -v -p 8080 -h /www\n', mode: 0o755 },
  'www/index.html': '<!doctype html><title>Busybox app</title><h1>Hello from a Cocoon microVM</h1>\n',
  'www/cgi-bin/hello': { content: '#!/bin/sh\nprintf "Content-Type: text/plain\\r\\n\\r\\n"\necho "$GREETING"\n', mode: 0o755 },
};

/** The busybox app as a folder (removed by the caller). */
export function busyboxFolder(): string {
  const dir = tempDir('cocoon-surfaces-app-');
  writeTree(dir, BUSYBOX_APP);
  return dir;
}

/** The busybox app as a .tar.gz made by tar, as a user would. */
export async function busyboxTarGz(): Promise<Buffer> {
  const dir = busyboxFolder();
  try {
    const out = path.join(dir, '..', `${path.basename(dir)}.tar.gz`);
    await run('tar', ['-czf', out, '-C', dir, '.']);
    const bytes = fs.readFileSync(out);
    fs.rmSync(out, { force: true });
    return bytes;
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

function routesMissing(server: TestServer, wanted: Array<[string, string]>, branch: string): string | undefined {
  const missing = wanted.filter(([m, u]) => !server.has(m, u)).map(([m, u]) => `${m} ${u}`);
  return missing.length ? `waiting on the ${branch} branch: no ${missing.join(', ')}` : undefined;
}

/** Why image flows cannot run in this build (undefined: they can). */
export function imageRoutesMissing(server: TestServer): string | undefined {
  return routesMissing(server, [['POST', '/api/v1/bundles'], ['POST', '/api/v1/images'], ['GET', '/api/v1/images/:id/logs']], 'images');
}

/** Why exec, files and shell cannot be tested in this build (undefined: they can). */
export function execRoutesMissing(server: TestServer): string | undefined {
  return vmRoutesMissing(server)
    ?? routesMissing(server, [['POST', '/api/v1/microvms/:id/exec'], ['PUT', '/api/v1/microvms/:id/files']], 'exec-core');
}

/** Why flows that start microVMs cannot run in this build (undefined: they can). */
export function vmRoutesMissing(server: TestServer): string | undefined {
  return imageRoutesMissing(server)
    ?? routesMissing(server, [['POST', '/api/v1/microvms'], ['POST', '/api/v1/microvms/:id/tokens']], 'microvms');
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Debian's chromium, headless, driven by playwright-core (which downloads no browser). */
export const CHROMIUM = '/usr/bin/chromium';

export async function launchBrowser() {
  const { chromium } = await import('playwright-core');
  return chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-dev-shm-usage'],
  });
}

/** Where a test's screenshots go (test-artifacts/<name>/, gitignored, kept after the run). */
export function artifactDir(name: string): string {
  const dir = path.join(artifacts, name);
  fs.mkdirSync(dir, { recursive: true });
  return dir;
}
