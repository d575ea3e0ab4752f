/**
 * Clients for the exec API in tests: ndjson exec (events collected), raw file up/down, the
 * WebSocket protocol (API and gateway shell).
 */
import http from 'node:http';
import { Readable } from 'node:stream';
import WebSocket from 'ws';

export interface ExecResult {
  status: number;
  events: Array<Record<string, unknown>>;
  stdout: string;
  stderr: string;
  exit: Record<string, unknown> | undefined;
  error: { code: string; message: string } | undefined;
}

export function apiPort(apiUrl: string): number {
  return Number(new URL(apiUrl).port);
}

/** POST /exec, reading the ndjson stream to its end (or the error answer). */
export function execCall(port: number, key: string, microvmId: string, body: unknown, onEvent?: (event: Record<string, unknown>) => void): Promise<ExecResult> {
  return new Promise((resolve, reject) => {
    const req = http.request(
      { host: '127.0.0.1', port, method: 'POST', path: `/api/v1/microvms/${microvmId}/exec`, headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' }, agent: false },
      (res) => {
        let buffer = '';
        const result: ExecResult = { status: res.statusCode ?? 0, events: [], stdout: '', stderr: '', exit: undefined, error: undefined };
        res.setEncoding('utf8');
        res.on('data', (chunk: string) => {
          buffer += chunk;
          let nl: number;
          while (res.statusCode === 200 && (nl = buffer.indexOf('\n')) >= 0) {
            const event = JSON.parse(buffer.slice(0, nl)) as Record<string, unknown>;
            buffer = buffer.slice(nl + 1);
            result.events.push(event);
            onEvent?.(event);
            if (event.type === 'stdout') result.stdout += Buffer.from(event.data as string, 'base64').toString();
            if (event.type === 'stderr') result.stderr += Buffer.from(event.data as string, 'base64').toString();
            if (event.type === 'exit') result.exit = event;
            if (event.type === 'error') result.error = event.error as ExecResult['error'];
          }
        });
        res.on('end', () => {
          if (res.statusCode !== 200 && buffer) result.error = (JSON.parse(buffer) as { error: ExecResult['error'] }).error;
          resolve(result);
        });
        res.on('error', reject);
      },
    );
    req.on('error', reject);
    req.end(JSON.stringify(body));
  });
}

export function upload(port: number, key: string, microvmId: string, guestPath: string, body: Readable | Buffer): Promise<{ status: number; body: any }> {
  return new Promise((resolve, reject) => {
    const req = http.request(
      {
        host: '127.0.0.1', port, method: 'PUT', path: `/api/v1/microvms/${microvmId}/files?path=${encodeURIComponent(guestPath)}`,
        headers: { authorization: `Bearer ${key}`, 'content-type': 'application/octet-stream', ...(Buffer.isBuffer(body) ? { 'content-length': String(body.length) } : {}) },
        agent: false,
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body: JSON.parse(Buffer.concat(chunks).toString() || 'null') }));
      },
    );
    req.on('error', reject);
    if (Buffer.isBuffer(body)) req.end(body);
    else body.pipe(req);
  });
}

/** GET /files as a stream (the caller consumes it). */
export function download(port: number, key: string, microvmId: string, guestPath: string): Promise<http.IncomingMessage> {
  return new Promise((resolve, reject) => {
    const req = http.request(
      { host: '127.0.0.1', port, method: 'GET', path: `/api/v1/microvms/${microvmId}/files?path=${encodeURIComponent(guestPath)}`, headers: { authorization: `Bearer ${key}` }, agent: false },
      resolve,
    );
    req.on('error', reject);
    req.end();
  });
}

/** A deterministic pseudo-random byte stream of `size` bytes (never held in memory whole). */
export function patternStream(size: number, seed = 1): Readable {
  let sent = 0;
  let x = seed >>> 0 || 1;
  return new Readable({
    read() {
      if (sent >= size) return void this.push(null);
      const n = Math.min(256 * 1024, size - sent);
      const chunk = Buffer.allocUnsafe(n);
      for (let i = 0; i < n; i += 4) {
        x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
        chunk.writeUInt32LE(x, i);
      }
      sent += n;
      this.push(chunk);
    },
  });
}

export interface WsSession {
  ws: WebSocket;
  output(): string;
  messages: Array<Record<string, unknown>>;
  waitFor(pattern: RegExp, timeoutMs?: number): Promise<string>;
  closed: Promise<{ code: number }>;
  send(text: string): void;
}

/** Opens a WebSocket and, once open, sends the start message; collects output and JSON messages. */
export function openWs(url: string, options: { headers?: Record<string, string>; protocols?: string[]; start: Record<string, unknown> }): Promise<WsSession> {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, options.protocols ?? [], { headers: options.headers ?? {} });
    let out = '';
    const messages: Array<Record<string, unknown>> = [];
    const listeners = new Set<() => void>();
    const closed = new Promise<{ code: number }>((r) => ws.on('close', (code) => r({ code })));
    ws.on('message', (data, isBinary) => {
      const bytes = data as Buffer;
      if (isBinary) {
        out += bytes.subarray(1).toString();
        // Answer a cursor position query as a terminal would (busybox's shell waits for it).
        if (bytes.includes('\x1b[6n')) ws.send(Buffer.from('\x1b[1;1R'), { binary: true });
      }
      else messages.push(JSON.parse(bytes.toString()) as Record<string, unknown>);
      for (const l of listeners) l();
    });
    ws.on('unexpected-response', (_req, res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => reject(Object.assign(new Error(`refused ${res.statusCode}: ${Buffer.concat(chunks).toString()}`), { status: res.statusCode, body: Buffer.concat(chunks).toString() })));
    });
    ws.on('error', reject);
    ws.on('open', () => {
      ws.send(JSON.stringify({ type: 'start', ...options.start }));
      resolve({
        ws,
        output: () => out,
        messages,
        closed,
        send: (text) => ws.send(Buffer.from(text), { binary: true }),
        waitFor(pattern, timeoutMs = 60_000) {
          return new Promise((res, rej) => {
            const check = () => {
              const m = pattern.exec(out);
              if (m) {
                listeners.delete(check);
                clearTimeout(timer);
                res(m[0]);
              }
            };
            const timer = setTimeout(() => {
              listeners.delete(check);
              rej(new Error(`no ${pattern} in output: ${JSON.stringify(out.slice(-500))} messages ${JSON.stringify(messages)}`));
            }, timeoutMs);
            listeners.add(check);
            check();
          });
        },
      });
    });
  });
}
