import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import { CocoonError } from '../common/errors.ts';
import { portInSpecs, type PortSpec } from '../common/ports.ts';
import { ID_PREFIXES, newId } from './ids.ts';
import type { Db } from './sql.ts';
import { TOKEN_PREFIX } from './secrets.ts';
import { insertRow, rowMapper } from './rows.ts';
import { invalid, iso } from './values.ts';

/**
 * Short-lived secrets for web requests to one microVM (the gateway checks them). The one token
 * implementation of the platform: the API issues and revokes, the gateway verifies.
 *
 * Format: `cocoon_tk_<id>_<secret>`
 *   - `cocoon_tk_` a fixed prefix, so secret scanners and humans recognise a leaked token;
 *   - id           the token's id without its `tok-` prefix (26 characters, public): the lookup key;
 *   - secret       43 base64url characters = 32 random bytes (256 bits), canonical encoding.
 * The secret is returned once; only the SHA-256 of the whole token string is stored. A presented
 * token is looked up by its id and its hash compared with `crypto.timingSafeEqual` (against a
 * dummy when the id is unknown, so both paths cost the same). A plain hash is as strong as an
 * HMAC for a 256-bit random secret (nothing to brute-force) and needs no key management.
 */
const TOKEN_PATTERN = /^cocoon_tk_([0-9a-hjkmnp-tv-z]{26})_([A-Za-z0-9_-]{43})$/;
/** The length of every well-formed token: prefix, 26-character id, `_`, 43-character secret. */
export const TOKEN_LENGTH = TOKEN_PREFIX.length + 26 + 1 + 43;
const DUMMY_HASH = Buffer.alloc(32);

/** The token id a presented string names, or undefined when it is not a well-formed token. */
export function parseToken(presented: unknown): string | undefined {
  if (typeof presented !== 'string' || presented.length !== TOKEN_LENGTH) return undefined;
  const match = TOKEN_PATTERN.exec(presented);
  if (match === null) return undefined;
  const secret = match[2] as string;
  // 43 base64url characters carry 258 bits: the last 2 must be zero for the canonical 32 bytes.
  if (Buffer.from(secret, 'base64url').toString('base64url') !== secret) return undefined;
  return `${ID_PREFIXES.token}-${match[1] as string}`;
}

/** Lowercase hex SHA-256 of a token string (what the tokens table keeps). */
export function hashToken(token: string): string {
  return createHash('sha256').update(token, 'utf8').digest('hex');
}

function newTokenSecret(id: string): string {
  return `${TOKEN_PREFIX}${id.slice(ID_PREFIXES.token.length + 1)}_${randomBytes(32).toString('base64url')}`;
}

/** What a token opens through the gateway: app requests, or the shell WebSocket (`/.cocoon/shell`). */
export type TokenScope = 'http' | 'shell';
export const TOKEN_SCOPES: readonly TokenScope[] = ['http', 'shell'];

export type { PortSpec } from '../common/ports.ts';

/** Whether `port` is among `allowed` (null: every port). */
export function portAllowed(allowed: readonly PortSpec[] | null, port: number): boolean {
  return allowed === null || portInSpecs(allowed, port);
}

/** Validates and normalizes a request's allowed ports: sorted, duplicates dropped. */
export function normalizePortSpecs(specs: unknown): PortSpec[] {
  if (!Array.isArray(specs) || specs.length === 0 || specs.length > 64) throw invalid('allowedPorts must be a list of 1 to 64 ports or port ranges');
  const isPort = (n: unknown): n is number => Number.isInteger(n) && (n as number) >= 1 && (n as number) <= 65535;
  const ports = new Set<number>();
  const ranges = new Map<string, { from: number; to: number }>();
  for (const spec of specs) {
    if (typeof spec === 'number') {
      if (!isPort(spec)) throw invalid(`allowedPorts: ${String(spec)} is not a port`);
      ports.add(spec);
    } else if (typeof spec === 'object' && spec !== null && !Array.isArray(spec)) {
      const { from, to } = spec as { from?: unknown; to?: unknown };
      if (!isPort(from) || !isPort(to) || from > to || Object.keys(spec).length !== 2) {
        throw invalid('allowedPorts: a range is {"from": port, "to": port} with from ≤ to');
      }
      ranges.set(`${from}-${to}`, { from, to });
    } else {
      throw invalid(`allowedPorts: ${JSON.stringify(spec)} is neither a port nor a range`);
    }
  }
  return [
    ...[...ports].sort((a, b) => a - b),
    ...[...ranges.values()].sort((a, b) => a.from - b.from || a.to - b.to),
  ];
}

export interface Token {
  id: string;
  scope: TokenScope;
  microvmId: string;
  tenantId: string;
  /** null: every port; else ports and inclusive ranges of ports. */
  allowedPorts: PortSpec[] | null;
  createdAt: string;
  expiresAt: string;
  revokedAt: string | null;
}

export const MAX_TOKEN_MINUTES = 60;

interface TokenRow {
  id: string;
  microvm_id: string;
  tenant_id: string;
  token_hash: string;
  allowed_ports: string | null;
  scope: string;
  created_at: string;
  expires_at: string;
  revoked_at: string | null;
}

const toToken = rowMapper<TokenRow, Token>({
  id: 'id', microvmId: 'microvm_id', tenantId: 'tenant_id',
  scope: (row) => (row.scope === 'shell' ? 'shell' : 'http'),
  allowedPorts: (row) => (row.allowed_ports === null ? null : (JSON.parse(row.allowed_ports) as PortSpec[])),
  createdAt: 'created_at', expiresAt: 'expires_at', revokedAt: 'revoked_at',
});

export interface NewToken {
  microvmId: string;
  /** The owner; the microVM must belong to it. */
  tenantId: string;
  /** 1–60 minutes (default 60). */
  expirationMinutes?: number;
  /** Ports and ranges of ports (1–64 entries); null or absent: every port (AWS's allPorts). */
  allowedPorts?: PortSpec[] | null;
  /** Default 'http'. A shell token opens every port of nothing: allowedPorts is ignored. */
  scope?: TokenScope;
  now?: Date;
}

export async function createToken(db: Db, input: NewToken): Promise<{ token: Token; secret: string }> {
  const minutes = input.expirationMinutes ?? MAX_TOKEN_MINUTES;
  if (!Number.isInteger(minutes) || minutes < 1 || minutes > MAX_TOKEN_MINUTES) {
    throw invalid(`expirationMinutes must be an integer from 1 to ${MAX_TOKEN_MINUTES}`);
  }
  let ports: PortSpec[] | null = input.allowedPorts == null ? null : normalizePortSpecs(input.allowedPorts);
  const scope = input.scope ?? 'http';
  if (!TOKEN_SCOPES.includes(scope)) throw invalid(`scope must be one of ${TOKEN_SCOPES.join(', ')}`);
  if (scope === 'shell') ports = null;
  const now = input.now ?? new Date();
  return db.transaction(async (tx) => {
    const microvm = await tx.get<{ state: string }>('SELECT state FROM microvms WHERE id = ? AND tenant_id = ?', [
      input.microvmId, input.tenantId,
    ]);
    if (microvm === undefined) throw new CocoonError('microvm_not_found', `no microVM '${input.microvmId}'`, { status: 404 });
    if (microvm.state === 'TERMINATED' || microvm.state === 'FAILED' || microvm.state === 'TERMINATING') {
      throw new CocoonError('microvm_terminated', `microVM ${input.microvmId} is ${microvm.state}; it takes no new tokens`, { status: 409 });
    }
    const id = newId('token', now.getTime());
    const secret = newTokenSecret(id);
    const row: TokenRow = {
      id,
      microvm_id: input.microvmId,
      tenant_id: input.tenantId,
      token_hash: hashToken(secret),
      allowed_ports: ports === null ? null : JSON.stringify(ports),
      scope,
      created_at: iso(now),
      expires_at: iso(new Date(now.getTime() + minutes * 60_000)),
      revoked_at: null,
    };
    await insertRow(tx, 'tokens', row);
    return { token: toToken(row), secret };
  });
}

/**
 * The token record for a presented secret (revoked and expired ones too: see `checkToken`), or
 * undefined when the string is not a token or its secret does not match (compared in constant time).
 */
export async function findTokenBySecret(db: Db, secret: unknown): Promise<Token | undefined> {
  const id = parseToken(secret);
  if (id === undefined) return undefined;
  const row = await db.get<TokenRow>('SELECT * FROM tokens WHERE id = ?', [id]);
  const presented = createHash('sha256').update(secret as string, 'utf8').digest();
  const stored = row !== undefined && /^[0-9a-f]{64}$/.test(row.token_hash) ? Buffer.from(row.token_hash, 'hex') : DUMMY_HASH;
  const matches = timingSafeEqual(presented, stored);
  return row !== undefined && matches ? toToken(row) : undefined;
}

/** A token by id (no secret needed: for listing and revocation). */
export async function getToken(db: Db, id: string): Promise<Token | undefined> {
  const row = await db.get<TokenRow>('SELECT * FROM tokens WHERE id = ?', [id]);
  return row && toToken(row);
}

export type TokenVerdict = 'ok' | 'expired' | 'revoked' | 'wrong_microvm' | 'port_not_allowed';

/** Whether a token admits a request to `microvmId` on `port` at `now`; the gateway maps the verdict to 401/403. */
export function checkToken(token: Token, request: { microvmId: string; port: number; now?: Date }): TokenVerdict {
  if (token.revokedAt !== null) return 'revoked';
  if (Date.parse(token.expiresAt) <= (request.now ?? new Date()).getTime()) return 'expired';
  if (token.microvmId !== request.microvmId) return 'wrong_microvm';
  if (!portAllowed(token.allowedPorts, request.port)) return 'port_not_allowed';
  return 'ok';
}

export async function listTokens(db: Db, microvmId: string): Promise<Token[]> {
  const rows = await db.all<TokenRow>('SELECT * FROM tokens WHERE microvm_id = ? ORDER BY id', [microvmId]);
  return rows.map(toToken);
}

/**
 * Counts the writes of this process that may turn an accepted token into a refused one
 * (revocations, deletions), each counted once written: a verdict remembered before the count
 * moved is stale (the gateway's TokenMemory, src/gateway/tokens.ts, forgets it). Tokens are
 * revoked only through `revokeToken` and deleted only through `deleteExpiredTokens` (their rows
 * are never updated otherwise; microVM and tenant rows, whose deletion would cascade, are never
 * deleted).
 */
let tokenWrites = 0;

/** The count of token revocations and deletions this process has written (see `tokenWrites`). */
export function tokenWriteCount(): number {
  return tokenWrites;
}

/** Revokes at once; true if the token existed, belonged to the microVM and was active. */
export async function revokeToken(db: Db, microvmId: string, tokenId: string, now: Date = new Date()): Promise<boolean> {
  try {
    const result = await db.run(
      'UPDATE tokens SET revoked_at = ? WHERE id = ? AND microvm_id = ? AND revoked_at IS NULL',
      [iso(now), tokenId, microvmId],
    );
    return result.changes === 1;
  } finally {
    // Counted once written (a verdict read meanwhile saw the row before), and after a failure too.
    tokenWrites++;
  }
}

/** Drops tokens that expired before `before` (housekeeping); returns how many. */
export async function deleteExpiredTokens(db: Db, before: Date = new Date()): Promise<number> {
  try {
    const result = await db.run('DELETE FROM tokens WHERE expires_at < ?', [iso(before)]);
    return result.changes;
  } finally {
    tokenWrites++;
  }
}
