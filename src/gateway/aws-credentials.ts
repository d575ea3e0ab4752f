/**
 * AWS Lambda MicroVMs' data-plane credentials, accepted by the gateway beside Cocoon's own
 * (credentials.ts), so that clients written for AWS reach a Cocoon microVM unchanged:
 *
 *   X-aws-proxy-auth: <token>     the token (what X-Cocoon-Token carries)
 *   X-aws-proxy-port: <n>         the guest port (what X-Cocoon-Port carries)
 *
 * and on WebSockets, where browsers cannot set headers, the subprotocols
 *
 *   lambda-microvms                          the base protocol
 *   lambda-microvms.authentication.<token>   the token
 *   lambda-microvms.port.<n>                 the guest port
 *
 * Every `lambda-microvms…` subprotocol is removed from the handshake before it reaches the guest,
 * and when the app picks no subprotocol the gateway answers `lambda-microvms` (a client that
 * offered subprotocols fails a handshake that names none). Every `x-aws-proxy-*` header is
 * removed before the guest too (headers.ts). A token presented the AWS way is refused with 403,
 * as AWS does, whatever the reason (expired, revoked, unknown, port not allowed).
 */
import type { IncomingMessage } from 'node:http';

export const AWS_AUTH_HEADER = 'x-aws-proxy-auth';
export const AWS_PORT_HEADER = 'x-aws-proxy-port';
/** Every request header with this prefix is the gateway's, never the guest's. */
export const AWS_HEADER_PREFIX = 'x-aws-proxy-';
export const AWS_SUBPROTOCOL = 'lambda-microvms';
const AUTH_PREFIX = `${AWS_SUBPROTOCOL}.authentication.`;
const PORT_PREFIX = `${AWS_SUBPROTOCOL}.port.`;

export function isAwsProxyHeader(lowerName: string): boolean {
  return lowerName.startsWith(AWS_HEADER_PREFIX);
}

/** Whether a subprotocol is one of AWS's (the base one or a credential); compared as sent. */
function isAwsSubprotocol(protocol: string): boolean {
  return protocol === AWS_SUBPROTOCOL || protocol.startsWith(`${AWS_SUBPROTOCOL}.`);
}

function subprotocols(req: IncomingMessage): string[] {
  const header = req.headers['sec-websocket-protocol'];
  if (header === undefined) return [];
  return (Array.isArray(header) ? header.join(',') : header)
    .split(',')
    .map((p) => p.trim())
    .filter((p) => p !== '');
}

export interface AwsCredentials {
  /** The token from X-aws-proxy-auth, or (WebSockets) the authentication subprotocol. */
  token: string | undefined;
  /** The port as sent (X-aws-proxy-port, or the port subprotocol); parsed by the gateway. */
  port: string | undefined;
  /** The WebSocket handshake offered the base subprotocol `lambda-microvms`. */
  offersBaseSubprotocol: boolean;
}

/** What a request carries the AWS way; `upgrade`: a WebSocket handshake (subprotocols count). */
export function readAwsCredentials(req: IncomingMessage, upgrade: boolean): AwsCredentials {
  const header = (name: string): string | undefined => {
    const v = req.headers[name];
    return Array.isArray(v) ? v.join(', ') : v;
  };
  let token = header(AWS_AUTH_HEADER);
  let port = header(AWS_PORT_HEADER);
  let offersBaseSubprotocol = false;
  if (upgrade) {
    for (const p of subprotocols(req)) {
      if (p === AWS_SUBPROTOCOL) offersBaseSubprotocol = true;
      else if (p.startsWith(AUTH_PREFIX)) token ??= p.slice(AUTH_PREFIX.length);
      else if (p.startsWith(PORT_PREFIX)) port ??= p.slice(PORT_PREFIX.length);
    }
  }
  return { token, port, offersBaseSubprotocol };
}

/**
 * A Sec-WebSocket-Protocol value for the guest without AWS's subprotocols (they carry the
 * token); undefined when nothing is left, so the header is dropped.
 */
export function stripAwsSubprotocols(value: string): string | undefined {
  if (!value.includes(AWS_SUBPROTOCOL)) return value;
  const kept = value
    .split(',')
    .map((p) => p.trim())
    .filter((p) => p !== '' && !isAwsSubprotocol(p));
  return kept.length === 0 ? undefined : kept.join(', ');
}
