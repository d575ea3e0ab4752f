/**
 * Secrets shared by every host of a cluster (migration 10): made once, by whichever host needs
 * one first, and read by the others, so that a cluster needs no secret distributed by hand.
 * Whoever can read the database can read them, as they can read everything else the hosts
 * share. Values are never logged.
 */
import { randomBytes } from 'node:crypto';
import type { Db } from './sql.ts';
import { iso } from './values.ts';

/** The key of the HMAC that authenticates requests between hosts (src/cluster/peer-auth.ts). */
export const PEER_HMAC_SECRET = 'peer-hmac';

/** The secret `name`: made (32 random bytes, base64url) when missing; of hosts racing, one value wins. */
export async function ensureClusterSecret(db: Db, name: string, now: Date = new Date()): Promise<string> {
  const candidate = randomBytes(32).toString('base64url');
  await db.run('INSERT INTO cluster_secrets (name, value, created_at) VALUES (?, ?, ?) ON CONFLICT (name) DO NOTHING', [name, candidate, iso(now)]);
  const row = await db.get<{ value: string }>('SELECT value FROM cluster_secrets WHERE name = ?', [name]);
  if (!row) throw new Error(`cluster secret ${name} could not be stored`);
  return row.value;
}
