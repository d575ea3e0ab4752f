import { join } from 'node:path';
import { migrate, type MigrationReport } from './migrations.ts';
import { SqliteDb } from './sqlite.ts';

export const DATABASE_FILE = 'cocoon.db';

/**
 * Opens the metadata store at `$COCOON_DATA_DIR/cocoon.db` (creating it) and brings its schema
 * up to date. The returned handle is what every data-access function takes.
 */
export async function openMetadataStore(dataDir: string): Promise<{ db: SqliteDb; migrations: MigrationReport }> {
  const db = SqliteDb.open(join(dataDir, DATABASE_FILE));
  try {
    return { db, migrations: await migrate(db) };
  } catch (error) {
    db.close();
    throw error;
  }
}
