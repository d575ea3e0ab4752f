/**
 * The transport: one `fetch` per call (global fetch, nothing else), the API key as a bearer
 * token, a timeout per request combined with the caller's AbortSignal, and error answers turned
 * into typed exceptions.
 */
import { apiError, CocoonConnectionError, CocoonError, CocoonTimeoutError, InvalidArgumentError } from './errors.ts';

export const API_PREFIX = '/api/v1';
export const DEFAULT_TIMEOUT_MS = 60_000;

/** Options every call accepts. */
export interface CallOptions {
  /** Cancels the call (the promise rejects with the signal's reason, an AbortError by default). */
  signal?: AbortSignal;
  /** This call's timeout in milliseconds (default: the client's, 60 s). 0: none. */
  timeoutMs?: number;
}

export type Query = Record<string, string | number | boolean | Array<string | number> | null | undefined>;

export interface RequestSpec extends CallOptions {
  method: string;
  path: string;
  query?: Query;
  json?: unknown;
  body?: NonNullable<RequestInit['body']>;
  headers?: Record<string, string>;
  /** Public routes need no key. */
  anonymous?: boolean;
  /**
   * For streamed answers: the timeout covers only the wait for the answer's headers, and the
   * body stays open until read or cancelled.
   */
  stream?: boolean;
}

export interface TransportOptions {
  apiUrl: string;
  apiKey: string | undefined;
  timeoutMs: number;
  fetch: typeof fetch;
  headers: Record<string, string>;
}

/** `http://host:7070`, `http://host:7070/`, `http://host:7070/api/v1` → `http://host:7070`. */
export function normalizeApiUrl(url: string): string {
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    throw new InvalidArgumentError(`the API URL ${JSON.stringify(url)} is not a URL; expected e.g. http://127.0.0.1:7070`);
  }
  if (parsed.protocol !== 'http:' && parsed.protocol !== 'https:') {
    throw new InvalidArgumentError(`the API URL must be http:// or https://, got ${JSON.stringify(url)}`);
  }
  let path = parsed.pathname.replace(/\/+$/, '');
  if (path.endsWith(API_PREFIX)) path = path.slice(0, -API_PREFIX.length);
  return `${parsed.origin}${path}`;
}

export function buildQuery(query: Query | undefined): string {
  if (!query) return '';
  const params = new URLSearchParams();
  for (const [key, value] of Object.entries(query)) {
    if (value === undefined || value === null) continue;
    if (Array.isArray(value)) for (const v of value) params.append(key, String(v));
    else params.append(key, String(value));
  }
  const text = params.toString();
  return text ? `?${text}` : '';
}

/** A path segment for an id or an ARN (ARNs hold ':' and '/'). */
export function segment(id: string): string {
  if (typeof id !== 'string' || id === '') throw new InvalidArgumentError('an id is required');
  return encodeURIComponent(id);
}

export class Transport {
  readonly options: TransportOptions;

  constructor(options: TransportOptions) {
    this.options = options;
  }

  get apiUrl(): string {
    return this.options.apiUrl;
  }

  /** Sends one request; resolves with the response of a 2xx answer, throws a typed error otherwise. */
  async send(spec: RequestSpec): Promise<Response> {
    const { apiUrl, apiKey, fetch: doFetch } = this.options;
    const url = `${apiUrl}${API_PREFIX}${spec.path}${buildQuery(spec.query)}`;
    const label = `${spec.method} ${API_PREFIX}${spec.path}`;
    const headers: Record<string, string> = { accept: 'application/json', ...this.options.headers, ...spec.headers };
    if (!spec.anonymous) {
      if (!apiKey) {
        throw new CocoonError('no API key: pass { apiKey } to new Cocoon() or set COCOON_API_KEY');
      }
      headers.authorization = `Bearer ${apiKey}`;
    }
    let body: NonNullable<RequestInit['body']> | undefined = spec.body;
    if (spec.json !== undefined) {
      body = JSON.stringify(spec.json);
      headers['content-type'] = 'application/json';
    }

    const timeoutMs = spec.timeoutMs ?? this.options.timeoutMs;
    const controller = new AbortController();
    let timedOut = false;
    const timer = timeoutMs > 0
      ? setTimeout(() => {
        timedOut = true;
        controller.abort(new CocoonTimeoutError(label, timeoutMs));
      }, timeoutMs)
      : undefined;
    const onAbort = () => controller.abort(spec.signal?.reason);
    if (spec.signal?.aborted) onAbort();
    else spec.signal?.addEventListener('abort', onAbort, { once: true });
    const done = () => {
      clearTimeout(timer);
      spec.signal?.removeEventListener('abort', onAbort);
    };

    const init: RequestInit & { duplex?: 'half' } = { method: spec.method, headers, signal: controller.signal };
    if (body !== undefined) {
      init.body = body;
      if (typeof ReadableStream !== 'undefined' && body instanceof ReadableStream) init.duplex = 'half';
    }
    let response: Response;
    try {
      response = await doFetch(url, init);
    } catch (error) {
      done();
      if (timedOut) throw new CocoonTimeoutError(label, timeoutMs);
      if (spec.signal?.aborted) throw spec.signal.reason ?? error;
      if (error instanceof CocoonError) throw error;
      throw new CocoonConnectionError(apiUrl, error);
    }

    if (!response.ok) {
      try {
        throw await errorFromResponse(response, label);
      } finally {
        done();
      }
    }
    if (response.status === 204 || response.status === 205) {
      done();
      await response.body?.cancel().catch(() => undefined);
      return new Response(null, { status: response.status, headers: response.headers });
    }
    if (!spec.stream) {
      // Read the whole body under the same timeout and signal.
      try {
        const buffered = new Response(await response.arrayBuffer(), { status: response.status, headers: response.headers });
        return buffered;
      } catch (error) {
        if (timedOut) throw new CocoonTimeoutError(label, timeoutMs);
        if (spec.signal?.aborted) throw spec.signal.reason ?? error;
        throw new CocoonConnectionError(apiUrl, error);
      } finally {
        done();
      }
    }
    // Streams: the timeout was for the headers; the caller's signal still cancels the body.
    clearTimeout(timer);
    if (response.body) {
      const release = () => spec.signal?.removeEventListener('abort', onAbort);
      return new Response(
        response.body.pipeThrough(new TransformStream({ flush: release })),
        { status: response.status, headers: response.headers },
      );
    }
    done();
    return response;
  }

  async json<T>(spec: RequestSpec): Promise<T> {
    const response = await this.send(spec);
    if (response.status === 204) return undefined as T;
    const text = await response.text();
    if (text === '') return undefined as T;
    try {
      return JSON.parse(text) as T;
    } catch (error) {
      throw new CocoonError(`the server's answer to ${spec.method} ${spec.path} is not JSON`, { cause: error });
    }
  }

  async text(spec: RequestSpec): Promise<string> {
    return (await this.send(spec)).text();
  }
}

async function errorFromResponse(response: Response, label: string): Promise<CocoonError> {
  let text = '';
  try {
    text = await response.text();
  } catch {
    // the body is lost; the status still says what happened
  }
  let code = `http_${response.status}`;
  let message = text.trim().slice(0, 500) || `${response.status} ${response.statusText}`.trim();
  try {
    const parsed = JSON.parse(text) as { error?: { code?: unknown; message?: unknown } };
    if (parsed?.error && typeof parsed.error.code === 'string') {
      code = parsed.error.code;
      if (typeof parsed.error.message === 'string') message = parsed.error.message;
    }
  } catch {
    // not the API's error shape (a proxy in between?): keep the status and text
  }
  return apiError({ code, message, status: response.status, request: label });
}

/** Resolves after `ms`, or rejects at once when `signal` aborts. */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) {
      reject(signal.reason);
      return;
    }
    const onAbort = () => {
      clearTimeout(timer);
      reject(signal?.reason);
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

/**
 * Splits a byte stream into lines (without their line ends); the last line may lack one.
 * A line longer than `maxLineLength` characters is an error (a stream that never ends a line
 * would otherwise grow without bound).
 */
export async function* lines(body: ReadableStream<Uint8Array>, signal?: AbortSignal, maxLineLength = Infinity): AsyncGenerator<string> {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  const onAbort = () => void reader.cancel(signal?.reason).catch(() => undefined);
  signal?.addEventListener('abort', onAbort, { once: true });
  let pending = '';
  try {
    for (;;) {
      if (signal?.aborted) throw signal.reason;
      const { value, done } = await reader.read();
      if (done) break;
      pending += value;
      let newline: number;
      while ((newline = pending.indexOf('\n')) >= 0) {
        yield pending.slice(0, newline).replace(/\r$/, '');
        pending = pending.slice(newline + 1);
      }
      if (pending.length > maxLineLength) throw new CocoonError(`the server sent a line longer than ${maxLineLength} characters`);
    }
    if (signal?.aborted) throw signal.reason;
    if (pending !== '') yield pending;
  } finally {
    signal?.removeEventListener('abort', onAbort);
    await reader.cancel().catch(() => undefined);
  }
}
