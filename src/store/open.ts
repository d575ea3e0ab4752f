import { join } from 'node:path';
import { log, type Logger } from '../common/log.ts';
import { migrate, type MigrationReport } from './migrations.ts';
import { SqliteDb } from './sqlite.ts';

export const DATABASE_FILE = 'cocoon.db';

/**
 * Opens the metadata store at `$COCOON_DATA_DIR/cocoon.db` (creating it) and brings its schema
 * up to date. The returned handle is what every data-access function takes.
 */
export async function openMetadataStore(
  dataDir: string,
  options: { logger?: Logger } = {},
): Promise<{ db: SqliteDb; migrations: MigrationReport }> {
  const logger = options.logger ?? log;
  const db = SqliteDb.open(join(dataDir, DATABASE_FILE));
  try {
    const migrations = await migrate(db);
    if (migrations.applied.length > 0) {
      logger.info({ path: db.path, applied: migrations.applied, version: migrations.version }, 'metadata store schema migrated');
    }
    return { db, migrations };
  } catch (error) {
    db.close();
    throw error;
  }
}
