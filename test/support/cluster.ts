/**
 * A test file's cluster hosts on one private PostgreSQL server (test/support/postgres.ts).
 *
 * `useClusterDatabase()`, called at a file's top level, registers its own `before` and `after`:
 * PostgreSQL starts before the file's tests, and at the end every host the file started through
 * it (in-process servers, daemons) and everything it was told to end (a store handle) is stopped
 * first, in the reverse order of their start, even when a test failed, and only then PostgreSQL
 * (a host whose database went away first would spend its close on reconnects and errors). The
 * data directories of in-process hosts are removed after their server closed.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before } from 'node:test';
import { loadConfig } from '../../src/config/config.ts';
import { defaultModules } from '../../src/modules.ts';
import { startServer, type RunningServer } from '../../src/server.ts';
import type { Db } from '../../src/store/sql.ts';
import { spawnDaemon, type Daemon } from './daemon.ts';
import { PostgresServer } from './postgres.ts';

export interface ClusterDatabase {
  /** A new, empty database on the file's PostgreSQL server: its URL. */
  createDatabase(name: string): Promise<string>;
  /**
   * A host in this process (the default modules, TCG) on a new data directory `cocoon-<prefix>-<id>-*`,
   * closed and its directory removed at the end (a test may close it before: it closes once).
   */
  host(databaseUrl: string, id: string, options?: { env?: Record<string, string>; prefix?: string }): Promise<RunningServer>;
  /** A host in a process of its own (test/support/daemon.ts) on `dataDir`, stopped (SIGTERM) at the end. */
  daemon(dataDir: string, env: Record<string, string>): Promise<Daemon>;
  /** Something else to end before PostgreSQL stops (a store handle the test opened). */
  onEnd(end: () => unknown): void;
}

export function useClusterDatabase(): ClusterDatabase {
  let postgres: PostgresServer | undefined;
  const ends: Array<() => unknown> = [];
  before(async () => {
    postgres = await PostgresServer.start();
  });
  after(async () => {
    // Each one whatever the others did; PostgreSQL last.
    for (const end of ends.reverse()) await Promise.resolve().then(end).catch(() => undefined);
    await postgres?.stop();
  });
  return {
    createDatabase(name) {
      if (!postgres) throw new Error('PostgreSQL is not started: call useClusterDatabase() at the top level of the test file');
      return postgres.createDatabase(name);
    },
    async host(databaseUrl, id, options = {}) {
      const dataDir = await mkdtemp(path.join(tmpdir(), `cocoon-${options.prefix ?? 'cluster'}-${id}-`));
      ends.push(() => rm(dataDir, { recursive: true, force: true }));
      const server = await startServer(
        { ...loadConfig({ COCOON_DATA_DIR: dataDir, COCOON_DATABASE_URL: databaseUrl, COCOON_HOST_ID: id, COCOON_ACCEL: 'tcg', ...options.env }), apiPort: 0, gatewayPort: 0 },
        defaultModules(),
      );
      // Closed once, whether a test closed it already (a host gone) or not.
      const close = server.close.bind(server);
      let closing: Promise<void> | undefined;
      server.close = () => (closing ??= close());
      ends.push(() => server.close());
      return server;
    },
    async daemon(dataDir, env) {
      const daemon = await spawnDaemon(dataDir, env);
      ends.push(() => daemon.stop());
      return daemon;
    },
    onEnd(end) {
      ends.push(end);
    },
  };
}

/**
 * The host whose lease a microVM's launch took: a launch may still be queued when the API
 * answered, so the row is read until it names one (null if none did within 10 s).
 */
export async function ownerOf(db: Db, microvmId: string): Promise<string | null> {
  for (let i = 0; i < 200; i++) {
    const row = await db.get<{ host_id: string | null }>('SELECT host_id FROM microvms WHERE id = ?', [microvmId]);
    if (row?.host_id) return row.host_id;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  return null;
}
