/**
 * A real Cocoon server for microVM tests: startServer with the microVM module, API and gateway
 * on ephemeral ports, a temp data directory; plus small clients for the API and the gateway.
 * Everything is stopped and removed after the test (or suite), also when it fails.
 */
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { loadConfig } from '../../src/config/config.ts';
import { microvmModule, type MicrovmModule, type MicrovmModuleOptions } from '../../src/wiring/microvms.ts';
import { ADMIN_KEY_FILE, startServer, type RunningServer, type ServerModule } from '../../src/server.ts';
import { findTenantByName } from '../../src/store/tenants.ts';
import { cleanupDir, tempDir } from './vm.ts';

export interface Answer {
  status: number;
  headers: http.IncomingHttpHeaders;
  body: string;
}

export interface Json {
  status: number;
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  body: any;
}

/** One HTTP exchange on a fresh connection; the body fully read. */
export function request(
  port: number,
  o: { method?: string; path?: string; headers?: Record<string, string>; body?: string | Buffer; timeoutMs?: number } = {},
): Promise<Answer> {
  return new Promise((resolve, reject) => {
    const req = http.request(
      { host: '127.0.0.1', port, method: o.method ?? 'GET', path: o.path ?? '/', headers: o.headers, agent: false, timeout: o.timeoutMs ?? 120_000 },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks).toString('utf8') }));
        res.on('error', reject);
      },
    );
    req.on('timeout', () => req.destroy(new Error(`request to :${port}${o.path ?? '/'} timed out`)));
    req.on('error', reject);
    req.end(o.body);
  });
}

export interface ApiClient {
  (method: string, route: string, body?: unknown, key?: string): Promise<Json>;
}

export function apiClient(apiUrl: string, apiKey: string): ApiClient {
  const port = Number(new URL(apiUrl).port);
  return async (method, route, body, key = apiKey) => {
    const headers: Record<string, string> = { authorization: `Bearer ${key}` };
    if (body !== undefined) headers['content-type'] = 'application/json';
    const answer = await request(port, { method, path: `/api/v1${route}`, headers, ...(body !== undefined ? { body: JSON.stringify(body) } : {}) });
    let parsed: unknown = answer.body;
    try {
      parsed = answer.body ? JSON.parse(answer.body) : undefined;
    } catch {
      // text
    }
    return { status: answer.status, body: parsed };
  };
}

/** A request through the gateway to a microVM (routed by Host: <id>.vm.localhost). */
export function gatewayRequest(
  gatewayPort: number,
  microvmId: string,
  token: string | undefined,
  route: string,
  o: { method?: string; headers?: Record<string, string>; body?: string | Buffer; port?: number } = {},
): Promise<Answer> {
  const headers: Record<string, string> = { host: `${microvmId}.vm.localhost:${gatewayPort}`, ...o.headers };
  if (token !== undefined) headers['x-cocoon-token'] = token;
  if (o.port !== undefined) headers['x-cocoon-port'] = String(o.port);
  return request(gatewayPort, { method: o.method ?? 'GET', path: route, headers, ...(o.body !== undefined ? { body: o.body } : {}) });
}

export interface TestServer {
  server: RunningServer;
  module: MicrovmModule;
  dataDir: string;
  adminKey: string;
  adminTenantId: string;
  api: ApiClient;
  gatewayPort: number;
  /** GET through the gateway; throws unless 200; answers the trimmed body. */
  get(microvmId: string, token: string, route: string, o?: { port?: number }): Promise<string>;
  close(): Promise<void>;
}

/** `modules`: more server modules, started before the microVM module (e.g. the images module, for its routes). */
export async function startTestServer(
  o: { dataDir?: string; options?: MicrovmModuleOptions; env?: Record<string, string>; modules?: ServerModule[] } = {},
): Promise<TestServer> {
  const dataDir = o.dataDir ?? tempDir('cocoon-mvm-');
  const config = { ...loadConfig({ COCOON_DATA_DIR: dataDir, ...o.env }), apiPort: 0, gatewayPort: 0 };
  const module = microvmModule(o.options);
  const server = await startServer(config, [...(o.modules ?? []), module]);
  const adminKey = fs.readFileSync(path.join(dataDir, ADMIN_KEY_FILE), 'utf8').trim();
  const admin = await findTenantByName(server.db, 'admin');
  const gatewayPort = module.gatewayPort;
  let closed = false;
  return {
    server,
    module,
    dataDir,
    adminKey,
    adminTenantId: admin!.id,
    api: apiClient(server.apiUrl, adminKey),
    gatewayPort,
    async get(microvmId, token, route, opts = {}) {
      const answer = await gatewayRequest(gatewayPort, microvmId, token, route, opts);
      if (answer.status !== 200) throw new Error(`GET ${route} through the gateway: ${answer.status} ${answer.body}`);
      return answer.body.trim();
    },
    async close() {
      if (closed) return;
      closed = true;
      await server.close();
    },
  };
}

/** Stops the server and removes its data directory, killing any QEMU left under it; answers leaked pids. */
export async function stopTestServer(server: TestServer | undefined, dataDir: string): Promise<number[]> {
  try {
    await server?.close();
  } finally {
    // cleanupDir kills leftovers: a failing test must not leak QEMU processes.
  }
  return cleanupDir(dataDir);
}
