/**
 * One "process migrating the database" for the migration-lock case: waits until the agreed
 * moment (so that all start together), migrates with one extra, slow step, prints what it applied.
 *   node migrate-child.ts <dataDir> <databaseUrl or ''> <start at, ms since the epoch>
 */
import { migrate, MIGRATIONS, type Migration } from '../../../src/store/migrations.ts';
import { openDatabase } from '../../../src/store/open.ts';

export const SLOW_STEP: Migration = {
  version: MIGRATIONS.length + 1,
  name: 'lock probe',
  // Slow enough (a few hundred ms on both engines) that the racers overlap.
  sql: `CREATE TABLE lock_probe AS
          WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 300000)
          SELECT count(*) AS n FROM c`,
};

const [dataDir, url, startAt] = process.argv.slice(2) as [string, string, string];
const db = await openDatabase(dataDir, url === '' ? undefined : url);
try {
  await new Promise((resolve) => setTimeout(resolve, Math.max(0, Number(startAt) - Date.now())));
  const report = await migrate(db, [...MIGRATIONS, SLOW_STEP]);
  process.stdout.write(JSON.stringify(report.applied));
} finally {
  await db.close();
}
