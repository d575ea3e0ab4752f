import { CocoonError } from '../common/errors.ts';
import { BUNDLE_FORMATS, type BundleFormat } from '../objectstore/bundle-ref.ts';
import { newId } from './ids.ts';
import { decodeCursor, pageLimit, toPage, type Page, type PageRequest } from './pagination.ts';
import { isForeignKeyViolation, type Db } from './sql.ts';
import { rowMapper } from './rows.ts';
import { iso } from './values.ts';

/**
 * A bundle a tenant uploaded. The bytes are content-addressed in the object store and shared
 * between tenants who upload the same file; this row is what gives a tenant the right to use
 * them, so an image may only name a `cocoon://` bundle its tenant has a row for.
 */
export interface Bundle {
  id: string;
  tenantId: string;
  sha256: string;
  format: BundleFormat;
  sizeBytes: number;
  uri: string;
  createdAt: string;
}

interface BundleRow {
  id: string;
  tenant_id: string;
  sha256: string;
  format: BundleFormat;
  size_bytes: number;
  uri: string;
  created_at: string;
}

const toBundle = rowMapper<BundleRow, Bundle>({
  id: 'id', tenantId: 'tenant_id', sha256: 'sha256', format: 'format', sizeBytes: 'size_bytes', uri: 'uri', createdAt: 'created_at',
});

/** Records an upload; uploading the same bytes again returns the existing row. */
export async function recordBundle(
  db: Db,
  input: { tenantId: string; sha256: string; format: BundleFormat; sizeBytes: number; uri: string; now?: Date },
): Promise<Bundle> {
  if (!/^[0-9a-f]{64}$/.test(input.sha256)) throw new Error(`not a sha256: ${input.sha256}`);
  if (!BUNDLE_FORMATS.includes(input.format)) throw new Error(`not a bundle format: ${input.format}`);
  if (!Number.isSafeInteger(input.sizeBytes) || input.sizeBytes < 0) throw new Error(`bad size: ${input.sizeBytes}`);
  const now = input.now ?? new Date();
  try {
    await db.run(
      `INSERT INTO bundles (id, tenant_id, sha256, format, size_bytes, uri, created_at)
       VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (tenant_id, sha256) DO NOTHING`,
      [newId('bundle', now.getTime()), input.tenantId, input.sha256, input.format, input.sizeBytes, input.uri, iso(now)],
    );
  } catch (error) {
    if (isForeignKeyViolation(error)) {
      throw new CocoonError('tenant_not_found', `no tenant '${input.tenantId}'`, { status: 404, cause: error });
    }
    throw error;
  }
  return (await findBundle(db, input.tenantId, input.sha256)) as Bundle;
}

export async function findBundle(db: Db, tenantId: string, sha256: string): Promise<Bundle | undefined> {
  const row = await db.get<BundleRow>('SELECT * FROM bundles WHERE tenant_id = ? AND sha256 = ?', [tenantId, sha256]);
  return row && toBundle(row);
}

export async function listBundles(db: Db, tenantId: string, page: PageRequest = {}): Promise<Page<Bundle>> {
  const limit = pageLimit(page.limit);
  const cursor = decodeCursor(page.cursor);
  const rows = await db.all<BundleRow>(
    `SELECT * FROM bundles WHERE tenant_id = ? ${cursor ? 'AND id < ?' : ''} ORDER BY id DESC LIMIT ?`,
    cursor ? [tenantId, cursor, limit + 1] : [tenantId, limit + 1],
  );
  return toPage(rows.map(toBundle), limit);
}
