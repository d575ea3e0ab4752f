import { randomInt } from 'node:crypto';
import { CocoonError } from '../common/errors.ts';
import { appendEvent } from './events.ts';
import { newId } from './ids.ts';
import { decodeCursor, pageLimit, toPage, type Page, type PageRequest } from './pagination.ts';
import { boolColumn, insertRow, rowMapper } from './rows.ts';
import type { Db } from './sql.ts';
import { invalid, iso } from './values.ts';

/** Who owns images and microVMs. `accountId` (12 digits) is the account field of the tenant's ARNs. */
export interface Tenant {
  id: string;
  name: string;
  accountId: string;
  isAdmin: boolean;
  createdAt: string;
}

interface TenantRow {
  id: string;
  name: string;
  account_id: string;
  is_admin: number;
  created_at: string;
}

export const TENANT_NAME = /^[a-z0-9][a-z0-9._-]{0,62}$/;

export const toTenant = rowMapper<TenantRow, Tenant>({
  id: 'id', name: 'name', accountId: 'account_id', isAdmin: boolColumn('is_admin'), createdAt: 'created_at',
});

export async function createTenant(db: Db, input: { name: string; isAdmin?: boolean; now?: Date }): Promise<Tenant> {
  if (typeof input.name !== 'string' || !TENANT_NAME.test(input.name)) {
    throw invalid('a tenant name is 1–63 lower-case letters, digits, ".", "_" or "-", starting with a letter or digit');
  }
  const now = input.now ?? new Date();
  return db.transaction(async (tx) => {
    if (await tx.get('SELECT 1 FROM tenants WHERE name = ?', [input.name])) {
      throw new CocoonError('tenant_exists', `a tenant named '${input.name}' already exists`, { status: 409 });
    }
    const row: TenantRow = {
      id: newId('tenant', now.getTime()),
      name: input.name,
      account_id: await freeAccountId(tx),
      is_admin: input.isAdmin ? 1 : 0,
      created_at: iso(now),
    };
    await insertRow(tx, 'tenants', row);
    await appendEvent(tx, { tenantId: row.id, resourceType: 'tenant', resourceId: row.id, type: 'created', now });
    return toTenant(row);
  });
}

async function freeAccountId(db: Db): Promise<string> {
  for (;;) {
    const candidate = String(randomInt(100_000_000_000, 1_000_000_000_000));
    if (!(await db.get('SELECT 1 FROM tenants WHERE account_id = ?', [candidate]))) return candidate;
  }
}

export async function getTenant(db: Db, id: string): Promise<Tenant | undefined> {
  const row = await db.get<TenantRow>('SELECT * FROM tenants WHERE id = ?', [id]);
  return row && toTenant(row);
}

export async function findTenantByName(db: Db, name: string): Promise<Tenant | undefined> {
  const row = await db.get<TenantRow>('SELECT * FROM tenants WHERE name = ?', [name]);
  return row && toTenant(row);
}

export async function listTenants(db: Db, page: PageRequest = {}): Promise<Page<Tenant>> {
  const limit = pageLimit(page.limit);
  const cursor = decodeCursor(page.cursor);
  const rows = await db.all<TenantRow>(
    `SELECT * FROM tenants ${cursor ? 'WHERE id < ?' : ''} ORDER BY id DESC LIMIT ?`,
    cursor ? [cursor, limit + 1] : [limit + 1],
  );
  return toPage(rows.map(toTenant), limit);
}
