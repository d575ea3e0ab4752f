/**
 * The composition root: one process runs every role (api, builder, lifecycle, gateway) by
 * default. It opens the data directory, the metadata store and the object store, makes sure an
 * admin API key exists, and starts the API and the gateway.
 */
import fs from 'node:fs';
import path from 'node:path';
import type { FastifyInstance } from 'fastify';
import { type ApiContext, type ApiRoutes, buildApiServer } from './api/app.ts';
import { isCocoonError } from './common/errors.ts';
import { log } from './common/log.ts';
import type { CocoonConfig } from './config/config.ts';
import { objectStoreFromEnv } from './objectstore/factory.ts';
import { sharedSnapshotStore } from './snapshots/mode.ts';
import { createApiKey } from './store/api-keys.ts';
import { openMetadataStore } from './store/open.ts';
import { sealerForDataDir } from './store/sealed-secrets.ts';
import type { Database } from './store/sql.ts';
import { createTenant, findTenantByName } from './store/tenants.ts';

export const ADMIN_KEY_FILE = 'admin-api-key';
/** Where a running server says its API listens, so that `cocoon` finds it from the data directory. */
export const API_URL_FILE = 'api-url';
const ADMIN_TENANT = 'admin';

export interface RunningServer {
  config: CocoonConfig;
  db: Database;
  api: FastifyInstance;
  apiUrl: string;
  /** Present only on the first start: the admin key, also written to `$COCOON_DATA_DIR/admin-api-key`. */
  newAdminKey: string | undefined;
  close(): Promise<void>;
}

/** Subsystems add their routes and start/stop work here (images, microVMs, gateway...). */
export interface ServerModule {
  routes?: ApiRoutes;
  /** Routes outside `/api/v1` (compatibility surfaces such as `/e2b`); they do their own auth. */
  rootRoutes?: ApiRoutes;
  start?(context: ApiContext): Promise<void>;
  /** Once the API listens (its port is known: `apiPort`), in module order; a throw stops the start. */
  listening?(context: ApiContext, listen: { apiPort: number }): Promise<void>;
  stop?(): Promise<void>;
}

export async function startServer(config: CocoonConfig, modules: ServerModule[] = []): Promise<RunningServer> {
  fs.mkdirSync(config.dataDir, { recursive: true, mode: 0o700 });
  const { db } = await openMetadataStore(config.dataDir, { databaseUrl: config.databaseUrl });
  let ready = false;
  const objects = objectStoreFromEnv({ ...process.env, COCOON_DATA_DIR: config.dataDir });
  const context: ApiContext = {
    config,
    db,
    objects,
    snapshots: sharedSnapshotStore(config.databaseUrl, objects),
    ready: () => ready,
    // A module that runs the gateway says where (the microVM module exposes `gatewayPort`).
    gatewayPort: () => {
      for (const module of modules) {
        const port = (module as { gatewayPort?: unknown }).gatewayPort;
        if (typeof port === 'number' && port > 0) return port;
      }
      return null;
    },
  };
  const newAdminKey = await ensureAdminKey(db, config.dataDir);
  const api = await buildApiServer(
    context,
    modules.flatMap((m) => (m.routes ? [m.routes] : [])),
    modules.flatMap((m) => (m.rootRoutes ? [m.rootRoutes] : [])),
  );
  const started: ServerModule[] = [];
  try {
    for (const module of modules) {
      await module.start?.(context);
      started.push(module);
    }
    await api.listen({ port: config.apiPort, host: config.host });
    const bound = api.server.address();
    const apiPort = typeof bound === 'object' && bound ? bound.port : config.apiPort;
    for (const module of modules) await module.listening?.(context, { apiPort });
  } catch (error) {
    for (const module of started.reverse()) await module.stop?.();
    await api.close();
    await db.close();
    throw error;
  }
  ready = true;
  const address = api.server.address();
  const port = typeof address === 'object' && address ? address.port : config.apiPort;
  const apiUrl = `http://${config.host.includes(':') ? `[${config.host}]` : config.host}:${port}`;
  const urlFile = path.join(config.dataDir, API_URL_FILE);
  fs.writeFileSync(urlFile, apiUrl + '\n', { mode: 0o644 });
  log.info({ api: apiUrl, dataDir: config.dataDir }, 'cocoon is up');
  return {
    config,
    db,
    api,
    apiUrl,
    newAdminKey,
    async close() {
      ready = false;
      try {
        if (fs.readFileSync(urlFile, 'utf8').trim() === apiUrl) fs.rmSync(urlFile, { force: true });
      } catch {
        // already gone
      }
      await api.close();
      for (const module of [...modules].reverse()) await module.stop?.();
      await db.close();
    },
  };
}

/** Creates the admin tenant and key on first start; the key goes to a 0600 file. */
async function ensureAdminKey(db: Database, dataDir: string): Promise<string | undefined> {
  const keyFile = path.join(dataDir, ADMIN_KEY_FILE);
  if (await findTenantByName(db, ADMIN_TENANT)) return undefined;
  let tenant;
  try {
    tenant = await createTenant(db, { name: ADMIN_TENANT, isAdmin: true });
  } catch (error) {
    // Another host starting on the same database at the same moment made it first: its key is
    // in that host's data directory (docs/cluster.md), and this host has nothing to create.
    if (isCocoonError(error, 'tenant_exists')) return undefined;
    throw error;
  }
  const { secret } = await createApiKey(db, tenant.id, { name: 'admin', sealer: sealerForDataDir(dataDir) });
  fs.writeFileSync(keyFile, secret + '\n', { mode: 0o600 });
  return secret;
}
