/**
 * The AWS surface's own rows (store migration 7): per image version the AWS-only members of the
 * request as given, its ACTIVE/INACTIVE status and clientToken; tags per image name.
 */
import type { Db } from '../../store/sql.ts';

/** The members of CreateMicrovmImage / UpdateMicrovmImage kept as given (Cocoon's image has the rest). */
export interface VersionSpec {
  baseImageArn?: string;
  baseImageVersion?: string;
  buildRoleArn?: string;
  description?: string;
  logging?: Record<string, unknown>;
  additionalOsCapabilities?: string[];
  /** The model's `hooks` as given (Cocoon's image keeps them as httpHooks). */
  hooks?: Record<string, unknown>;
}

export type VersionStatus = 'ACTIVE' | 'INACTIVE';

export interface VersionRecord {
  imageId: string;
  spec: VersionSpec;
  status: VersionStatus;
  clientToken: string | null;
  requestHash: string | null;
}

interface Row {
  image_id: string;
  spec: string;
  status: string;
  client_token: string | null;
  request_hash: string | null;
}

function toRecord(row: Row): VersionRecord {
  let spec: VersionSpec = {};
  try {
    const parsed: unknown = JSON.parse(row.spec);
    if (typeof parsed === 'object' && parsed !== null && !Array.isArray(parsed)) spec = parsed as VersionSpec;
  } catch {
    // a damaged row shows Cocoon's defaults
  }
  return { imageId: row.image_id, spec, status: row.status === 'INACTIVE' ? 'INACTIVE' : 'ACTIVE', clientToken: row.client_token, requestHash: row.request_hash };
}

export async function recordVersion(db: Db, input: { imageId: string; tenantId: string; spec: VersionSpec; clientToken: string | null; requestHash: string | null }): Promise<void> {
  await db.run(
    'INSERT INTO aws_image_versions (image_id, tenant_id, spec, status, client_token, request_hash) VALUES (?, ?, ?, ?, ?, ?)',
    [input.imageId, input.tenantId, JSON.stringify(input.spec), 'ACTIVE', input.clientToken, input.requestHash],
  );
}

/** The records of these images (versions made through Cocoon's own API have none). */
export async function versionRecords(db: Db, imageIds: readonly string[]): Promise<Map<string, VersionRecord>> {
  const out = new Map<string, VersionRecord>();
  // In chunks, to stay under SQL parameter limits.
  for (let i = 0; i < imageIds.length; i += 500) {
    const chunk = imageIds.slice(i, i + 500);
    const rows = await db.all<Row>(`SELECT * FROM aws_image_versions WHERE image_id IN (${chunk.map(() => '?').join(', ')})`, chunk);
    for (const row of rows) out.set(row.image_id, toRecord(row));
  }
  return out;
}

export async function findVersionByClientToken(db: Db, tenantId: string, clientToken: string): Promise<VersionRecord | undefined> {
  const row = await db.get<Row>('SELECT * FROM aws_image_versions WHERE tenant_id = ? AND client_token = ?', [tenantId, clientToken]);
  return row && toRecord(row);
}

/** Sets a version's status, making its record when the version was made through Cocoon's own API. */
export async function setVersionStatus(db: Db, tenantId: string, imageId: string, status: VersionStatus): Promise<void> {
  await db.run(
    `INSERT INTO aws_image_versions (image_id, tenant_id, status) VALUES (?, ?, ?)
     ON CONFLICT (image_id) DO UPDATE SET status = excluded.status`,
    [imageId, tenantId, status],
  );
}

export const MAX_TAGS = 50;

export async function getTags(db: Db, tenantId: string, name: string): Promise<Record<string, string>> {
  const row = await db.get<{ tags: string }>('SELECT tags FROM aws_tags WHERE tenant_id = ? AND name = ?', [tenantId, name]);
  if (!row) return {};
  try {
    return JSON.parse(row.tags) as Record<string, string>;
  } catch {
    return {};
  }
}

export async function setTags(db: Db, tenantId: string, name: string, tags: Record<string, string>): Promise<void> {
  if (Object.keys(tags).length === 0) {
    await db.run('DELETE FROM aws_tags WHERE tenant_id = ? AND name = ?', [tenantId, name]);
    return;
  }
  await db.run(
    `INSERT INTO aws_tags (tenant_id, name, tags) VALUES (?, ?, ?)
     ON CONFLICT (tenant_id, name) DO UPDATE SET tags = excluded.tags`,
    [tenantId, name, JSON.stringify(tags)],
  );
}
