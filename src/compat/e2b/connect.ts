/**
 * A small server for the Connect protocol with JSON (https://connectrpc.com/docs/protocol),
 * the only encoding the `e2b` SDK uses towards envd (`useBinaryFormat: false`).
 *
 * Why hand-written rather than @connectrpc/connect-node: serving through the connect-node router
 * needs service descriptors, which would have to be generated from envd's .proto files, and
 * those may not be copied into this repository. Connect's JSON encoding is keyed by field names
 * (proto3 JSON mapping), so the messages are plain objects whose shapes envd.ts writes down
 * from reading envd's API; what remains is framing, which is small:
 * - unary: `POST /<package.Service>/<Method>`, `application/json` body in, JSON out; errors are
 *   an HTTP status plus `{"code": "<connect code>", "message"}`.
 * - server streaming: `application/connect+json`; request and every response message are
 *   enveloped (1 flag byte, 4-byte big-endian length, JSON); the stream ends with an envelope
 *   flagged 0x02 holding `{}` or `{"error": {...}}`. Every message is written (and flushed) as
 *   soon as it exists: nothing here buffers a stream.
 * Compressed envelopes (flag 0x01) are refused: the SDK does not send them.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';

export type ConnectCode =
  | 'canceled' | 'unknown' | 'invalid_argument' | 'deadline_exceeded' | 'not_found' | 'already_exists'
  | 'permission_denied' | 'resource_exhausted' | 'failed_precondition' | 'aborted' | 'out_of_range'
  | 'unimplemented' | 'internal' | 'unavailable' | 'data_loss' | 'unauthenticated';

const HTTP_STATUS: Record<ConnectCode, number> = {
  canceled: 499, unknown: 500, invalid_argument: 400, deadline_exceeded: 504, not_found: 404, already_exists: 409,
  permission_denied: 403, resource_exhausted: 429, failed_precondition: 400, aborted: 409, out_of_range: 400,
  unimplemented: 501, internal: 500, unavailable: 503, data_loss: 500, unauthenticated: 401,
};

export class ConnectError extends Error {
  readonly code: ConnectCode;
  constructor(code: ConnectCode, message: string) {
    super(message);
    this.code = code;
  }
}

/**
 * Ends a stream by dropping the connection instead of an end-of-stream message: what a client
 * sees when the sandbox under it goes away (the SDK then asks /health and says so).
 */
export class DropConnection extends Error {}

/** A JSON message (proto3 JSON mapping). */
export type Message = Record<string, unknown>;

export interface CallContext {
  req: IncomingMessage;
  /** Aborted when the client goes away or the deadline (Connect-Timeout-Ms) passes. */
  signal: AbortSignal;
  /** Whether `signal` fired for the deadline (rather than the client leaving). */
  deadlineExceeded(): boolean;
  /** Keepalive-Ping-Interval (seconds) the client asked for, if any. */
  keepaliveSeconds: number | undefined;
}

export type UnaryMethod = (request: Message, context: CallContext) => Promise<Message>;
/** Sends messages with `send` (resolves once written); resolves when the stream is complete. */
export type StreamMethod = (request: Message, context: CallContext, send: (message: Message) => Promise<void>) => Promise<void>;

export interface ConnectService {
  unary: Record<string, UnaryMethod>;
  stream: Record<string, StreamMethod>;
}

/** Bodies of requests (a SendInput carries stdin, base64): bounded. */
const MAX_REQUEST_BYTES = 8 * 1024 * 1024;
const MAX_TIMEOUT_MS = 10 ** 10;

async function readBody(req: IncomingMessage, limit: number): Promise<Buffer> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of req as AsyncIterable<Buffer>) {
    size += chunk.length;
    if (size > limit) throw new ConnectError('resource_exhausted', `the request is larger than ${limit} bytes`);
    chunks.push(chunk);
  }
  return Buffer.concat(chunks);
}

function parseJson(bytes: Buffer): Message {
  let value: unknown;
  try {
    value = bytes.length === 0 ? {} : JSON.parse(bytes.toString('utf8'));
  } catch {
    throw new ConnectError('invalid_argument', 'the request is not valid JSON');
  }
  if (!value || typeof value !== 'object' || Array.isArray(value)) throw new ConnectError('invalid_argument', 'the request must be a JSON object');
  return value as Message;
}

function envelope(flags: number, payload: unknown): Buffer {
  const json = Buffer.from(JSON.stringify(payload));
  const head = Buffer.alloc(5);
  head.writeUInt8(flags, 0);
  head.writeUInt32BE(json.length, 1);
  return Buffer.concat([head, json]);
}

function errorJson(error: unknown): { code: ConnectCode; message: string } {
  if (error instanceof ConnectError) return { code: error.code, message: error.message };
  return { code: 'internal', message: 'internal error; see the server log' };
}

function timeoutMs(req: IncomingMessage): number | undefined {
  const raw = req.headers['connect-timeout-ms'];
  if (typeof raw !== 'string' || !/^[0-9]{1,10}$/.test(raw)) return undefined;
  const ms = Number(raw);
  return ms > 0 && ms < MAX_TIMEOUT_MS ? ms : undefined;
}

/** Serves one Connect call; `path` is `/<service>/<method>`. Answers false when no such service. */
export function serveConnect(
  services: Record<string, ConnectService>,
  req: IncomingMessage,
  res: ServerResponse,
  path: string,
  onError: (error: unknown) => void,
): boolean {
  const match = /^\/([A-Za-z0-9_.]+)\/([A-Za-z0-9_]+)$/.exec(path);
  const service = match ? services[match[1]!] : undefined;
  if (!match || !service) return false;
  const method = match[2]!;
  const contentType = (req.headers['content-type'] ?? '').split(';')[0]!.trim().toLowerCase();
  const streaming = contentType === 'application/connect+json';

  const client = new AbortController();
  let deadlinePassed = false;
  const limit = timeoutMs(req);
  const timer = limit === undefined ? undefined : setTimeout(() => {
    deadlinePassed = true;
    client.abort();
  }, limit);
  res.on('close', () => {
    clearTimeout(timer);
    client.abort();
  });
  const keepalive = Number(req.headers['keepalive-ping-interval']);
  const context: CallContext = {
    req,
    signal: client.signal,
    deadlineExceeded: () => deadlinePassed,
    keepaliveSeconds: Number.isInteger(keepalive) && keepalive > 0 ? Math.max(keepalive, 1) : undefined,
  };

  if (!streaming) {
    const fn = service.unary[method];
    const fail = (error: unknown) => {
      if (!(error instanceof ConnectError)) onError(error);
      const body = errorJson(error);
      if (!res.headersSent) res.writeHead(HTTP_STATUS[body.code], { 'content-type': 'application/json' });
      res.end(JSON.stringify(body));
    };
    if (req.method !== 'POST') {
      fail(new ConnectError('unimplemented', 'Connect calls are POST'));
      return true;
    }
    if (!fn) {
      fail(new ConnectError(service.stream[method] ? 'invalid_argument' : 'unimplemented', `${match[1]}/${method} is not served here`));
      return true;
    }
    if (contentType !== 'application/json') {
      fail(new ConnectError('invalid_argument', 'send application/json (Connect with JSON)'));
      return true;
    }
    readBody(req, MAX_REQUEST_BYTES)
      .then((bytes) => fn(parseJson(bytes), context))
      .then((answer) => {
        clearTimeout(timer);
        const json = JSON.stringify(answer);
        res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(json) });
        res.end(json);
      })
      .catch((error: unknown) => {
        clearTimeout(timer);
        fail(deadlinePassed ? new ConnectError('deadline_exceeded', 'the deadline (Connect-Timeout-Ms) passed') : error);
      });
    return true;
  }

  const fn = service.stream[method];
  res.writeHead(200, { 'content-type': 'application/connect+json' });
  // Small messages must leave at once (the start event above all).
  res.socket?.setNoDelay(true);
  const end = (error?: unknown) => {
    clearTimeout(timer);
    if (res.writableEnded || res.destroyed) return;
    res.end(envelope(2, error === undefined ? {} : { error: errorJson(error) }));
  };
  const send = (message: Message): Promise<void> =>
    new Promise((resolve, reject) => {
      if (res.writableEnded || res.destroyed || client.signal.aborted) {
        reject(new ConnectError('canceled', 'the stream ended'));
        return;
      }
      if (res.write(envelope(0, message))) resolve();
      else {
        const done = () => {
          res.off('drain', done);
          res.off('close', done);
          resolve();
        };
        res.on('drain', done);
        res.on('close', done);
      }
    });
  (async () => {
    if (!fn) throw new ConnectError('unimplemented', `${match[1]}/${method} is not served here (or not as a stream)`);
    const body = await readBody(req, MAX_REQUEST_BYTES);
    if (body.length < 5) throw new ConnectError('invalid_argument', 'the stream request has no enveloped message');
    const flags = body.readUInt8(0);
    const length = body.readUInt32BE(1);
    if (flags & 1) throw new ConnectError('unimplemented', 'compressed messages are not supported');
    if (length !== body.length - 5) throw new ConnectError('invalid_argument', 'the stream request must hold exactly one message');
    await fn(parseJson(body.subarray(5)), context, send);
  })().then(
    () => end(deadlinePassed ? new ConnectError('deadline_exceeded', 'the deadline (Connect-Timeout-Ms) passed') : undefined),
    (error: unknown) => {
      if (error instanceof DropConnection) {
        clearTimeout(timer);
        res.destroy();
        return;
      }
      if (deadlinePassed) return end(new ConnectError('deadline_exceeded', 'the deadline (Connect-Timeout-Ms) passed'));
      if (!(error instanceof ConnectError)) onError(error);
      end(error);
    },
  );
  return true;
}
