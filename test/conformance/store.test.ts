/**
 * The store conformance suite: the same cases (test/conformance/store/*.ts) against every
 * dialect: SQLite (a file in a temp directory) and PostgreSQL (a private server under a temp
 * directory, test/support/postgres.ts; one database per test). A dialect declares here, by case
 * name, what it skips and why.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test, type TestContext } from 'node:test';
import { migrate } from '../../src/store/migrations.ts';
import { openDatabase } from '../../src/store/open.ts';
import type { Database, DialectName } from '../../src/store/sql.ts';
import { PostgresServer } from '../support/postgres.ts';
import e2bSandboxes from './store/e2b-sandboxes.ts';
import events from './store/events.ts';
import hosts from './store/hosts.ts';
import images from './store/images.ts';
import migrations from './store/migrations.ts';
import microvms from './store/microvms.ts';
import properties from './store/properties.ts';
import type { EmptyDb, StoreSuite } from './store/suite.ts';
import tenants from './store/tenants.ts';
import tokens from './store/tokens.ts';
import transactions from './store/transactions.ts';

const CASES = [tenants, images, microvms, tokens, events, e2bSandboxes, properties, transactions, migrations, hosts];

/** Case name → why this dialect cannot run it. */
const SKIPS: Record<DialectName, Record<string, string>> = {
  sqlite: {
    'the server restarting: the pool reconnects and nothing committed is lost':
      'SQLite is a file opened in-process: there is no server to restart',
    'two handles on one database (two hosts) racing a compare-and-set: exactly one wins':
      "node:sqlite is synchronous: a second handle in the same process waiting for the first one's write lock " +
      'blocks the event loop the first one needs to finish; across processes the file lock decides (see the migration-lock case)',
    'two handles on one database (two hosts) racing for one lease: exactly one wins':
      'as above: two node:sqlite handles cannot wait on each other in one process; a cluster runs on PostgreSQL, ' +
      'and on one handle the racing acquires are the case "many acquires of one lease at once"',
  },
  postgres: {},
};

async function tempDir(t: TestContext): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'cocoon-store-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

function suiteFor(dialect: DialectName, server: () => PostgresServer | undefined): StoreSuite {
  const emptyDb = async (t: TestContext): Promise<EmptyDb> => {
    const dataDir = await tempDir(t);
    const pg = server();
    const databaseUrl = pg ? await pg.createDatabase(dialect) : undefined;
    return {
      dataDir,
      databaseUrl,
      async open() {
        const db = await openDatabase(dataDir, databaseUrl);
        t.after(() => db.close());
        return db;
      },
    };
  };
  return {
    dialect,
    it(name, fn) {
      const skip = SKIPS[dialect][name];
      test(name, skip ? { skip } : {}, fn);
    },
    emptyDb,
    async tempDb(t) {
      const db = await (await emptyDb(t)).open();
      await migrate(db);
      return { db };
    },
    async tables(db: Database) {
      const rows = dialect === 'sqlite'
        ? await db.all<{ name: string }>("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
        : await db.all<{ name: string }>("SELECT table_name AS name FROM information_schema.tables WHERE table_schema = 'public'");
      return rows.map((r) => r.name).sort();
    },
    ...(dialect === 'postgres' ? { restartServer: () => (server() as PostgresServer).restart() } : {}),
  };
}

describe('store on SQLite', () => {
  const suite = suiteFor('sqlite', () => undefined);
  for (const define of CASES) define(suite);
});

describe('store on PostgreSQL', () => {
  let server: PostgresServer | undefined;
  before(async () => { server = await PostgresServer.start(); });
  after(async () => { await server?.stop(); });
  const suite = suiteFor('postgres', () => server);
  for (const define of CASES) define(suite);
});
