import { join } from 'node:path';
import { CocoonError } from '../common/errors.ts';
import { log, type Logger } from '../common/log.ts';
import { migrate, type MigrationReport } from './migrations.ts';
import { PostgresDb, redact } from './postgres.ts';
import type { Database } from './sql.ts';
import { SqliteDb } from './sqlite.ts';

export const DATABASE_FILE = 'cocoon.db';

/**
 * Opens the metadata store and brings its schema up to date. The returned handle is what every
 * data-access function takes.
 *
 * Which database: `databaseUrl` (the server passes `COCOON_DATABASE_URL`) when it names one,
 * `postgres://…` or `postgresql://…` for PostgreSQL (several hosts sharing one database);
 * otherwise SQLite at `<dataDir>/cocoon.db`, the zero-setup default for one host.
 */
export async function openMetadataStore(
  dataDir: string,
  options: { logger?: Logger; databaseUrl?: string | undefined } = {},
): Promise<{ db: Database; migrations: MigrationReport }> {
  const logger = options.logger ?? log;
  const db = await openDatabase(dataDir, options.databaseUrl);
  try {
    const migrations = await migrate(db);
    if (migrations.applied.length > 0) {
      logger.info({ location: db.location, applied: migrations.applied, version: migrations.version }, 'metadata store schema migrated');
    }
    return { db, migrations };
  } catch (error) {
    await db.close();
    throw error;
  }
}

/** The database `databaseUrl` names (not migrated): see `openMetadataStore`. */
export async function openDatabase(dataDir: string, databaseUrl: string | undefined): Promise<Database> {
  if (databaseUrl === undefined || databaseUrl === '') return SqliteDb.open(join(dataDir, DATABASE_FILE));
  checkDatabaseUrl(databaseUrl);
  try {
    return await PostgresDb.open(databaseUrl);
  } catch (error) {
    throw new CocoonError(
      'database_unavailable',
      `cannot connect to the PostgreSQL database at ${redact(databaseUrl)}: ${(error as Error).message}; ` +
        'check COCOON_DATABASE_URL and that the server is running',
      { status: 503, cause: error },
    );
  }
}

/** Refuses a COCOON_DATABASE_URL that names no database this Cocoon can open. */
export function checkDatabaseUrl(databaseUrl: string): void {
  if (!/^postgres(ql)?:\/\//.test(databaseUrl)) {
    throw new CocoonError(
      'invalid_config',
      `COCOON_DATABASE_URL must be a postgres:// or postgresql:// URL (or unset for SQLite in the data directory), got ${redact(databaseUrl)}`,
    );
  }
}
