/**
 * Sending one proxied HTTP exchange to a guest, streaming both bodies with backpressure. Three
 * interchangeable clients: the adaptive one (default: undici's Agent over pooled keep-alive
 * connections, and one node:http exchange on a connection of its own for an upstream that closes
 * every connection), undici's Agent alone, node:http's keep-alive Agent alone;
 * bench/gateway-overhead.ts and the bench suite `gateway` measure them (see docs/gateway.md).
 */
import http, { type ServerResponse } from 'node:http';
import net from 'node:net';
import type { Duplex, Readable } from 'node:stream';
import { Agent, buildConnector, type Dispatcher } from 'undici';
import type { CocoonError } from '../common/errors.ts';
import type { BodyMeter } from './body.ts';
import { clientResponseHeaders } from './headers.ts';
import { gatewayTuning } from './tuning.ts';

export interface ForwardRequest {
  readonly host: string;
  readonly port: number;
  readonly method: string;
  /** Origin-form request target. */
  readonly path: string;
  /** Flat [name, value, ...] request headers (already rewritten). */
  readonly headers: string[];
  readonly body: Readable | null;
  readonly res: ServerResponse;
  /**
   * New connections to this upstream that may wait for its accept at once (guestConnector's
   * `pendingPerUpstream` for this request; absent: the connector's own, 2). See
   * `pendingConnectsFor`.
   */
  readonly pendingConnects?: number;
}

/**
 * Most new connections to one guest port the gateway lets wait at once, whatever QEMU's backlog:
 * a pending connection is also one the guest's own kernel must queue for the app, and apps
 * listen with small backlogs (busybox httpd 9: 10 queued; Python's http.server 5: 6). A SYN
 * the guest drops waits for slirp's retransmission (6 s, then 12 s: libslirp's tcp_timer.h):
 * with 64, 32 clients for 20 s against busybox httpd left 12 requests unanswered after 60 s
 * (test/microvms/gateway-load.test.ts).
 */
export const MAX_PENDING_CONNECTS = 4;

/**
 * How many new connections to a forwarded guest port may wait for its accept at once, from the
 * backlog its listener was given (gateway/types.ts `MicroVMRoute.upstreamBacklog`): the kernel
 * queues backlog + 1 connections (libslirp's backlog 1: 2), at most MAX_PENDING_CONNECTS.
 */
export function pendingConnectsFor(backlog: number | undefined): number {
  return Math.min(MAX_PENDING_CONNECTS, Math.max(1, backlog ?? 1) + 1);
}

/** Why an exchange failed; `headersSent` says whether the client already has a status line. */
export class UpstreamFailure extends Error {
  readonly headersSent: boolean;
  /** The upstream did not answer in time (→ 504), the client went away, or anything else (→ 502). */
  readonly kind: 'timeout' | 'client_gone' | 'error';

  constructor(message: string, kind: UpstreamFailure['kind'], headersSent: boolean, cause?: unknown) {
    super(message, { cause });
    this.name = 'UpstreamFailure';
    this.kind = kind;
    this.headersSent = headersSent;
  }
}

export interface UpstreamClient {
  /**
   * Sends the request and streams the response into `res`. Resolves once the response is
   * complete; rejects with UpstreamFailure (the caller answers 502/504 or destroys `res`).
   */
  forward(request: ForwardRequest): Promise<void>;
  close(): Promise<void>;
}

/** What a caller of forwardAndSettle says to each way the exchange can end badly. */
export interface ForwardFailureAnswers {
  /** The meter of the request body, if it has one: its refusal is what the client is told. */
  readonly meter?: BodyMeter | null;
  /** The meter stopped the request body (too large, client too slow): answer that refusal. */
  bodyRefused?(refusal: CocoonError): void;
  /** The upstream failed before the client had a status line: answer 502 or 504. */
  unanswered(failure: UpstreamFailure): void;
  /** The upstream failed mid-response: `res` is destroyed already (the client sees the cut). */
  cut?(failure: UpstreamFailure): void;
}

/**
 * Forwards one exchange and settles its failure the way every proxy path does (the gateway to a
 * guest or to a peer host, the API to a peer host): a request body the meter refused is answered
 * with that refusal (the upstream failing is its consequence, not the cause); a client that went
 * away needs no answer; a response whose head the client already has can only be cut (destroyed);
 * anything else is the caller's 502/504 to answer. Resolves once settled, never rejects.
 */
export async function forwardAndSettle(client: UpstreamClient, request: ForwardRequest, answers: ForwardFailureAnswers): Promise<void> {
  try {
    await client.forward(request);
  } catch (error) {
    const { res } = request;
    const failure = error instanceof UpstreamFailure ? error : new UpstreamFailure(String(error), 'error', res.headersSent, error);
    const refusal = answers.meter?.failure;
    if (refusal !== undefined && answers.bodyRefused) {
      answers.bodyRefused(refusal);
      return;
    }
    if (failure.kind === 'client_gone') return;
    if (failure.headersSent || res.headersSent) {
      res.destroy();
      answers.cut?.(failure);
      return;
    }
    answers.unanswered(failure);
  }
}

export interface UpstreamClientOptions {
  /** Connections kept per upstream (host:port). */
  connectionsPerUpstream: number;
  connectTimeoutMs: number;
  /** Time to the response head. */
  headersTimeoutMs: number;
  /** Longest silence inside a response body; 0 = none. */
  bodyTimeoutMs: number;
  /** Idle pooled connections are closed after this long (guests often close at 5 s). */
  keepAliveTimeoutMs: number;
  /** How new guest connections are opened (guestConnector's options); undici client only. */
  guestConnect?: { pendingPerUpstream?: number; pendingHoldMs?: number };
}

const TIMEOUT_CODES = new Set(['UND_ERR_HEADERS_TIMEOUT', 'UND_ERR_BODY_TIMEOUT', 'UND_ERR_CONNECT_TIMEOUT', 'ETIMEDOUT']);

function classify(error: unknown, res: ServerResponse): UpstreamFailure {
  if (error instanceof UpstreamFailure) return error;
  const code = (error as { code?: unknown } | null)?.code;
  const kind = typeof code === 'string' && TIMEOUT_CODES.has(code) ? 'timeout' : 'error';
  const message = error instanceof Error ? error.message : String(error);
  return new UpstreamFailure(message, kind, res.headersSent, error);
}

const IDEMPOTENT_BODILESS = new Set(['GET', 'HEAD', 'OPTIONS']);
const RESET_CODES = new Set(['ECONNRESET', 'EPIPE', 'UND_ERR_SOCKET']);

function retriable(error: unknown, r: ForwardRequest): boolean {
  if (!(error instanceof UpstreamFailure) || error.kind !== 'error' || error.headersSent || r.res.headersSent || r.res.destroyed) return false;
  if (r.body !== null || !IDEMPOTENT_BODILESS.has(r.method)) return false;
  const code = (error.cause as { code?: unknown } | null | undefined)?.code;
  return typeof code === 'string' && RESET_CODES.has(code);
}

/**
 * A bodiless idempotent request whose connection the guest side reset or closed before any
 * response byte is sent again (at most twice), as nginx's `proxy_next_upstream error` does:
 * QEMU's forwarding closes connections it accepted for a guest port nobody listens on yet, and
 * apps that close idle keep-alive connections race with a reuse.
 */
async function withRetries<T>(r: ForwardRequest, once: () => Promise<T>): Promise<T> {
  for (let attempt = 0; ; attempt++) {
    try {
      return await once();
    } catch (error) {
      if (attempt >= 2 || !retriable(error, r)) throw error;
    }
  }
}

/** Whether the guest's answer said it closes the connection (`Connection: close`, or HTTP/1.0 without keep-alive). */
export type UpstreamClosed = boolean;

const CLOSE_TOKEN = /(?:^|,)\s*close\s*(?:,|$)/i;
const KEEP_ALIVE_TOKEN = /(?:^|,)\s*keep-alive\s*(?:,|$)/i;

function saysClose(connection: string | string[] | undefined, httpVersion = '1.1'): boolean {
  const value = Array.isArray(connection) ? connection.join(',') : (connection ?? '');
  if (CLOSE_TOKEN.test(value)) return true;
  return httpVersion === '1.0' && !KEEP_ALIVE_TOKEN.test(value);
}

function hostForUrl(host: string): string {
  return host.includes(':') ? `[${host}]` : host;
}

/** Streams an undici response into a ServerResponse, pausing the upstream on backpressure. */
class ForwardHandler implements Dispatcher.DispatchHandler {
  readonly #res: ServerResponse;
  readonly #resolve: (closed: UpstreamClosed) => void;
  readonly #reject: (e: UpstreamFailure) => void;
  #controller: Dispatcher.DispatchController | undefined;
  #settled = false;
  #closed: UpstreamClosed = false;
  readonly #gone = new AbortController();
  /** Aborts when the client goes away before the exchange is complete (guestConnector drops its queued connect). */
  readonly gone = this.#gone.signal;

  constructor(res: ServerResponse, resolve: (closed: UpstreamClosed) => void, reject: (e: UpstreamFailure) => void) {
    this.#res = res;
    this.#resolve = resolve;
    this.#reject = reject;
    res.on('drain', () => this.#controller?.resume());
    res.once('close', () => {
      if (!this.#settled && !res.writableFinished) {
        this.#fail(new UpstreamFailure('the client closed the connection', 'client_gone', res.headersSent));
        this.#controller?.abort(new Error('the client closed the connection'));
        this.#gone.abort();
      }
    });
  }

  onRequestStart(controller: Dispatcher.DispatchController): void {
    this.#controller = controller;
    if (this.#settled) controller.abort(new Error('the client closed the connection'));
  }

  onResponseStart(controller: Dispatcher.DispatchController, statusCode: number, headers: Record<string, string | string[] | undefined>): void {
    if (statusCode < 200) return; // 1xx: informational, not forwarded
    this.#closed = saysClose(headers['connection']);
    try {
      this.#res.writeHead(statusCode, clientResponseHeaders(headers));
    } catch (error) {
      controller.abort(error instanceof Error ? error : new Error(String(error)));
    }
  }

  onResponseData(controller: Dispatcher.DispatchController, chunk: Buffer): void {
    if (!this.#res.write(chunk)) controller.pause();
  }

  onResponseEnd(): void {
    this.#res.end();
    if (!this.#settled) {
      this.#settled = true;
      this.#resolve(this.#closed);
    }
  }

  onResponseError(_controller: Dispatcher.DispatchController, error: Error): void {
    this.#fail(classify(error, this.#res));
  }

  #fail(failure: UpstreamFailure): void {
    if (this.#settled) return;
    this.#settled = true;
    this.#reject(failure);
  }
}

export type GuestConnectorOptions = buildConnector.BuildOptions & {
  /** New connections per upstream that may wait in its accept queue at once (default 2). */
  pendingPerUpstream?: number;
  /** A new connection stops counting after this long even without an answer (default 500 ms). */
  pendingHoldMs?: number;
};

/** The request a new connection is opened for (GuestConnector.forRequest). */
export interface ConnectOwner {
  /** Aborts when the request's client went away. */
  readonly signal: AbortSignal;
  /** The pending bound of its upstream (default: the connector's `pendingPerUpstream`). */
  readonly pending?: number | undefined;
  /**
   * The socket event that says the first response bytes arrived (QEMU accepted the connection):
   * 'readable' for undici (it reads on 'readable'; a 'data' listener would switch the socket to
   * flowing under it), 'data' for node:http (it reads on 'data'; a 'readable' listener would stop
   * its flow). Default 'readable'.
   */
  readonly readEvent?: 'readable' | 'data';
  /**
   * Open the socket with a bare `net.connect` (plainConnect) instead of undici's connector: for
   * a connection of its own that carries one exchange (OneShotUpstreamClient), which needs no
   * TCP keep-alive probes and no Nagle switch (its request head is one write).
   */
  readonly plain?: boolean;
}

export type GuestConnector = buildConnector.connector & {
  /**
   * Runs `dispatch` (an undici dispatch) with `request` as the owner of any new connection the
   * dispatch asks for: the connect waits under the owner's pending bound, and one still queued
   * when its signal aborts (the request's client went away) is dropped, never opened. undici
   * asks for a connection synchronously inside `dispatch` (a bodiless request on a Pool with one
   * request per connection), so the owner is exact; a connect asked for later (outside any
   * `forRequest`) has no owner: it is opened under the default bound.
   */
  forRequest<T>(request: ConnectOwner, dispatch: () => T): T;
};

type ConnectAnswer = (...a: [null, net.Socket] | [Error, null] | [Error]) => void;

/**
 * A bare TCP connect for a connection that carries one exchange: what undici's connector does
 * less its TCP keep-alive and no-delay socket options (a system call each, per request, for a
 * connection that lives for one answer) and its option objects. Fails with undici's code for a
 * connect timeout, so that the caller answers 504 the same way.
 */
function plainConnect(host: string, port: number, timeoutMs: number, callback: ConnectAnswer): void {
  const socket = net.connect(port, host);
  let answered = false;
  const answer: ConnectAnswer = (...args) => {
    if (answered) return;
    answered = true;
    clearTimeout(timer);
    callback(...args);
  };
  const timer = setTimeout(() => {
    socket.destroy(Object.assign(new Error(`connect timeout (${host}:${port}, ${timeoutMs} ms)`), { code: 'UND_ERR_CONNECT_TIMEOUT' }));
  }, timeoutMs);
  // Kept for the socket's life, as undici's connector keeps its own: an error the client has no
  // listener for yet (between this answer and node:http's own listener) must not throw.
  socket.on('error', (error) => answer(error));
  socket.once('connect', () => answer(null, socket));
}

/** The error a dropped connect answers undici with (its request is gone already). */
function abandoned(): Error {
  return Object.assign(new Error('the request that asked for this connection was abandoned'), { code: 'UND_ERR_ABORTED' });
}

/**
 * A connector that keeps at most `pendingPerUpstream` (or its owner's `pending`) new connections
 * per upstream (host:port) "pending": opened but not yet known to be accepted by the listener.
 * Guests are reached through QEMU's user-mode networking, whose forwarded ports listen with a
 * backlog of 1 (libslirp's `listen(s, 1)`) unless QEMU runs with native/cocoon-listen.so (256):
 * with backlog 1 the host kernel queues at most 2 connections for QEMU to accept, and a third
 * concurrent connect overflows it: the kernel drops the SYN (or the handshake's last ACK), and
 * that client waits for retransmission: 1, 3, 7… s, up to ~60 s. A connection stops being
 * pending once its first response bytes arrive (QEMU accepted it), when it closes, or after
 * `pendingHoldMs` (a slow app that holds its answer must not block the others for long);
 * connections reused by keep-alive never count. Measured (docs/gateway.md): with an app that
 * closes every connection (busybox httpd) at 32 concurrent requests on a backlog-1 port,
 * opening connections one at a time collapsed to ~10 req/s with stalls of up to 65 s;
 * unbounded, throughput was fine but some requests stalled for minutes; 2 pending gave direct's
 * throughput with no stall over 0.3 s. A connect waiting for a slot whose request's client went
 * away is dropped (`forRequest`).
 */
export function guestConnector(options: GuestConnectorOptions): GuestConnector {
  const { pendingPerUpstream = 2, pendingHoldMs = 500, ...connectOptions } = options;
  const connect = buildConnector(connectOptions);
  const connectTimeoutMs = connectOptions.timeout ?? 10_000;
  const upstreams = new Map<string, { pending: number; waiting: Map<() => void, number> }>();
  let owner: ConnectOwner | undefined;
  const connector: buildConnector.connector = (opts, callback) => {
    const answer = callback as (...a: [null, import('node:net').Socket] | [Error, null] | [Error]) => void;
    const signal = owner?.signal;
    const bound = owner?.pending ?? pendingPerUpstream;
    const readEvent = owner?.readEvent ?? 'readable';
    const plain = owner?.plain === true;
    if (signal?.aborted) return answer(abandoned());
    const key = `${opts.hostname}:${opts.port}`;
    let upstream = upstreams.get(key);
    if (!upstream) upstreams.set(key, (upstream = { pending: 0, waiting: new Map() }));
    const u = upstream;
    const next = (): void => {
      const first = u.waiting.entries().next();
      if (!first.done) {
        const [waiter, waiterBound] = first.value;
        if (u.pending < waiterBound) waiter();
      } else if (u.pending === 0) upstreams.delete(key);
    };
    const open = (): void => {
      u.waiting.delete(open);
      signal?.removeEventListener('abort', drop);
      u.pending++;
      let released = false;
      const release = (): void => {
        if (released) return;
        released = true;
        u.pending--;
        next();
      };
      const opened: ConnectAnswer = (...args) => {
        // A failed connect answers (error) alone: no socket argument at all.
        const socket = args[0] === null ? args[1] : null;
        if (!socket) release();
        else {
          // Only a signal: the client reads the socket on its own listener of the same event.
          socket.once(readEvent, release);
          socket.once('close', release);
          setTimeout(release, pendingHoldMs).unref();
        }
        answer(...args);
      };
      if (plain) plainConnect(opts.hostname, Number(opts.port), connectTimeoutMs, opened);
      else connect(opts, opened);
    };
    // Its request went away while it waited: it leaves the queue at once and takes no slot.
    const drop = (): void => {
      if (!u.waiting.delete(open)) return;
      if (u.waiting.size === 0 && u.pending === 0) upstreams.delete(key);
      answer(abandoned());
    };
    if (u.pending < bound) open();
    else {
      u.waiting.set(open, bound);
      signal?.addEventListener('abort', drop, { once: true });
    }
  };
  return Object.assign(connector, {
    forRequest<T>(request: ConnectOwner, dispatch: () => T): T {
      const outer = owner;
      owner = request;
      try {
        return dispatch();
      } finally {
        owner = outer;
      }
    },
  });
}

/** undici Agent: one keep-alive Pool per upstream origin. */
export class UndiciUpstreamClient implements UpstreamClient {
  readonly #agent: Agent;
  readonly #connector: GuestConnector;
  readonly #o: UpstreamClientOptions;

  constructor(options: UpstreamClientOptions, connector?: GuestConnector) {
    this.#o = options;
    this.#connector = connector ?? guestConnector({ ...options.guestConnect, timeout: options.connectTimeoutMs });
    this.#agent = new Agent({
      connections: options.connectionsPerUpstream,
      pipelining: 1,
      keepAliveTimeout: options.keepAliveTimeoutMs,
      keepAliveMaxTimeout: options.keepAliveTimeoutMs,
      headersTimeout: options.headersTimeoutMs,
      bodyTimeout: options.bodyTimeoutMs,
      connect: this.#connector,
    });
  }

  /** Retried as `withRetries` says. */
  async forward(r: ForwardRequest): Promise<void> {
    await this.forwardObserved(r);
  }

  /** forward, answering whether the guest's last answer asked to close its connection. */
  forwardObserved(r: ForwardRequest): Promise<UpstreamClosed> {
    return withRetries(r, () => this.#forwardOnce(r));
  }

  #forwardOnce(r: ForwardRequest): Promise<UpstreamClosed> {
    return new Promise<UpstreamClosed>((resolve, reject) => {
      const handler = new ForwardHandler(r.res, resolve, reject);
      try {
        this.#connector.forRequest({ signal: handler.gone, pending: r.pendingConnects }, () => this.#agent.dispatch(
          {
            origin: `http://${hostForUrl(r.host)}:${r.port}`,
            path: r.path,
            method: r.method as Dispatcher.HttpMethod,
            headers: r.headers,
            body: r.body,
            headersTimeout: this.#o.headersTimeoutMs,
            bodyTimeout: this.#o.bodyTimeoutMs,
          },
          handler,
        ));
      } catch (error) {
        reject(classify(error, r.res));
      }
    });
  }

  async close(): Promise<void> {
    await this.#agent.destroy();
  }
}

/**
 * One exchange over node:http: `connection` is where its socket comes from (a keep-alive Agent,
 * or a connect of its own through a GuestConnector).
 */
function nodeExchange(
  r: ForwardRequest,
  o: UpstreamClientOptions,
  connection: { agent: http.Agent } | { createConnection: NonNullable<http.RequestOptions['createConnection']>; gone: AbortController },
): Promise<UpstreamClosed> {
  const { res } = r;
  return new Promise<UpstreamClosed>((resolve, reject) => {
    let settled = false;
    const fail = (failure: UpstreamFailure): void => {
      if (settled) return;
      settled = true;
      reject(failure);
    };
    let upReq: http.ClientRequest;
    try {
      upReq = http.request({
        host: r.host,
        port: r.port,
        method: r.method,
        path: r.path,
        // One exchange per connection: say so (hop-by-hop headers were stripped already).
        headers: 'agent' in connection ? r.headers : [...r.headers, 'connection', 'close'],
        setHost: false,
        ...('agent' in connection ? { agent: connection.agent } : { createConnection: connection.createConnection }),
      });
    } catch (error) {
      fail(classify(error, res));
      return;
    }
    const headTimer = setTimeout(() => {
      upReq.destroy(Object.assign(new Error('the guest did not answer in time'), { code: 'ETIMEDOUT' }));
    }, o.headersTimeoutMs);
    headTimer.unref();
    upReq.on('error', (error) => {
      clearTimeout(headTimer);
      fail(classify(error, res));
    });
    res.once('close', () => {
      if (!settled && !res.writableFinished) {
        fail(new UpstreamFailure('the client closed the connection', 'client_gone', res.headersSent));
        if ('gone' in connection) connection.gone.abort();
        upReq.destroy();
      }
    });
    upReq.on('response', (upRes) => {
      clearTimeout(headTimer);
      const closed = saysClose(upRes.headers.connection, upRes.httpVersion);
      try {
        res.writeHead(upRes.statusCode ?? 502, clientResponseHeaders(upRes.headers));
      } catch (error) {
        upRes.destroy();
        fail(classify(error, res));
        return;
      }
      if (o.bodyTimeoutMs > 0) {
        upRes.setTimeout(o.bodyTimeoutMs, () => {
          upRes.destroy(Object.assign(new Error('the guest stopped sending the response body'), { code: 'ETIMEDOUT' }));
        });
      }
      upRes.on('error', (error) => fail(classify(error, res)));
      upRes.on('end', () => {
        if (!upRes.complete) return;
        res.end();
        // A connection of its own is done with its one exchange, whatever the guest answered.
        if ('gone' in connection) upReq.destroy();
        if (!settled) {
          settled = true;
          resolve(closed);
        }
      });
      upRes.on('aborted', () => fail(new UpstreamFailure('the guest closed the connection mid-response', 'error', true)));
      if (gatewayTuning.directWrite) {
        // What `pipe` does for this one destination, without its bookkeeping per request: pause
        // the guest while the client is full. A client that goes away is handled by 'close' above.
        upRes.on('data', (chunk: Buffer) => {
          if (!res.write(chunk)) upRes.pause();
        });
        res.on('drain', () => upRes.resume());
      } else upRes.pipe(res, { end: false });
    });
    if (r.body === null) upReq.end();
    else {
      r.body.on('error', (error) => upReq.destroy(error));
      r.body.pipe(upReq);
    }
  });
}

/** node:http with a keep-alive Agent (LIFO socket reuse). */
export class NodeUpstreamClient implements UpstreamClient {
  readonly #agent: http.Agent;
  readonly #o: UpstreamClientOptions;

  constructor(options: UpstreamClientOptions) {
    this.#o = options;
    this.#agent = new http.Agent({
      keepAlive: true,
      keepAliveMsecs: 1000,
      maxSockets: options.connectionsPerUpstream,
      maxFreeSockets: options.connectionsPerUpstream,
      scheduling: 'lifo',
      timeout: options.keepAliveTimeoutMs,
    });
  }

  async forward(r: ForwardRequest): Promise<void> {
    await nodeExchange(r, this.#o, { agent: this.#agent });
  }

  async close(): Promise<void> {
    this.#agent.destroy();
  }
}

/**
 * One node:http exchange per connection, opened through a GuestConnector (so under the same
 * pending bound as undici's connects, and dropped when the client goes away first): the
 * request says `Connection: close`, and nothing is pooled. For upstreams that close every
 * connection anyway, this costs about half the CPU of undici's Agent per request, which for
 * such an upstream creates and destroys a Pool, a Client and two errors with stack traces every
 * time (measured: docs/gateway.md "Apps that close every connection").
 */
export class OneShotUpstreamClient implements UpstreamClient {
  readonly #connector: GuestConnector;
  readonly #o: UpstreamClientOptions;

  constructor(options: UpstreamClientOptions, connector?: GuestConnector) {
    this.#o = options;
    this.#connector = connector ?? guestConnector({ ...options.guestConnect, timeout: options.connectTimeoutMs });
  }

  async forward(r: ForwardRequest): Promise<void> {
    await this.forwardObserved(r);
  }

  forwardObserved(r: ForwardRequest): Promise<UpstreamClosed> {
    return withRetries(r, () => {
      const gone = new AbortController();
      const owner: ConnectOwner = { signal: gone.signal, pending: r.pendingConnects, readEvent: 'data', plain: gatewayTuning.plainConnect };
      const connector = this.#connector;
      const createConnection = ((_options: unknown, oncreate: (error: Error | null, socket?: Duplex) => void): undefined => {
        connector.forRequest(owner, () =>
          connector({ hostname: r.host, host: r.host, protocol: 'http:', port: String(r.port) } as buildConnector.Options, (error, socket) => {
            if (error) oncreate(error);
            else oncreate(null, socket!);
          }),
        );
        return undefined;
      }) as unknown as NonNullable<http.RequestOptions['createConnection']>;
      return nodeExchange(r, this.#o, { createConnection, gone });
    });
  }

  async close(): Promise<void> {
    // Nothing pooled: every connection belongs to its one exchange.
  }
}

/** Upstreams remembered as closing every connection, at most (the oldest are forgotten first). */
const CLOSING_UPSTREAMS = 4096;
/** On a closing upstream, every this many requests one goes through undici again: has it turned to keep-alive? */
const CLOSING_PROBE_EVERY = 64;

/**
 * undici's Agent for upstreams that keep connections alive (the default), OneShotUpstreamClient
 * for those that close them: an upstream (host:port) whose answer through undici said
 * `Connection: close` is sent its next requests on connections of their own, and one in
 * CLOSING_PROBE_EVERY goes through undici again, so that an app that turns to keep-alive (a new
 * app on the port) is pooled again. Both share one GuestConnector: one pending bound per upstream.
 * The choice changes only the client's cost, never what the guest or the client sees (both send
 * the same head and body, both retry the same way).
 */
export class AdaptiveUpstreamClient implements UpstreamClient {
  readonly #pooled: UndiciUpstreamClient;
  readonly #oneShot: OneShotUpstreamClient;
  /** host:port → requests sent one-shot since its last probe. */
  readonly #closing = new Map<string, number>();

  constructor(options: UpstreamClientOptions) {
    const connector = guestConnector({ ...options.guestConnect, timeout: options.connectTimeoutMs });
    this.#pooled = new UndiciUpstreamClient(options, connector);
    this.#oneShot = new OneShotUpstreamClient(options, connector);
  }

  async forward(r: ForwardRequest): Promise<void> {
    const key = `${r.host}:${r.port}`;
    const sent = this.#closing.get(key);
    const oneShot = sent !== undefined && sent + 1 < CLOSING_PROBE_EVERY;
    if (sent !== undefined) this.#closing.set(key, oneShot ? sent + 1 : 0);
    const closed = await (oneShot ? this.#oneShot : this.#pooled).forwardObserved(r);
    if (oneShot) return;
    if (!closed) this.#closing.delete(key);
    else if (sent === undefined) {
      this.#closing.set(key, 0);
      if (this.#closing.size > CLOSING_UPSTREAMS) this.#closing.delete(this.#closing.keys().next().value!);
    }
  }

  async close(): Promise<void> {
    await this.#pooled.close();
    await this.#oneShot.close();
  }
}
