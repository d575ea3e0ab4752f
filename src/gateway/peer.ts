/**
 * The gateway's side of a cluster (docs/cluster.md): a request for a microVM that another host
 * runs goes on to that host's gateway as the client sent it (its credentials included: the
 * owner checks the token again), with one header more, X-Cocoon-Peer, that the forwarding host
 * signs (src/cluster/peer-auth.ts implements `PeerGatewayAuth`). The owner's gateway believes
 * the client address and protocol in a valid one and never forwards such a request again; an
 * invalid one is refused (401 `peer_auth_failed`). The header is never passed to a guest.
 */
export const PEER_HEADER = 'x-cocoon-peer';

export interface PeerClaims {
  clientIp: string;
  proto: 'http' | 'https';
}

/** Signs and checks X-Cocoon-Peer (the gateway depends on this, not on how it is done). */
export interface PeerGatewayAuth {
  sign(method: string, target: string, toHostId: string, claims: PeerClaims): string;
  verify(method: string, target: string, header: string | string[] | undefined): ({ ok: true } & PeerClaims) | { ok: false; reason: string };
}

/** Where the route's microVM runs when another host runs it: that host's gateway. */
export interface PeerTarget {
  readonly hostId: string;
  readonly host: string;
  readonly port: number;
}

/** `http://host:port` (as in `hosts.gateway_url`) → the target, or undefined when it is not one. */
export function peerTarget(hostId: string, url: string | null): PeerTarget | undefined {
  if (url === null) return undefined;
  try {
    const parsed = new URL(url);
    if (parsed.protocol !== 'http:' || parsed.port === '') return undefined;
    const host = parsed.hostname.startsWith('[') ? parsed.hostname.slice(1, -1) : parsed.hostname;
    return { hostId, host, port: Number(parsed.port) };
  } catch {
    return undefined;
  }
}

const HOP_BY_HOP = new Set(['connection', 'keep-alive', 'proxy-connection', 'te', 'trailer', 'transfer-encoding', 'upgrade', 'expect', 'http2-settings']);

/**
 * The client's headers for the owner's gateway, as a flat list in the client's order: all of
 * them (Host, credentials, cookies, X-Forwarded-* as the client sent them: the owner decides
 * what to believe) except hop-by-hop ones (Connection and Upgrade kept for a WebSocket) and any
 * X-Cocoon-Peer (only the one this host signs goes on).
 */
export function peerRequestHeaders(raw: readonly string[], upgrade: boolean): string[] {
  const out: string[] = [];
  for (let i = 0; i < raw.length; i += 2) {
    const name = raw[i]!;
    const lower = name.toLowerCase();
    if (lower === PEER_HEADER) continue;
    if (HOP_BY_HOP.has(lower) && !(upgrade && (lower === 'connection' || lower === 'upgrade'))) continue;
    out.push(name, raw[i + 1]!);
  }
  return out;
}
