/**
 * The CLI's WebSockets for exec sessions, built on `ws`: it sends the API key in the
 * Authorization header (browsers cannot, so the SDK's default puts it in the first message),
 * and when the server refuses the handshake with an HTTP error it reads the API's error shape
 * from the answer, so that `cocoon vm exec` on an unknown microVM says "not found" (exit 3)
 * instead of "Unexpected server response: 404".
 */
import WebSocket from 'ws';
import { apiError, type WebSocketFactory, type WebSocketLike } from '../../packages/sdk/src/index.ts';

/** The most a refused handshake's body is read for its error message. */
const MAX_ERROR_BODY = 64 * 1024;
/** The largest message the CLI accepts from the server (output arrives in small frames). */
const MAX_PAYLOAD = 16 * 1024 * 1024;

export const wsFactory: WebSocketFactory = Object.assign(
  (url: string, init: { headers: Record<string, string>; protocols?: string[] }): WebSocketLike => {
    const socket = new WebSocket(url, init.protocols ?? [], { headers: init.headers, maxPayload: MAX_PAYLOAD, perMessageDeflate: false });
    const like = socket as unknown as WebSocketLike;
    socket.on('unexpected-response', (_request, response) => {
      let body = '';
      response.setEncoding('utf8');
      response.on('data', (chunk: string) => {
        if (body.length < MAX_ERROR_BODY) body += chunk;
      });
      const finish = () => {
        let code = `http_${response.statusCode}`;
        let message = `the server refused the WebSocket: ${response.statusCode} ${response.statusMessage ?? ''}`.trim();
        try {
          const parsed = JSON.parse(body) as { error?: { code?: unknown; message?: unknown } };
          if (typeof parsed.error?.code === 'string') code = parsed.error.code;
          if (typeof parsed.error?.message === 'string') message = parsed.error.message;
        } catch {
          // not the API's error shape: keep the status
        }
        like.failure = apiError({ code, message, status: response.statusCode ?? 500, request: `GET ${new URL(url).pathname}` });
        socket.terminate();
      };
      response.once('end', finish);
      response.once('error', finish);
    });
    return like;
  },
  { sendsHeaders: true },
);
