/**
 * The gateway's token check, backed by the metadata store's tokens table: the one token
 * implementation of the platform is `src/store/tokens.ts` (format, issue, hash-only storage,
 * constant-time comparison, revocation); this module maps its verdicts to the gateway's.
 *
 * `revoked`, `expired` and `other_microvm` are reported only for a token whose secret matched;
 * a wrong secret is always `unknown`, so a guessed token id reveals nothing.
 */
import type { Db } from '../store/sql.ts';
import { checkToken, findTokenBySecret, parseToken } from '../store/tokens.ts';
import type { MaybePromise, TokenVerification, TokenVerifier } from './types.ts';

export { hashToken, parseToken } from '../store/tokens.ts';

export interface TokenVerifierOptions {
  /** Clock in ms since the epoch; tests move it. */
  now?: () => number;
}

export function createTokenVerifier(db: Db, options: TokenVerifierOptions = {}): TokenVerifier {
  const now = options.now ?? Date.now;
  return {
    verify(microvmId: string, presented: string | undefined): MaybePromise<TokenVerification> {
      if (presented === undefined || presented === '') return { ok: false, reason: 'missing' };
      if (parseToken(presented) === undefined) return { ok: false, reason: 'malformed' };
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
    },
  };
}
