import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createImage, transitionImage, type Image, type NewImage } from '../../src/store/images.ts';
import { log } from '../../src/common/log.ts';
import { migrate } from '../../src/store/migrations.ts';
import { DATABASE_FILE } from '../../src/store/open.ts';
import type { Db } from '../../src/store/sql.ts';
import { SqliteDb } from '../../src/store/sqlite.ts';
import { createTenant, type Tenant } from '../../src/store/tenants.ts';

/** Keeps test output clean; migrations log at info. */
export const quiet = log.child({}, { level: 'warn' });

interface HasAfter {
  after: (fn: () => Promise<void> | void) => void;
}

/** A fresh data directory, removed after the test whatever happens. */
export async function tempDataDir(t: HasAfter): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'cocoon-store-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

/** A migrated SQLite database in a temp directory, closed and removed after the test. */
export async function tempDb(t: HasAfter): Promise<{ db: SqliteDb; dir: string }> {
  const dir = await tempDataDir(t);
  const db = SqliteDb.open(join(dir, DATABASE_FILE));
  t.after(() => db.close());
  await migrate(db);
  return { db, dir };
}

let tenantCounter = 0;
export async function someTenant(db: Db, name = `tenant-${++tenantCounter}`): Promise<Tenant> {
  return createTenant(db, { name });
}

export function imageInput(tenantId: string, overrides: Partial<NewImage> = {}): NewImage {
  return {
    tenantId,
    region: 'local',
    name: 'web',
    bundleUri: `cocoon://bundles/${'0'.repeat(64)}.tar.gz`,
    vcpus: 1,
    memoryMiB: 256,
    diskMiB: 1024,
    port: 8080,
    readiness: { httpPath: '/health', timeoutSeconds: 120 },
    ...overrides,
  };
}

/** An image walked through the build states to READY. */
export async function readyImage(db: Db, tenantId: string, overrides: Partial<NewImage> = {}): Promise<Image> {
  const image = await createImage(db, imageInput(tenantId, overrides));
  await transitionImage(db, image.id, 'PENDING', 'BUILDING');
  await transitionImage(db, image.id, 'BUILDING', 'BOOTING');
  await transitionImage(db, image.id, 'BOOTING', 'SNAPSHOTTING');
  await transitionImage(db, image.id, 'SNAPSHOTTING', 'READY', { artifacts: { snapshot: 'snapshots/x' } });
  return { ...image, state: 'READY' };
}
