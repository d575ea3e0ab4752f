/**
 * The interactive exec protocol over a WebSocket (docs/exec.md, "Interactive exec"), shared by the
 * API's `/microvms/{id}/exec/ws` and the gateway's `/.cocoon/shell`:
 * - client → server: first a text `{"type":"start",...}`; then binary frames (stdin) and text
 *   `{"type":"resize"|"signal"|"eof"}`;
 * - server → client: `{"type":"started","pid"}`, binary frames `[1|2, ...bytes]` (stdout/PTY,
 *   stderr), then `{"type":"exit",...}` or `{"type":"error",...}` and a close.
 * Output is back-pressured: the next event is pulled only once the socket's buffer drained.
 */
import type { WebSocket } from 'ws';
import { CocoonError, errorMessage } from '../common/errors.ts';
import type { ExecRequest, ExecSession } from './types.ts';

/** Largest client message (stdin frames, the start message). */
export const MAX_WS_MESSAGE = 1024 * 1024;
const HIGH_WATER = 512 * 1024;
const START_TIMEOUT_MS = 30_000;

export interface StartMessage extends ExecRequest {
  apiKey?: string;
}

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** Validates the first message's shape (the service validates values further). */
export function parseStart(text: string, forceTty: boolean): StartMessage {
  let msg: unknown;
  try {
    msg = JSON.parse(text);
  } catch {
    throw new CocoonError('invalid_request', 'the first message must be JSON: {"type":"start",...}', { status: 400 });
  }
  if (!isRecord(msg) || msg.type !== 'start') throw new CocoonError('invalid_request', 'the first message must be {"type":"start",...}', { status: 400 });
  const out: StartMessage = { command: [] };
  const command = msg.command;
  if (typeof command === 'string') out.command = command;
  else if (Array.isArray(command) && command.every((a) => typeof a === 'string')) out.command = command as string[];
  else if (command !== undefined) throw new CocoonError('invalid_request', 'command is a list of strings or a shell string', { status: 400 });
  const tty = forceTty || msg.tty === true;
  out.tty = tty;
  out.stdin = true;
  const int = (name: string, min: number, max: number): number | undefined => {
    const v = msg[name];
    if (v === undefined) return undefined;
    if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > max) throw new CocoonError('invalid_request', `${name} must be an integer ${min}-${max}`, { status: 400 });
    return v;
  };
  const cols = int('cols', 1, 1000), rows = int('rows', 1, 1000), timeout = int('timeoutSeconds', 1, 86400);
  if (cols !== undefined) out.cols = cols;
  if (rows !== undefined) out.rows = rows;
  if (timeout !== undefined) out.timeoutSeconds = timeout;
  if (msg.env !== undefined) {
    if (!isRecord(msg.env) || !Object.values(msg.env).every((v) => typeof v === 'string')) throw new CocoonError('invalid_request', 'env is an object of strings', { status: 400 });
    out.env = msg.env as Record<string, string>;
  }
  for (const name of ['cwd', 'user', 'apiKey'] as const) {
    const v = msg[name];
    if (v === undefined) continue;
    if (typeof v !== 'string') throw new CocoonError('invalid_request', `${name} is a string`, { status: 400 });
    out[name] = v;
  }
  return out;
}

/** The default command: the user's login shell is not known here, so /bin/sh (a login shell when present). */
export function defaultCommand(request: StartMessage): ExecRequest['command'] {
  const command = request.command;
  if ((Array.isArray(command) && command.length > 0) || (typeof command === 'string' && command.length > 0)) return command;
  return ['/bin/sh', '-l'];
}

function sendJson(ws: WebSocket, value: unknown): void {
  if (ws.readyState === ws.OPEN) ws.send(JSON.stringify(value));
}

function sendError(ws: WebSocket, error: unknown): void {
  const code = error instanceof CocoonError ? error.code : 'internal';
  const message = error instanceof CocoonError ? error.message : errorMessage(error);
  sendJson(ws, { type: 'error', error: { code, message } });
  ws.close(1011, code.slice(0, 100));
}

/**
 * Serves one WebSocket: waits for the start message, opens the session with `open`, then pumps.
 * `authorize` checks the start message (e.g. its apiKey) before anything runs.
 */
export function serveExecWebSocket(
  ws: WebSocket,
  options: { forceTty: boolean; open: (start: StartMessage) => Promise<ExecSession> },
): void {
  let session: ExecSession | undefined;
  let closed = false;
  const timer = setTimeout(() => sendError(ws, new CocoonError('invalid_request', 'no start message in time', { status: 400 })), START_TIMEOUT_MS);
  ws.on('close', () => {
    closed = true;
    clearTimeout(timer);
    session?.close();
  });
  ws.on('error', () => undefined);
  let inputChain = Promise.resolve();
  let starting = false;
  // Input sent right behind the start message (a client need not wait for "started"): kept,
  // bounded, and delivered in order once the process runs.
  const early: Array<[Buffer, boolean]> = [];
  let earlyBytes = 0;
  const onMessage = (bytes: Buffer, isBinary: boolean): void => {
    if (session === undefined) {
      if (starting) {
        earlyBytes += bytes.length;
        if (earlyBytes > MAX_WS_MESSAGE) {
          sendError(ws, new CocoonError('payload_too_large', 'too much input before the process started', { status: 413 }));
          return;
        }
        early.push([bytes, isBinary]);
        return;
      }
      if (isBinary) return;
      starting = true;
      clearTimeout(timer);
      let start: StartMessage;
      try {
        start = parseStart(bytes.toString('utf8'), options.forceTty);
      } catch (error) {
        sendError(ws, error);
        return;
      }
      options.open(start).then(
        (opened) => {
          if (closed) {
            opened.close();
            return;
          }
          session = opened;
          sendJson(ws, { type: 'started', pid: opened.pid });
          void pump(ws, opened);
          for (const [b, binary] of early.splice(0)) onMessage(b, binary);
        },
        (error: unknown) => sendError(ws, error),
      );
      return;
    }
    const current = session;
    if (isBinary) {
      // Stdin is written in order; the socket stops being read while the guest is behind.
      ws.pause();
      inputChain = inputChain.then(() => current.write(bytes)).then(
        () => ws.resume(),
        () => ws.resume(),
      );
      return;
    }
    let msg: unknown;
    try {
      msg = JSON.parse(bytes.toString('utf8'));
    } catch {
      return;
    }
    if (!isRecord(msg)) return;
    try {
      if (msg.type === 'resize' && Number.isInteger(msg.cols) && Number.isInteger(msg.rows)) {
        current.resize(Math.min(1000, Math.max(1, msg.cols as number)), Math.min(1000, Math.max(1, msg.rows as number)));
      } else if (msg.type === 'signal' && typeof msg.signal === 'string') {
        current.kill(msg.signal);
      } else if (msg.type === 'eof') {
        void inputChain.then(() => current.closeStdin());
      }
    } catch (error) {
      sendJson(ws, { type: 'warning', error: { code: error instanceof CocoonError ? error.code : 'invalid_request', message: errorMessage(error) } });
    }
  };
  ws.on('message', (data, isBinary) => {
    onMessage(Array.isArray(data) ? Buffer.concat(data) : Buffer.isBuffer(data) ? data : Buffer.from(data as ArrayBuffer), isBinary);
  });
}

async function pump(ws: WebSocket, session: ExecSession): Promise<void> {
  try {
    for await (const event of session.events()) {
      if (ws.readyState !== ws.OPEN) return;
      if (event.type === 'stdout' || event.type === 'stderr') {
        ws.send(Buffer.concat([Buffer.from([event.type === 'stdout' ? 1 : 2]), event.data]));
        while (ws.bufferedAmount > HIGH_WATER && ws.readyState === ws.OPEN) await new Promise((r) => setTimeout(r, 5));
      } else if (event.type === 'exit') {
        sendJson(ws, { type: 'exit', exitCode: event.exitCode, signal: event.signal, timedOut: event.timedOut, ...(event.reason ? { reason: event.reason } : {}) });
        ws.close(1000);
        return;
      } else {
        sendJson(ws, event);
        ws.close(1011, event.error.code.slice(0, 100));
        return;
      }
    }
  } catch (error) {
    sendError(ws, error);
  } finally {
    session.close();
  }
}
