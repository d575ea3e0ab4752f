/**
 * The gateway's shell endpoint (docs/exec.md, "Shell through the gateway"): `GET /.cocoon/shell` as a
 * WebSocket, admitted only with a token of scope `shell` (which in turn opens nothing else).
 * The gateway checks the token and routes; the platform plugs in what serves the socket (the
 * exec service's PTY session), so the gateway depends on no exec code.
 */
import type { IncomingMessage } from 'node:http';
import type { Duplex } from 'node:stream';

export const SHELL_PATH = '/.cocoon/shell';
/** Browsers cannot set headers on a WebSocket: the token may come as this subprotocol's suffix. */
export const TOKEN_SUBPROTOCOL_PREFIX = 'cocoon.token.';

export type ShellHandler = (microvmId: string, req: IncomingMessage, socket: Duplex, head: Buffer) => void;

export function isShellPath(target: string): boolean {
  const q = target.indexOf('?');
  return (q < 0 ? target : target.slice(0, q)) === SHELL_PATH;
}

/** The token of a `cocoon.token.<token>` subprotocol, if the handshake offers one. */
export function subprotocolToken(req: IncomingMessage): string | undefined {
  const header = req.headers['sec-websocket-protocol'];
  if (typeof header !== 'string') return undefined;
  for (const part of header.split(',')) {
    const p = part.trim();
    if (p.startsWith(TOKEN_SUBPROTOCOL_PREFIX)) return p.slice(TOKEN_SUBPROTOCOL_PREFIX.length);
  }
  return undefined;
}
