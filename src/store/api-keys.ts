import { CocoonError } from '../common/errors.ts';
import { newId } from './ids.ts';
import { isForeignKeyViolation, type Db } from './sql.ts';
import type { SecretSealer } from './sealed-secrets.ts';
import { API_KEY_PREFIX, displayPrefix, hashSecret, isPlausibleSecret, newSecret } from './secrets.ts';
import { toTenant, type Tenant } from './tenants.ts';
import { rowMapper } from './rows.ts';
import { iso } from './values.ts';

/** An API key as stored: the secret itself is shown once at creation and never kept. */
export interface ApiKey {
  id: string;
  tenantId: string;
  name: string | null;
  /** e.g. `cocoon_ak_Xy3q`, to recognise a key in a list. */
  prefix: string;
  createdAt: string;
  lastUsedAt: string | null;
  revokedAt: string | null;
}

interface ApiKeyRow {
  id: string;
  tenant_id: string;
  name: string | null;
  key_prefix: string;
  key_hash: string;
  created_at: string;
  last_used_at: string | null;
  revoked_at: string | null;
  sealed_secret?: string | null;
}

/** last_used_at is refreshed at most this often, so authentication is not a write per request. */
const LAST_USED_RESOLUTION_MS = 60_000;

const toApiKey = rowMapper<ApiKeyRow, ApiKey>({
  id: 'id', tenantId: 'tenant_id', name: 'name', prefix: 'key_prefix',
  createdAt: 'created_at', lastUsedAt: 'last_used_at', revokedAt: 'revoked_at',
});

export async function createApiKey(
  db: Db,
  tenantId: string,
  options: { name?: string; now?: Date; sealer?: SecretSealer } = {},
): Promise<{ apiKey: ApiKey; secret: string }> {
  const name = options.name ?? null;
  if (name !== null && (typeof name !== 'string' || name.length > 100)) {
    throw new CocoonError('invalid_request', 'an API key name is at most 100 characters', { status: 400 });
  }
  const now = options.now ?? new Date();
  const secret = newSecret(API_KEY_PREFIX);
  const row: ApiKeyRow = {
    id: newId('apiKey', now.getTime()), tenant_id: tenantId, name, key_prefix: displayPrefix(secret, API_KEY_PREFIX),
    key_hash: hashSecret(secret), created_at: iso(now), last_used_at: null, revoked_at: null,
  };
  // Without a sealer (tools, tests) the key works as a Bearer key but cannot sign AWS requests.
  const sealed = options.sealer ? options.sealer.seal(secret, row.id) : null;
  try {
    await db.run(
      'INSERT INTO api_keys (id, tenant_id, name, key_prefix, key_hash, created_at, sealed_secret) VALUES (?, ?, ?, ?, ?, ?, ?)',
      [row.id, row.tenant_id, row.name, row.key_prefix, row.key_hash, row.created_at, sealed],
    );
  } catch (error) {
    if (isForeignKeyViolation(error)) {
      throw new CocoonError('tenant_not_found', `no tenant '${tenantId}'`, { status: 404, cause: error });
    }
    throw error;
  }
  return { apiKey: toApiKey(row), secret };
}

/** The key and its tenant for a presented secret, or undefined if unknown or revoked. */
export async function authenticateApiKey(
  db: Db,
  secret: unknown,
  now: Date = new Date(),
): Promise<{ apiKey: ApiKey; tenant: Tenant } | undefined> {
  if (!isPlausibleSecret(secret, API_KEY_PREFIX)) return undefined;
  const row = await db.get<ApiKeyRow & { t_id: string; t_name: string; t_account_id: string; t_is_admin: number; t_created_at: string }>(
    `SELECT k.*, t.id AS t_id, t.name AS t_name, t.account_id AS t_account_id, t.is_admin AS t_is_admin,
            t.created_at AS t_created_at
       FROM api_keys k JOIN tenants t ON t.id = k.tenant_id
      WHERE k.key_hash = ? AND k.revoked_at IS NULL`,
    [hashSecret(secret)],
  );
  if (row === undefined) return undefined;
  if (row.last_used_at === null || now.getTime() - Date.parse(row.last_used_at) >= LAST_USED_RESOLUTION_MS) {
    row.last_used_at = iso(now);
    await db.run('UPDATE api_keys SET last_used_at = ? WHERE id = ?', [row.last_used_at, row.id]);
  }
  return {
    apiKey: toApiKey(row),
    tenant: toTenant({
      id: row.t_id, name: row.t_name, account_id: row.t_account_id, is_admin: row.t_is_admin, created_at: row.t_created_at,
    }),
  };
}

/**
 * An active key by its id, with its sealed secret (null when the key was made without one), for
 * verifiers that recompute a signature (AWS SigV4). Undefined when unknown or revoked.
 */
export async function findApiKeyForSigning(
  db: Db,
  id: string,
): Promise<{ apiKey: ApiKey; tenant: Tenant; sealedSecret: string | null } | undefined> {
  if (typeof id !== 'string' || id.length > 100) return undefined;
  const row = await db.get<ApiKeyRow & { t_id: string; t_name: string; t_account_id: string; t_is_admin: number; t_created_at: string }>(
    `SELECT k.*, t.id AS t_id, t.name AS t_name, t.account_id AS t_account_id, t.is_admin AS t_is_admin,
            t.created_at AS t_created_at
       FROM api_keys k JOIN tenants t ON t.id = k.tenant_id
      WHERE k.id = ? AND k.revoked_at IS NULL`,
    [id],
  );
  if (row === undefined) return undefined;
  return {
    apiKey: toApiKey(row),
    tenant: toTenant({ id: row.t_id, name: row.t_name, account_id: row.t_account_id, is_admin: row.t_is_admin, created_at: row.t_created_at }),
    sealedSecret: row.sealed_secret ?? null,
  };
}

export async function listApiKeys(db: Db, tenantId: string): Promise<ApiKey[]> {
  const rows = await db.all<ApiKeyRow>('SELECT * FROM api_keys WHERE tenant_id = ? ORDER BY id', [tenantId]);
  return rows.map(toApiKey);
}

/** Revokes at once; true if the key existed and was active. */
export async function revokeApiKey(db: Db, tenantId: string, id: string, now: Date = new Date()): Promise<boolean> {
  const result = await db.run(
    'UPDATE api_keys SET revoked_at = ? WHERE id = ? AND tenant_id = ? AND revoked_at IS NULL',
    [iso(now), id, tenantId],
  );
  return result.changes === 1;
}
