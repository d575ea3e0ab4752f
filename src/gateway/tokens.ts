/**
 * MicroVM access tokens.
 *
 * Format: `cct_<tokenId>_<secret>`
 *   - `cct_`     fixed prefix (Cocoon Client Token), lets secret scanners recognise a leak;
 *   - tokenId    16 lowercase hex characters (64 random bits): the public, lookup half;
 *   - secret     43 base64url characters = 32 random bytes (256 bits), canonical encoding.
 * Only SHA-256 of the whole token string is stored; verification hashes the presented string
 * and compares digests with `crypto.timingSafeEqual`. A 256-bit random secret makes a plain
 * hash as strong as an HMAC here (nothing to brute-force), and keeps the store free of keys.
 * Tokens live at most 60 minutes.
 */
import { hash, randomBytes, timingSafeEqual } from 'node:crypto';
import { CocoonError } from '../common/errors.ts';
import { isPromiseLike, type AllowedPorts, type MaybePromise, type TokenVerification, type TokenVerifier } from './types.ts';

export const TOKEN_PREFIX = 'cct_';
export const TOKEN_ID_LENGTH = 16;
export const TOKEN_SECRET_BYTES = 32;
export const TOKEN_MAX_MINUTES = 60;
export const TOKEN_DEFAULT_MINUTES = 60;

const TOKEN_PATTERN = /^cct_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$/;
/** Longest string worth parsing; anything longer is malformed without further work. */
const TOKEN_LENGTH = TOKEN_PREFIX.length + TOKEN_ID_LENGTH + 1 + 43;

export interface TokenRecord {
  readonly id: string;
  readonly microvmId: string;
  /** Lowercase hex SHA-256 of the whole token string. */
  readonly secretHash: string;
  readonly allowedPorts: AllowedPorts;
  readonly createdAt: Date;
  readonly expiresAt: Date;
  readonly revokedAt: Date | null;
}

/** Persistence for tokens. The in-memory one below is for tests; a SQL one comes later. */
export interface TokenStore {
  /** Adds a record; throws CocoonError `token_id_conflict` when the id exists. */
  insert(record: TokenRecord): MaybePromise<void>;
  get(tokenId: string): MaybePromise<TokenRecord | null>;
  /** Marks one token revoked; false when unknown or already revoked. */
  revoke(tokenId: string, at: Date): MaybePromise<boolean>;
  /** Revokes every live token of a microVM (on terminate); answers how many. */
  revokeAllForMicroVM(microvmId: string, at: Date): MaybePromise<number>;
  /** Forgets records that expired before `before`; answers how many. */
  deleteExpired(before: Date): MaybePromise<number>;
}

export interface GeneratedToken {
  readonly tokenId: string;
  readonly token: string;
  readonly secretHash: string;
}

/** A fresh random token and its hash. */
export function generateToken(): GeneratedToken {
  const tokenId = randomBytes(TOKEN_ID_LENGTH / 2).toString('hex');
  const secret = randomBytes(TOKEN_SECRET_BYTES).toString('base64url');
  const token = `${TOKEN_PREFIX}${tokenId}_${secret}`;
  return { tokenId, token, secretHash: hashToken(token) };
}

/** Lowercase hex SHA-256 of the token string. */
export function hashToken(token: string): string {
  return hash('sha256', token, 'hex');
}

/**
 * Splits a presented token into its id, or null when it is not a well-formed token
 * (wrong prefix, length, alphabet, or a non-canonical base64url secret).
 */
export function parseToken(presented: string): { tokenId: string } | null {
  if (presented.length !== TOKEN_LENGTH) return null;
  const m = TOKEN_PATTERN.exec(presented);
  if (m === null) return null;
  const secret = m[2]!;
  // 43 base64url chars carry 258 bits; the last 2 must be zero for the canonical 32 bytes.
  if (Buffer.from(secret, 'base64url').toString('base64url') !== secret) return null;
  return { tokenId: m[1]! };
}

export function isValidPort(port: unknown): port is number {
  return typeof port === 'number' && Number.isInteger(port) && port >= 1 && port <= 65535;
}

/** Checks and normalises (sorted, deduplicated) a list of allowed ports. */
export function normalizeAllowedPorts(ports: AllowedPorts | undefined): AllowedPorts {
  if (ports === undefined || ports === 'all') return 'all';
  if (!Array.isArray(ports) || ports.length === 0) {
    throw new CocoonError('invalid_allowed_ports', 'allowedPorts must be a non-empty list of ports 1-65535, or omitted for all ports', { status: 400 });
  }
  for (const p of ports) {
    if (!isValidPort(p)) {
      throw new CocoonError('invalid_allowed_ports', `allowedPorts holds ${JSON.stringify(p)}: each port must be an integer 1-65535`, { status: 400 });
    }
  }
  return Object.freeze([...new Set(ports)].sort((a, b) => a - b));
}

export interface IssueTokenOptions {
  microvmId: string;
  /** 1-60, default 60. */
  expirationMinutes?: number;
  allowedPorts?: AllowedPorts;
  now?: Date;
}

export interface IssuedToken {
  readonly id: string;
  /** The secret token: shown to the caller once, never stored. */
  readonly token: string;
  readonly expiresAt: Date;
  readonly allowedPorts: AllowedPorts;
}

/** Creates, stores and returns a new token for a microVM. */
export async function issueToken(store: TokenStore, options: IssueTokenOptions): Promise<IssuedToken> {
  const minutes = options.expirationMinutes ?? TOKEN_DEFAULT_MINUTES;
  if (!Number.isInteger(minutes) || minutes < 1 || minutes > TOKEN_MAX_MINUTES) {
    throw new CocoonError('invalid_token_expiration', `expirationMinutes must be an integer from 1 to ${TOKEN_MAX_MINUTES}`, { status: 400 });
  }
  const allowedPorts = normalizeAllowedPorts(options.allowedPorts);
  const createdAt = options.now ?? new Date();
  const expiresAt = new Date(createdAt.getTime() + minutes * 60_000);
  for (let attempt = 0; ; attempt++) {
    const g = generateToken();
    try {
      await store.insert({
        id: g.tokenId,
        microvmId: options.microvmId,
        secretHash: g.secretHash,
        allowedPorts,
        createdAt,
        expiresAt,
        revokedAt: null,
      });
      return { id: g.tokenId, token: g.token, expiresAt, allowedPorts };
    } catch (error) {
      // 64-bit ids: a collision is astronomically rare; retry a couple of times, then give up.
      if (error instanceof CocoonError && error.code === 'token_id_conflict' && attempt < 3) continue;
      throw error;
    }
  }
}

const DUMMY_HASH = Buffer.alloc(32);

export interface TokenVerifierOptions {
  /** Clock in ms since the epoch; tests move it. */
  now?: () => number;
}

/**
 * A TokenVerifier backed by a TokenStore. It answers synchronously when the store does (the
 * gateway then spends no extra turn on it), with a promise when the store is asynchronous.
 */
export function createTokenVerifier(store: TokenStore, options: TokenVerifierOptions = {}): TokenVerifier {
  const now = options.now ?? Date.now;
  const decide = (microvmId: string, presented: string, record: TokenRecord | null): TokenVerification => {
    const presentedHash = hash('sha256', presented, 'buffer');
    // Compare even when the id is unknown, so both paths cost the same.
    const storedHash = record !== null && record.secretHash.length === 64 ? Buffer.from(record.secretHash, 'hex') : DUMMY_HASH;
    const matches = storedHash.length === 32 && timingSafeEqual(presentedHash, storedHash);
    if (record === null || !matches) return { ok: false, reason: 'unknown' };
    // Only a holder of the secret learns more than "unknown".
    if (record.revokedAt !== null) return { ok: false, reason: 'revoked' };
    if (now() >= record.expiresAt.getTime()) return { ok: false, reason: 'expired' };
    if (record.microvmId !== microvmId) return { ok: false, reason: 'other_microvm' };
    return { ok: true, tokenId: record.id, allowedPorts: record.allowedPorts, expiresAt: record.expiresAt };
  };
  return {
    verify(microvmId: string, presented: string | undefined): MaybePromise<TokenVerification> {
      if (presented === undefined || presented === '') return { ok: false, reason: 'missing' };
      const parsed = parseToken(presented);
      if (parsed === null) return { ok: false, reason: 'malformed' };
      const record = store.get(parsed.tokenId);
      return isPromiseLike(record)
        ? record.then((r) => decide(microvmId, presented, r))
        : decide(microvmId, presented, record);
    },
  };
}

/** TokenStore in a Map, for tests and single-process experiments. */
export class InMemoryTokenStore implements TokenStore {
  readonly #records = new Map<string, TokenRecord>();

  insert(record: TokenRecord): void {
    if (this.#records.has(record.id)) {
      throw new CocoonError('token_id_conflict', `token id ${record.id} exists`, { status: 409 });
    }
    this.#records.set(record.id, Object.freeze({ ...record }));
  }

  get(tokenId: string): TokenRecord | null {
    return this.#records.get(tokenId) ?? null;
  }

  revoke(tokenId: string, at: Date): boolean {
    const r = this.#records.get(tokenId);
    if (r === undefined || r.revokedAt !== null) return false;
    this.#records.set(tokenId, Object.freeze({ ...r, revokedAt: at }));
    return true;
  }

  revokeAllForMicroVM(microvmId: string, at: Date): number {
    let n = 0;
    for (const r of this.#records.values()) {
      if (r.microvmId === microvmId && this.revoke(r.id, at)) n++;
    }
    return n;
  }

  deleteExpired(before: Date): number {
    let n = 0;
    for (const [id, r] of this.#records) {
      if (r.expiresAt.getTime() < before.getTime()) {
        this.#records.delete(id);
        n++;
      }
    }
    return n;
  }

  get size(): number {
    return this.#records.size;
  }
}
