/**
 * WebSocket (HTTP/1.1 Upgrade) proxying: the handshake goes to the guest over a fresh
 * connection; on 101 the two sockets are spliced together byte for byte.
 */
import http, { type IncomingMessage } from 'node:http';
import type { Duplex } from 'node:stream';
import { STATUS_CODES } from 'node:http';
import { clientResponseHeaders } from './headers.ts';

export interface WebSocketProxyRequest {
  readonly req: IncomingMessage;
  readonly socket: Duplex;
  /** Bytes the client sent after its handshake, already read by the server. */
  readonly head: Buffer;
  readonly host: string;
  readonly port: number;
  readonly path: string;
  /** Flat request headers, rewritten, with Connection/Upgrade kept. */
  readonly headers: string[];
  /** Answered as Sec-WebSocket-Protocol when the guest picks none (AWS's `lambda-microvms`). */
  readonly defaultSubprotocol?: string;
  readonly handshakeTimeoutMs: number;
  /** The guest accepted (101): the tunnel is open. */
  onOpen(): void;
  /** The tunnel closed (called once, only after onOpen). */
  onClose(): void;
  /** The handshake ended without a tunnel (refused, error, client gone); `status` was sent when > 0. */
  onHandshakeEnd(status: number, error?: Error): void;
}

function headLines(statusCode: number, statusMessage: string | undefined, headers: http.OutgoingHttpHeaders): string {
  let s = `HTTP/1.1 ${statusCode} ${statusMessage ?? STATUS_CODES[statusCode] ?? ''}\r\n`;
  for (const [name, value] of Object.entries(headers)) {
    if (value === undefined) continue;
    for (const v of Array.isArray(value) ? value : [value]) s += `${name}: ${v}\r\n`;
  }
  return `${s}\r\n`;
}

/** Builds an error response for a raw socket (no ServerResponse exists for upgrades). */
export function rawResponse(status: number, headers: Record<string, string>, body: string): string {
  const h: Record<string, string> = {
    ...headers,
    'content-length': String(Buffer.byteLength(body)),
    connection: 'close',
  };
  return headLines(status, undefined, h) + body;
}

export function proxyWebSocket(p: WebSocketProxyRequest): { abort(): void } {
  const { socket } = p;
  let finished = false;
  let opened = false;
  const endHandshake = (status: number, error?: Error): void => {
    if (finished) return;
    finished = true;
    p.onHandshakeEnd(status, error);
  };

  const upReq = http.request({
    host: p.host,
    port: p.port,
    method: p.req.method,
    path: p.path,
    headers: p.headers,
    setHost: false,
    agent: false,
  });
  const timer = setTimeout(() => {
    upReq.destroy(Object.assign(new Error('the guest did not answer the WebSocket handshake in time'), { code: 'ETIMEDOUT' }));
  }, p.handshakeTimeoutMs);
  timer.unref();

  const onClientGone = (): void => {
    if (opened) return;
    upReq.destroy();
    endHandshake(0, new Error('the client closed the connection during the handshake'));
  };
  socket.once('close', onClientGone);

  upReq.on('error', (error: NodeJS.ErrnoException) => {
    clearTimeout(timer);
    if (opened || finished) return;
    const timeout = error.code === 'ETIMEDOUT';
    const status = timeout ? 504 : 502;
    const body = JSON.stringify({
      error: timeout
        ? { code: 'upstream_timeout', message: 'the microVM did not answer the WebSocket handshake in time' }
        : { code: 'upstream_unreachable', message: 'the gateway could not reach the microVM app' },
    });
    if (socket.writable) socket.end(rawResponse(status, { 'content-type': 'application/json' }, body));
    endHandshake(status, error);
  });

  upReq.on('response', (upRes) => {
    // The guest answered without upgrading: relay its answer and close.
    clearTimeout(timer);
    const headers = clientResponseHeaders(upRes.headers);
    delete headers['content-length'];
    headers['connection'] = 'close';
    socket.write(headLines(upRes.statusCode ?? 502, upRes.statusMessage, headers));
    upRes.pipe(socket);
    upRes.on('error', () => socket.destroy());
    endHandshake(upRes.statusCode ?? 502);
  });

  upReq.on('upgrade', (upRes, upSocket, upHead) => {
    clearTimeout(timer);
    if (finished || socket.destroyed) {
      upSocket.destroy();
      return;
    }
    opened = true;
    finished = true;
    socket.removeListener('close', onClientGone);
    const answer = clientResponseHeaders(upRes.headers, true);
    if (p.defaultSubprotocol !== undefined && upRes.headers['sec-websocket-protocol'] === undefined) {
      answer['sec-websocket-protocol'] = p.defaultSubprotocol;
    }
    socket.write(headLines(upRes.statusCode ?? 101, upRes.statusMessage, answer));
    if (upHead.length > 0) socket.write(upHead);
    if (p.head.length > 0) upSocket.write(p.head);
    for (const s of [socket, upSocket]) {
      const net = s as Duplex & { setNoDelay?: (v: boolean) => void; setTimeout?: (ms: number) => void };
      net.setNoDelay?.(true);
      net.setTimeout?.(0);
    }
    let closed = false;
    const close = (): void => {
      if (closed) return;
      closed = true;
      socket.destroy();
      upSocket.destroy();
      p.onClose();
    };
    socket.on('error', close).on('close', close);
    upSocket.on('error', close).on('close', close);
    upSocket.pipe(socket);
    socket.pipe(upSocket);
    p.onOpen();
  });

  upReq.end();
  return {
    abort(): void {
      upReq.destroy();
      socket.destroy();
    },
  };
}
