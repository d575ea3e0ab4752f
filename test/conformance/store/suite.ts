import type { TestContext } from 'node:test';
import type { Database, DialectName } from '../../../src/store/sql.ts';

/**
 * What a store conformance case gets: the dialect under test and fresh databases of it. The
 * cases (one file per area beside this one) are written once and run once per dialect by
 * test/conformance/store.test.ts; a case that cannot hold for a dialect is skipped there, by
 * name, with the reason.
 */
export interface StoreSuite {
  dialect: DialectName;
  /** Registers a case (skipped with its reason where the dialect declares a skip for it). */
  it(name: string, fn: (t: TestContext) => Promise<void> | void): void;
  /** A fresh, migrated database, closed (and dropped) after the test. */
  tempDb(t: TestContext): Promise<{ db: Database }>;
  /** A fresh database without schema: where it is (as the server's settings name it), and a way to open it, again and again. */
  emptyDb(t: TestContext): Promise<EmptyDb>;
  /** The tables the database holds, sorted. */
  tables(db: Database): Promise<string[]>;
  /** Restarts the database server (PostgreSQL); undefined where there is none. */
  restartServer?: () => Promise<void>;
}

export interface EmptyDb {
  dataDir: string;
  /** undefined: SQLite in `dataDir`. */
  databaseUrl: string | undefined;
  /** Opens it (not migrated); the handle is closed after the test. */
  open(): Promise<Database>;
}
