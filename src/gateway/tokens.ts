/**
 * The gateway's token check, backed by the metadata store's tokens table: the one token
 * implementation of the platform is `src/store/tokens.ts` (format, issue, hash-only storage,
 * constant-time comparison, revocation); this module maps its verdicts to the gateway's.
 *
 * `revoked`, `expired` and `other_microvm` are reported only for a token whose secret matched;
 * a wrong secret is always `unknown`, so a guessed token id reveals nothing.
 */
import { createHash } from 'node:crypto';
import { isCocoonError } from '../common/errors.ts';
import type { Db } from '../store/sql.ts';
import { checkToken, findTokenBySecret, parseToken } from '../store/tokens.ts';
import type { MaybePromise, TokenVerification, TokenVerifier } from './types.ts';

export { hashToken, parseToken } from '../store/tokens.ts';

export interface TokenVerifierOptions {
  /** Clock in ms since the epoch; tests move it. */
  now?: () => number;
  /** How long a token the database accepted is still accepted while the database cannot be reached (default 5 minutes; 0: never). */
  outageGraceMs?: number;
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

export function createTokenVerifier(db: Db, options: TokenVerifierOptions = {}): TokenVerifier {
  const now = options.now ?? Date.now;
  const cache = new OutageCache(options.outageGraceMs ?? OUTAGE_GRACE_MS);
  return {
    verify(microvmId: string, presented: string | undefined): MaybePromise<TokenVerification> {
      if (presented === undefined || presented === '') return { ok: false, reason: 'missing' };
      if (parseToken(presented) === undefined) return { ok: false, reason: 'malformed' };
      const key = OutageCache.key(microvmId, presented);
      return verifyInStore(microvmId, presented).then(
        (verification) => {
          cache.remember(key, verification, now());
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
