/**
 * Authentication between the hosts of a cluster. A host that forwards a request to another
 * (src/cluster/forwarding.ts) adds one header, `X-Cocoon-Peer`:
 *
 *   v1;h=<from host id>;t=<unix ms>;n=<nonce>;c=<client address>;p=<http|https>;s=<signature>
 *
 * where the signature is HMAC-SHA256 under the cluster's shared key (a `cluster_secrets` row,
 * made by the first host: src/store/cluster-secrets.ts) over the method, the request target,
 * the sending and the receiving host's ids, the time, the nonce, the client's address and
 * protocol. The receiving host accepts it only when it parses strictly, its time is within
 * ±`windowMs` of its own clock, the signature matches (compared in constant time), and the
 * nonce was not seen within the window (a replay is refused). It is bound to the receiving
 * host, so a captured header cannot be replayed against a third one either.
 *
 * What an accepted header grants is small on purpose: the request is known to come from a
 * host of the cluster, so its client address and protocol are believed (for X-Forwarded-For)
 * and it is never forwarded again (one hop at most, no loops). Everything else is checked again
 * on the receiving host exactly as for a client: the token at the gateway, the API key at the
 * API. A request from outside that carries the header fails (401 `peer_auth_failed`); the header
 * never reaches a guest.
 */
import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto';

export const PEER_HEADER = 'x-cocoon-peer';
/** The longest header value accepted (a well-formed one is under 200 bytes). */
const MAX_HEADER = 400;
const FORMAT = /^v1;h=([A-Za-z0-9][A-Za-z0-9._-]{0,63});t=(\d{1,15});n=([A-Za-z0-9_-]{22});c=([0-9A-Fa-f.:]{1,45});p=(https?);s=([A-Za-z0-9_-]{43})$/;

export interface PeerClaims {
  /** The client's address as the first host saw it. */
  clientIp: string;
  /** The protocol the client used at the first host. */
  proto: 'http' | 'https';
}

export type PeerVerification =
  | ({ ok: true; fromHostId: string } & PeerClaims)
  | { ok: false; reason: 'missing' | 'malformed' | 'expired' | 'bad_signature' | 'replayed' | 'busy' };

export interface PeerAuthOptions {
  /** This host's id: the one requests are signed for (verify) and from (sign). */
  hostId: string;
  /** The shared key (the `peer-hmac` cluster secret). */
  secret: string;
  /** How far a header's time may be from this host's clock. Default 15 s. */
  windowMs?: number;
  /** Nonces remembered at most (beyond: refused as `busy` until the window moves on). Default 200,000. */
  maxNonces?: number;
  now?: () => number;
}

export class PeerAuth {
  readonly hostId: string;
  readonly #key: Buffer;
  readonly #windowMs: number;
  readonly #maxNonces: number;
  readonly #now: () => number;
  /** nonce → when it may be forgotten (its time + window). */
  readonly #seen = new Map<string, number>();

  constructor(options: PeerAuthOptions) {
    if (typeof options.secret !== 'string' || options.secret.length < 32) throw new Error('the peer secret must be at least 32 characters');
    this.hostId = options.hostId;
    this.#key = Buffer.from(options.secret, 'utf8');
    this.#windowMs = options.windowMs ?? 15_000;
    this.#maxNonces = options.maxNonces ?? 200_000;
    this.#now = options.now ?? Date.now;
  }

  /** The X-Cocoon-Peer value for a request this host sends to `toHostId`. */
  sign(method: string, target: string, toHostId: string, claims: PeerClaims): string {
    const t = String(this.#now());
    const n = randomBytes(16).toString('base64url');
    const clientIp = /^[0-9A-Fa-f.:]{1,45}$/.test(claims.clientIp) ? claims.clientIp : '0.0.0.0';
    const s = this.#mac(method, target, this.hostId, toHostId, t, n, clientIp, claims.proto);
    return `v1;h=${this.hostId};t=${t};n=${n};c=${clientIp};p=${claims.proto};s=${s}`;
  }

  /** Checks a received X-Cocoon-Peer value (as Node gives it: possibly absent or repeated). */
  verify(method: string, target: string, header: string | string[] | undefined): PeerVerification {
    if (header === undefined) return { ok: false, reason: 'missing' };
    if (typeof header !== 'string' || header.length > MAX_HEADER) return { ok: false, reason: 'malformed' };
    const m = FORMAT.exec(header);
    if (!m) return { ok: false, reason: 'malformed' };
    const [, from, t, n, clientIp, proto, s] = m as unknown as [string, string, string, string, string, 'http' | 'https', string];
    const time = Number(t);
    const now = this.#now();
    if (!Number.isSafeInteger(time) || Math.abs(now - time) > this.#windowMs) return { ok: false, reason: 'expired' };
    const expected = Buffer.from(this.#mac(method, target, from, this.hostId, t, n, clientIp, proto), 'utf8');
    const given = Buffer.from(s, 'utf8');
    if (given.length !== expected.length || !timingSafeEqual(given, expected)) return { ok: false, reason: 'bad_signature' };
    // Only a correctly signed header reaches the nonce memory: outsiders cannot fill it.
    this.#forgetOld(now);
    if (this.#seen.has(n)) return { ok: false, reason: 'replayed' };
    if (this.#seen.size >= this.#maxNonces) return { ok: false, reason: 'busy' };
    this.#seen.set(n, time + this.#windowMs);
    return { ok: true, fromHostId: from, clientIp, proto };
  }

  #mac(method: string, target: string, from: string, to: string, t: string, n: string, c: string, p: string): string {
    return createHmac('sha256', this.#key)
      .update(['cocoon-peer-v1', method.toUpperCase(), target, from, to, t, n, c, p].join('\n'))
      .digest('base64url');
  }

  #sweepAt = 0;
  #forgetOld(now: number): void {
    // Amortized: a sweep at most every second, or when the memory is full.
    if (now < this.#sweepAt && this.#seen.size < this.#maxNonces) return;
    this.#sweepAt = now + 1_000;
    for (const [nonce, until] of this.#seen) if (until < now) this.#seen.delete(nonce);
  }
}
