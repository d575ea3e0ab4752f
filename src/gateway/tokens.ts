/**
 * The gateway's token check, backed by the metadata store's tokens table: the one token
 * implementation of the platform is `src/store/tokens.ts` (format, issue, hash-only storage,
 * constant-time comparison, revocation); this module maps its verdicts to the gateway's.
 *
 * `revoked`, `expired` and `other_microvm` are reported only for a token whose secret matched;
 * a wrong secret is always `unknown`, so a guessed token id reveals nothing.
 */
import { createHash, hash, timingSafeEqual } from 'node:crypto';
import { isCocoonError } from '../common/errors.ts';
import { TOKEN_PREFIX } from '../store/secrets.ts';
import type { Db } from '../store/sql.ts';
import { checkToken, findTokenBySecret, parseToken, TOKEN_LENGTH, tokenWriteCount } from '../store/tokens.ts';
import { gatewayTuning } from './tuning.ts';
import type { MaybePromise, TokenVerification, TokenVerifier } from './types.ts';

export { hashToken, parseToken } from '../store/tokens.ts';

export interface TokenVerifierOptions {
  /** Clock in ms since the epoch; tests move it. */
  now?: () => number;
  /** How long a token the database accepted is still accepted while the database cannot be reached (default 5 minutes; 0: never). */
  outageGraceMs?: number;
  /**
   * Remember tokens the database accepted (TokenMemory). Default: when the database is SQLite,
   * whose one writer is this process, so that every revocation passes through it; never for
   * PostgreSQL, where another host of the cluster may revoke.
   */
  remember?: boolean;
}

/** Default of `outageGraceMs`. */
export const OUTAGE_GRACE_MS = 5 * 60_000;
/** Accepted tokens remembered for an outage, at most (the oldest are forgotten first). */
const OUTAGE_CACHE_ENTRIES = 10_000;

/**
 * The last verdict the database gave for a token that it accepted, kept so that running
 * microVMs keep serving while PostgreSQL is down or restarting (docs/cluster.md): used only
 * when the database cannot be reached (`database_unavailable`), only within the grace period
 * after that verdict and only until the token expires. Keyed by the SHA-256 of the presented
 * token (the secret itself is not kept) and the microVM. A refusal by the database removes the
 * entry, so a token revoked and presented again before the outage is not accepted during it;
 * one revoked but not presented since its last accepted check can be, for at most the grace.
 */
class OutageCache {
  readonly #entries = new Map<string, { verification: TokenVerification & { ok: true }; checkedAt: number }>();
  readonly #graceMs: number;

  constructor(graceMs: number) {
    this.#graceMs = graceMs;
  }

  static key(microvmId: string, presented: string): string {
    return `${microvmId}\n${createHash('sha256').update(presented, 'utf8').digest('hex')}`;
  }

  remember(key: string, verification: TokenVerification, at: number): void {
    this.#entries.delete(key);
    if (!verification.ok || this.#graceMs <= 0) return;
    this.#entries.set(key, { verification, checkedAt: at });
    if (this.#entries.size > OUTAGE_CACHE_ENTRIES) this.#entries.delete(this.#entries.keys().next().value!);
  }

  recall(key: string, at: number): TokenVerification | undefined {
    const entry = this.#entries.get(key);
    if (entry === undefined) return undefined;
    if (at - entry.checkedAt > this.#graceMs || entry.verification.expiresAt.getTime() <= at) {
      this.#entries.delete(key);
      return undefined;
    }
    return entry.verification;
  }
}

/** Accepted tokens a TokenMemory keeps, at most (the oldest are forgotten first). */
const MEMORY_ENTRIES = 10_000;

interface Remembered {
  /** SHA-256 of the whole token string the store accepted. */
  readonly digest: Buffer;
  readonly microvmId: string;
  readonly verification: TokenVerification & { ok: true };
  /** `tokenWriteCount()` before the store was read: the verdict holds while it has not moved. */
  readonly writes: number;
}

/**
 * Tokens the store accepted, so that the next request with the same token costs one SHA-256 and
 * a constant-time compare instead of a database read and two SHA-256s: with an app that closes
 * every connection the gateway's CPU per request is what competes with the guest (issue 12).
 * Keyed by the token's id (public); the presented string is hashed and compared with the
 * remembered digest by `timingSafeEqual`, as the store compares. Every guarantee of the store's
 * check holds: a revocation written by this process moves `tokenWriteCount()` and every verdict
 * remembered before it is forgotten at once (so only a process that is the store's one writer may
 * use it: SQLite); the expiry is checked on every request; a token presented for another microVM
 * is `other_microvm` as before; anything not remembered, or not matching, goes to the store.
 */
export class TokenMemory {
  readonly #entries = new Map<string, Remembered>();

  /** The remembered verdict for `presented`, or undefined when the store must be asked. */
  recall(microvmId: string, presented: string, digest: Buffer, at: number): TokenVerification | undefined {
    const entry = this.#entries.get(tokenIdOf(presented));
    if (entry === undefined) return undefined;
    if (entry.writes !== tokenWriteCount()) {
      this.#entries.delete(tokenIdOf(presented));
      return undefined;
    }
    if (!timingSafeEqual(digest, entry.digest)) return undefined;
    // Expired: the store says so (and the entry goes when the store's verdict is remembered).
    if (entry.verification.expiresAt.getTime() <= at) return undefined;
    if (entry.microvmId !== microvmId) return { ok: false, reason: 'other_microvm' };
    return entry.verification;
  }

  remember(presented: string, digest: Buffer, microvmId: string, verification: TokenVerification, writes: number): void {
    const id = tokenIdOf(presented);
    this.#entries.delete(id);
    if (!verification.ok || writes !== tokenWriteCount()) return;
    this.#entries.set(id, { digest, microvmId, verification, writes });
    if (this.#entries.size > MEMORY_ENTRIES) this.#entries.delete(this.#entries.keys().next().value!);
  }

  get size(): number {
    return this.#entries.size;
  }
}

/** The id part of a well-formed token (checked by parseToken before anything is remembered). */
function tokenIdOf(presented: string): string {
  return presented.slice(TOKEN_PREFIX.length, TOKEN_PREFIX.length + 26);
}

/** One-shot `crypto.hash`: no Hash object per request. */
function sha256(presented: string): Buffer {
  return hash('sha256', presented, 'buffer');
}

export function createTokenVerifier(db: Db, options: TokenVerifierOptions = {}): TokenVerifier {
  const now = options.now ?? Date.now;
  const cache = new OutageCache(options.outageGraceMs ?? OUTAGE_GRACE_MS);
  const memory = (options.remember ?? db.dialect === 'sqlite') ? new TokenMemory() : undefined;
  return {
    verify(microvmId: string, presented: string | undefined): MaybePromise<TokenVerification> {
      if (presented === undefined || presented === '') return { ok: false, reason: 'missing' };
      let digest: Buffer | undefined;
      if (memory !== undefined && gatewayTuning.rememberTokens && presented.length === TOKEN_LENGTH && presented.startsWith(TOKEN_PREFIX)) {
        // A remembered digest matches only the very string the store accepted (well-formed).
        digest = sha256(presented);
        const remembered = memory.recall(microvmId, presented, digest, now());
        if (remembered !== undefined) return remembered;
      }
      if (parseToken(presented) === undefined) return { ok: false, reason: 'malformed' };
      const key = OutageCache.key(microvmId, presented);
      const writes = tokenWriteCount();
      return verifyInStore(microvmId, presented).then(
        (verification) => {
          cache.remember(key, verification, now());
          if (memory !== undefined && gatewayTuning.rememberTokens) memory.remember(presented, digest ?? sha256(presented), microvmId, verification, writes);
          return verification;
        },
        (error: unknown) => {
          const remembered = isCocoonError(error, 'database_unavailable') ? cache.recall(key, now()) : undefined;
          if (remembered === undefined) throw error;
          return remembered;
        },
      );
    },
  };

  function verifyInStore(microvmId: string, presented: string): Promise<TokenVerification> {
    return findTokenBySecret(db, presented).then((token): TokenVerification => {
      if (token === undefined) return { ok: false, reason: 'unknown' };
      // The port is checked by the gateway (it knows the image's default port); any port here.
      const first = token.allowedPorts?.[0];
      const verdict = checkToken(token, { microvmId, port: first === undefined ? 1 : typeof first === 'number' ? first : first.from, now: new Date(now()) });
      switch (verdict) {
        case 'revoked':
          return { ok: false, reason: 'revoked' };
        case 'expired':
          return { ok: false, reason: 'expired' };
        case 'wrong_microvm':
          return { ok: false, reason: 'other_microvm' };
        default:
          return {
            ok: true,
            tokenId: token.id,
            allowedPorts: token.allowedPorts === null ? 'all' : Object.freeze(token.allowedPorts.map((p) => (typeof p === 'number' ? p : Object.freeze({ ...p })))),
            expiresAt: new Date(token.expiresAt),
            scope: token.scope,
          };
      }
    });
  }
}
