/**
 * Header rewriting between client and guest: what is stripped, what is added.
 */
import type { IncomingHttpHeaders, OutgoingHttpHeaders } from 'node:http';
import { isAwsProxyHeader, stripAwsSubprotocols } from './aws-credentials.ts';
import { PEER_HEADER } from './peer.ts';
import { MICROVM_HEADER, PORT_HEADER, TOKEN_COOKIE, TOKEN_HEADER, filterGuestSetCookies, stripCookie } from './credentials.ts';

/** Hop-by-hop headers (RFC 9110 §7.6.1) and ones a proxy must not pass on. */
const HOP_BY_HOP = new Set([
  'connection',
  'keep-alive',
  'proxy-connection',
  'proxy-authenticate',
  'proxy-authorization',
  'te',
  'trailer',
  'transfer-encoding',
  'upgrade',
  'expect',
  'http2-settings',
]);

const GATEWAY_HEADERS = new Set([TOKEN_HEADER, PORT_HEADER, MICROVM_HEADER, PEER_HEADER]);

const FORWARDING_HEADERS = new Set(['forwarded', 'x-forwarded-for', 'x-forwarded-proto', 'x-forwarded-host', 'x-forwarded-port', 'x-real-ip']);

/** Names listed in Connection headers (they are hop-by-hop too), lowercased. */
function connectionTokens(values: Iterable<string>): Set<string> | undefined {
  let out: Set<string> | undefined;
  for (const v of values) {
    for (const t of v.split(',')) {
      const name = t.trim().toLowerCase();
      if (name === '' || name === 'close' || name === 'keep-alive' || name === 'upgrade') continue;
      (out ??= new Set()).add(name);
    }
  }
  return out;
}

export interface UpstreamHeaderOptions {
  /** Address of the client as the gateway saw it. */
  clientIp: string;
  /** 'http' or 'https' as the client used. */
  proto: string;
  /** Keep `Connection: upgrade` and `Upgrade` (WebSocket handshakes). */
  upgrade: boolean;
  /** Pass on incoming X-Forwarded-* (the gateway sits behind a trusted proxy). */
  trustForwarded: boolean;
  cookieName?: string;
}

/**
 * Request headers for the guest, as a flat [name, value, ...] list in the client's order and
 * case: without hop-by-hop headers, X-Cocoon-Token/-Port/-MicroVM, every X-aws-proxy-* header,
 * AWS's lambda-microvms WebSocket subprotocols and the gateway's cookie;
 * with X-Forwarded-For/-Proto/-Host. The Host header is kept as the client sent it.
 */
export function upstreamRequestHeaders(raw: readonly string[], o: UpstreamHeaderOptions): string[] {
  const cookieName = o.cookieName ?? TOKEN_COOKIE;
  let dropByConnection: Set<string> | undefined;
  for (let i = 0; i < raw.length; i += 2) {
    if (raw[i]!.length === 10 && raw[i]!.toLowerCase() === 'connection') {
      dropByConnection = connectionTokens([raw[i + 1]!]);
    }
  }
  const out: string[] = [];
  let host: string | undefined;
  let priorFor: string | undefined;
  let priorProto: string | undefined;
  let priorHost: string | undefined;
  for (let i = 0; i < raw.length; i += 2) {
    const name = raw[i]!;
    const value = raw[i + 1]!;
    const lower = name.toLowerCase();
    if (HOP_BY_HOP.has(lower)) {
      if (o.upgrade && (lower === 'connection' || lower === 'upgrade')) out.push(name, value);
      continue;
    }
    if (GATEWAY_HEADERS.has(lower) || isAwsProxyHeader(lower) || dropByConnection?.has(lower)) continue;
    if (o.upgrade && lower === 'sec-websocket-protocol') {
      // AWS's lambda-microvms subprotocols carry the token: never for the guest.
      const kept = stripAwsSubprotocols(value);
      if (kept !== undefined) out.push(name, kept);
      continue;
    }
    if (lower === 'cookie') {
      const kept = stripCookie(value, cookieName);
      if (kept !== undefined) out.push(name, kept);
      continue;
    }
    if (FORWARDING_HEADERS.has(lower)) {
      if (!o.trustForwarded) continue;
      if (lower === 'x-forwarded-for') {
        priorFor = priorFor === undefined ? value : `${priorFor}, ${value}`;
        continue;
      }
      if (lower === 'x-forwarded-proto') priorProto ??= value;
      if (lower === 'x-forwarded-host') priorHost ??= value;
      out.push(name, value);
      continue;
    }
    if (lower === 'host') host = value;
    out.push(name, value);
  }
  out.push('x-forwarded-for', priorFor === undefined ? o.clientIp : `${priorFor}, ${o.clientIp}`);
  if (priorProto === undefined) out.push('x-forwarded-proto', o.proto);
  if (priorHost === undefined && host !== undefined) out.push('x-forwarded-host', host);
  return out;
}

/**
 * Response headers for the client: without hop-by-hop headers (and those the guest's
 * Connection header names), with guest Set-Cookies made safe (see filterGuestSetCookies).
 */
export function clientResponseHeaders(headers: IncomingHttpHeaders | Record<string, string | string[] | undefined>, keepUpgrade = false, cookieName = TOKEN_COOKIE): OutgoingHttpHeaders {
  const conn = headers['connection'];
  const dropByConnection = conn === undefined ? undefined : connectionTokens(Array.isArray(conn) ? conn : [conn]);
  const out: OutgoingHttpHeaders = {};
  for (const name in headers) {
    const value = headers[name];
    if (value === undefined) continue;
    const lower = name.toLowerCase();
    if (HOP_BY_HOP.has(lower)) {
      if (keepUpgrade && (lower === 'connection' || lower === 'upgrade')) out[name] = value;
      continue;
    }
    if (dropByConnection?.has(lower)) continue;
    if (lower === 'set-cookie') {
      const kept = filterGuestSetCookies(Array.isArray(value) ? value : [value], cookieName);
      if (kept.length > 0) out[name] = kept;
      continue;
    }
    out[name] = value;
  }
  return out;
}

/** The client's address without the IPv4-mapped IPv6 prefix. */
export function clientAddress(remote: string | undefined): string {
  if (remote === undefined) return 'unknown';
  return remote.startsWith('::ffff:') && remote.includes('.') ? remote.slice(7) : remote;
}
