/**
 * Test fixtures for the gateway: a recording guest (real node:http server on loopback), a
 * directory double with a slow, counted wake, and a gateway wired to them. Everything a
 * fixture opens is closed by `t.after`, also when the test fails.
 */
import http, { type IncomingMessage, type ServerResponse } from 'node:http';
import net, { type AddressInfo, type Socket } from 'node:net';
import { Writable } from 'node:stream';
import { pino } from 'pino';
import type { TestContext } from 'node:test';
import { createGateway, type Gateway, type GatewayOptions } from '../../src/gateway/gateway.ts';
import { createTokenVerifier } from '../../src/gateway/tokens.ts';
import type { AllowedPorts, MicroVMDirectory, MicroVMRoute, MicrovmState } from '../../src/gateway/types.ts';
import { createMicrovm } from '../../src/store/microvms.ts';
import type { Database } from '../../src/store/sql.ts';
import { createToken, revokeToken } from '../../src/store/tokens.ts';
import { readyImage, someTenant, tempDb } from '../store/helpers.ts';

export interface Received {
  method: string;
  url: string;
  headers: http.IncomingHttpHeaders;
  rawHeaders: string[];
  bodyBytes: number;
}

export interface Guest {
  port: number;
  server: http.Server;
  received: Received[];
}

export type GuestHandler = (req: IncomingMessage, res: ServerResponse, record: Received) => void;

/** Default guest: reads the body, answers JSON describing what it got. */
const echo: GuestHandler = (req, res, record) => {
  req.on('data', (c: Buffer) => (record.bodyBytes += c.length));
  req.on('end', () => {
    const body = JSON.stringify({ method: record.method, url: record.url, bodyBytes: record.bodyBytes });
    res.writeHead(200, { 'content-type': 'application/json', 'x-guest': 'yes' });
    res.end(body);
  });
};

export async function startGuest(t: TestContext, handler: GuestHandler = echo): Promise<Guest> {
  const received: Received[] = [];
  const sockets = new Set<Socket>();
  const server = http.createServer((req, res) => {
    const record: Received = { method: req.method ?? '', url: req.url ?? '', headers: req.headers, rawHeaders: req.rawHeaders, bodyBytes: 0 };
    received.push(record);
    handler(req, res, record);
  });
  server.on('connection', (s) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(async () => {
    for (const s of sockets) s.destroy();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  });
  return { port: (server.address() as AddressInfo).port, server, received };
}

export interface FakeVM {
  id: string;
  state: MicrovmState;
  appPort: number;
  autoResumeEnabled: boolean;
  /** guest port → host port */
  ports: Map<number, number>;
  /** The route's upstreamBacklog (absent: none named). */
  backlog?: number;
}

/** Directory double: in-memory records, a wake that takes `wakeDelayMs`, counters. */
export class FakeDirectory implements MicroVMDirectory {
  readonly vms = new Map<string, FakeVM>();
  wakeDelayMs = 0;
  wakeError: Error | undefined;
  ensureRunningCalls = 0;
  lookups = 0;
  started = 0;
  finished = 0;
  wsOpened = 0;
  wsClosed = 0;
  readonly #timers = new Set<NodeJS.Timeout>();

  add(vm: Partial<FakeVM> & { id: string; ports: Map<number, number> }): FakeVM {
    const full: FakeVM = { state: 'RUNNING', appPort: 8080, autoResumeEnabled: true, ...vm };
    this.vms.set(full.id, full);
    return full;
  }

  #route(vm: FakeVM): MicroVMRoute {
    const ports = new Map(vm.ports);
    return {
      id: vm.id,
      state: vm.state,
      appPort: vm.appPort,
      autoResumeEnabled: vm.autoResumeEnabled,
      upstreamHost: '127.0.0.1',
      upstreamPortFor: (p) => ports.get(p) ?? null,
      ...(vm.backlog !== undefined ? { upstreamBacklog: vm.backlog } : {}),
    };
  }

  lookup(id: string): MicroVMRoute | null {
    this.lookups++;
    const vm = this.vms.get(id);
    return vm === undefined ? null : this.#route(vm);
  }

  ensureRunning(id: string, signal: AbortSignal): Promise<MicroVMRoute> {
    this.ensureRunningCalls++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#timers.delete(timer);
        const vm = this.vms.get(id);
        if (this.wakeError !== undefined) return reject(this.wakeError);
        if (vm === undefined) return reject(new Error('gone'));
        vm.state = 'RUNNING';
        resolve(this.#route(vm));
      }, this.wakeDelayMs);
      this.#timers.add(timer);
      signal.addEventListener('abort', () => {
        clearTimeout(timer);
        this.#timers.delete(timer);
        reject(signal.reason);
      }, { once: true });
    });
  }

  requestStarted(): void {
    this.started++;
  }
  requestFinished(): void {
    this.finished++;
  }
  webSocketOpened(): void {
    this.wsOpened++;
  }
  webSocketClosed(): void {
    this.wsClosed++;
  }

  dispose(): void {
    for (const t of this.#timers) clearTimeout(t);
  }
}

export interface Fixture {
  gateway: Gateway;
  port: number;
  directory: FakeDirectory;
  /** The real token store (SQLite in a temp directory). */
  db: Database;
  now: { ms: number | undefined };
  /** Everything the gateway logged (at debug level). */
  logLines: string[];
  token(microvmId: string, opts?: { allowedPorts?: AllowedPorts; expirationMinutes?: number }): Promise<{ id: string; token: string }>;
  revoke(microvmId: string, tokenId: string): Promise<void>;
}

/**
 * The directory double names microVMs freely ('vm1'); tokens reference microVM rows, so a row
 * is made under that id (a real microVM renamed) the first time a token is issued for it.
 */
async function microvmRow(db: Database, id: string): Promise<string> {
  if (await db.get('SELECT 1 FROM microvms WHERE id = ?', [id])) return id;
  let tenant = await db.get<{ id: string }>("SELECT id FROM tenants WHERE name = 'gateway-tests'");
  tenant ??= await someTenant(db, 'gateway-tests');
  let image = await db.get<{ id: string }>("SELECT id FROM images WHERE tenant_id = ? AND state = 'READY'", [tenant.id]);
  image ??= await readyImage(db, tenant.id);
  const { microvm } = await createMicrovm(db, {
    tenantId: tenant.id, region: 'local', imageId: image.id, maximumDurationSeconds: 3600,
    idlePolicy: { autoResumeEnabled: true, maxIdleDurationSeconds: 300, suspendedDurationSeconds: null },
  });
  await db.run('UPDATE microvms SET id = ? WHERE id = ?', [id, microvm.id]);
  return id;
}

export async function startGateway(t: TestContext, options: Partial<GatewayOptions> = {}): Promise<Fixture> {
  const { db } = await tempDb(t);
  const now: { ms: number | undefined } = { ms: undefined };
  const directory = new FakeDirectory();
  const logLines: string[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _enc, cb) {
      logLines.push(chunk.toString('utf8'));
      cb();
    },
  });
  const gateway = createGateway({
    logger: pino({ level: 'debug' }, sink),
    directory,
    tokens: createTokenVerifier(db, { now: () => now.ms ?? Date.now() }),
    ...options,
  });
  const { port } = await gateway.listen(0, '127.0.0.1');
  t.after(async () => {
    directory.dispose();
    await gateway.close();
  });
  return {
    gateway,
    port,
    logLines,
    directory,
    db,
    now,
    async token(microvmId, opts = {}) {
      await microvmRow(db, microvmId);
      const tenant = (await db.get<{ tenant_id: string }>('SELECT tenant_id FROM microvms WHERE id = ?', [microvmId]))!;
      const allowedPorts = opts.allowedPorts === undefined || opts.allowedPorts === 'all' ? null : [...opts.allowedPorts];
      const issued = await createToken(db, { microvmId, tenantId: tenant.tenant_id, allowedPorts, expirationMinutes: opts.expirationMinutes });
      return { id: issued.token.id, token: issued.secret };
    },
    async revoke(microvmId, tokenId) {
      await revokeToken(db, microvmId, tokenId);
    },
  };
}

export interface Answer {
  status: number;
  headers: http.IncomingHttpHeaders;
  body: string;
}

/** One request on a fresh connection (no agent), body fully read. */
export function request(
  port: number,
  o: { method?: string; path?: string; headers?: Record<string, string | string[]>; body?: string | Buffer } = {},
): Promise<Answer> {
  return new Promise((resolve, reject) => {
    const req = http.request(
      { host: '127.0.0.1', port, method: o.method ?? 'GET', path: o.path ?? '/', headers: o.headers, agent: false },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks).toString('utf8') }));
        res.on('error', reject);
      },
    );
    req.on('error', reject);
    req.end(o.body);
  });
}

export function errorCode(a: Answer): string | undefined {
  try {
    return (JSON.parse(a.body) as { error?: { code?: string } }).error?.code;
  } catch {
    return undefined;
  }
}

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Writes raw bytes on a fresh connection; answers all it receives until the server closes. */
export function rawExchange(port: number, data: string, timeoutMs = 5000): Promise<string> {
  return new Promise((resolve, reject) => {
    const s = net.connect(port, '127.0.0.1');
    const chunks: Buffer[] = [];
    const timer = setTimeout(() => {
      s.destroy();
      reject(new Error('rawExchange timed out'));
    }, timeoutMs);
    s.on('data', (c: Buffer) => chunks.push(c));
    s.on('error', () => {});
    s.on('close', () => {
      clearTimeout(timer);
      resolve(Buffer.concat(chunks).toString('utf8'));
    });
    s.write(data);
  });
}
