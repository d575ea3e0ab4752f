/**
 * The data-plane gateway: the only public door to guest apps.
 *
 * Per request: pick the microVM (Host or X-Cocoon-MicroVM) → check the token (header, cookie,
 * or the one-time `?cocoon_token=` that becomes a cookie) → look the microVM up → check the
 * port → count the request (idle timer) → wake it if needed (coalesced) → proxy, streaming.
 * Nothing reaches a directory's `ensureRunning` or a guest before the token has been verified.
 * See docs/gateway.md for the status codes and the reasons behind the choices.
 */
import http, { type IncomingMessage, type OutgoingHttpHeaders, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Duplex } from 'node:stream';
import { isCocoonError, type CocoonError, type ErrorCode } from '../common/errors.ts';
import { log as rootLog, type Logger } from '../common/log.ts';
import { BodyMeter } from './body.ts';
import {
  MAX_COOKIE_CANDIDATES,
  MICROVM_HEADER,
  PORT_HEADER,
  TOKEN_COOKIE,
  TOKEN_HEADER,
  clearTokenCookie,
  extractQueryToken,
  readCookies,
  tokenCookie,
} from './credentials.ts';
import { AWS_SUBPROTOCOL, readAwsCredentials } from './aws-credentials.ts';
import { clientAddress, upstreamRequestHeaders } from './headers.ts';
import { PEER_HEADER, peerRequestHeaders, type PeerClaims, type PeerGatewayAuth, type PeerTarget } from './peer.ts';
import { isShellPath, subprotocolToken, type ShellHandler } from './shell.ts';
import type { GatewaySurface } from './surfaces.ts';
import { DEFAULT_GATEWAY_DOMAIN, normalizeDomain, parsePortHeader, resolveMicroVM } from './routing.ts';
import { isPromiseLike, portIsAllowed, type MicroVMDirectory, type MicroVMRoute, type TokenFailureReason, type TokenVerification, type TokenVerifier } from './types.ts';
import { AdaptiveUpstreamClient, forwardAndSettle, pendingConnectsFor, NodeUpstreamClient, UndiciUpstreamClient, type UpstreamClient, type UpstreamClientOptions } from './upstream.ts';
import { WakeCoalescer } from './wake.ts';
import { proxyWebSocket, rawResponse } from './websocket.ts';

export interface GatewayOptions {
  directory: MicroVMDirectory;
  tokens: TokenVerifier;
  /** Serves `/.cocoon/shell` WebSockets admitted with a shell-scope token (shell.ts); absent: 404. */
  shell?: ShellHandler;
  /** Other platforms' in-sandbox protocols served by Cocoon itself (surfaces.ts); read per request, so it may grow after start. */
  surfaces?: readonly GatewaySurface[];
  /** Host names are `<microvm id>.<domain>`. Default `vm.localhost`. */
  domain?: string;
  logger?: Logger;
  /**
   * Upstream HTTP client (upstream.ts): `adaptive` (default: undici's pooled keep-alive
   * connections, and a connection of its own per request for an upstream that closes every
   * connection, the cheaper way there), `undici` alone, or `node` (node:http's keep-alive Agent).
   */
  upstreamClient?: 'adaptive' | 'undici' | 'node';
  /**
   * In a cluster: signs requests forwarded to the host that runs a microVM (`route.peer`) and
   * checks X-Cocoon-Peer on requests other hosts forward here (peer.ts). Absent: one host; an
   * X-Cocoon-Peer header is then only stripped, never believed.
   */
  peers?: PeerGatewayAuth;
  /** Trust and extend incoming X-Forwarded-* (only behind a proxy you run). Default false. */
  trustForwardedHeaders?: boolean;
  /** Largest request head (bytes). Default 16 KiB. */
  maxHeaderBytes?: number;
  /** Largest request body (bytes). Default 1 GiB. */
  maxBodyBytes?: number;
  /** A client must send its complete request head within this. Default 10 s. */
  headersTimeoutMs?: number;
  /** A client sending a body may pause at most this long. Default 30 s. */
  bodyIdleTimeoutMs?: number;
  /** Idle client keep-alive connections close after this. Default 5 s. */
  keepAliveTimeoutMs?: number;
  /** A request waits at most this long for its microVM to wake, then 503. Default 30 s. */
  wakeTimeoutMs?: number;
  /** Retry-After (seconds) on 503s. Default 2. */
  retryAfterSeconds?: number;
  /** In-flight HTTP requests (and WebSocket handshakes) per microVM; beyond → 503. Default 512. */
  maxInFlightPerMicroVM?: number;
  /** Open WebSockets per microVM; beyond → 503. Default 1024. */
  maxWebSocketsPerMicroVM?: number;
  upstreamConnectTimeoutMs?: number;
  /** Time for the guest to send its response head. Default 300 s. */
  upstreamHeadersTimeoutMs?: number;
  /** Longest silence inside a guest's response body; 0 = none. Default 300 s. */
  upstreamBodyTimeoutMs?: number;
  /** Idle pooled guest connections close after this. Default 4 s (guests often use 5 s). */
  upstreamKeepAliveTimeoutMs?: number;
  /** How new guest connections are opened (upstream.ts guestConnector); benchmarks compare. */
  guestConnect?: UpstreamClientOptions['guestConnect'];
}

export interface GatewayStats {
  inFlight: number;
  webSockets: number;
  pendingWakes: number;
}

export interface Gateway {
  readonly server: http.Server;
  readonly domain: string;
  /** Starts listening (default 127.0.0.1, port 0 = any) and answers the bound address. */
  listen(port?: number, host?: string): Promise<AddressInfo>;
  /** Stops accepting, drops every connection and tunnel, aborts pending wakes, closes pools. */
  close(): Promise<void>;
  stats(): GatewayStats;
}

interface Rejection {
  readonly kind: 'reject';
  readonly status: number;
  readonly code: ErrorCode;
  readonly message: string;
  readonly headers?: OutgoingHttpHeaders;
}

interface Redirect {
  readonly kind: 'redirect';
  readonly status: 303 | 307;
  readonly location: string;
  readonly cookie: string;
}

interface Admitted {
  readonly kind: 'admit';
  readonly microvmId: string;
  readonly route: MicroVMRoute;
  readonly guestPort: number;
  /** The request target for the guest. */
  readonly target: string;
  readonly proto: string;
  /** A WebSocket handshake that offered AWS's base subprotocol (echoed when the app picks none). */
  readonly awsSubprotocol: boolean;
}

const AUTH_FAILURES: Record<TokenFailureReason, { status: number; code: ErrorCode; message: string }> = {
  missing: {
    status: 401,
    code: 'token_missing',
    message: 'this microVM needs a token: send it in X-Cocoon-Token, or open the URL once with ?cocoon_token=<token>',
  },
  malformed: { status: 401, code: 'token_malformed', message: 'the token is not a well-formed Cocoon token (cocoon_tk_...)' },
  unknown: { status: 401, code: 'token_invalid', message: 'the token is not valid; create one with POST /api/v1/microvms/{id}/tokens' },
  expired: { status: 401, code: 'token_expired', message: 'the token has expired; create a new one with POST /api/v1/microvms/{id}/tokens' },
  revoked: { status: 401, code: 'token_revoked', message: 'the token was revoked; create a new one with POST /api/v1/microvms/{id}/tokens' },
  other_microvm: { status: 403, code: 'token_wrong_microvm', message: 'the token belongs to another microVM' },
};

function reject(status: number, code: ErrorCode, message: string, headers?: OutgoingHttpHeaders): Rejection {
  return headers === undefined ? { kind: 'reject', status, code, message } : { kind: 'reject', status, code, message, headers };
}

/** The path of a request target without its query (for logs: the query may hold a token). */
function pathOnly(target: string | undefined): string {
  if (target === undefined) return '';
  const q = target.indexOf('?');
  return (q < 0 ? target : target.slice(0, q)).slice(0, 200);
}

/** Relative Location that cannot turn into a scheme-relative (other-host) URL. */
function safeLocation(target: string): string {
  return target.length > 1 && (target[1] === '/' || target[1] === '\\') ? `/.${target}` : target;
}

function requestHasBody(req: IncomingMessage): boolean {
  const cl = req.headers['content-length'];
  return req.headers['transfer-encoding'] !== undefined || (cl !== undefined && cl !== '0');
}

export function createGateway(options: GatewayOptions): Gateway {
  const directory = options.directory;
  const tokens = options.tokens;
  const domain = normalizeDomain(options.domain ?? DEFAULT_GATEWAY_DOMAIN);
  const logger = (options.logger ?? rootLog).child({ component: 'gateway' });
  const trustForwarded = options.trustForwardedHeaders ?? false;
  const maxBodyBytes = options.maxBodyBytes ?? 1024 ** 3;
  const headersTimeoutMs = options.headersTimeoutMs ?? 10_000;
  const bodyIdleTimeoutMs = options.bodyIdleTimeoutMs ?? 30_000;
  const wakeTimeoutMs = options.wakeTimeoutMs ?? 30_000;
  const retryAfter = String(options.retryAfterSeconds ?? 2);
  const maxInFlight = options.maxInFlightPerMicroVM ?? 512;
  const maxWebSockets = options.maxWebSocketsPerMicroVM ?? 1024;
  const upstreamHeadersTimeoutMs = options.upstreamHeadersTimeoutMs ?? 300_000;

  const upstreamOptions = {
    connectionsPerUpstream: maxInFlight,
    connectTimeoutMs: options.upstreamConnectTimeoutMs ?? 5_000,
    headersTimeoutMs: upstreamHeadersTimeoutMs,
    bodyTimeoutMs: options.upstreamBodyTimeoutMs ?? 300_000,
    keepAliveTimeoutMs: options.upstreamKeepAliveTimeoutMs ?? 4_000,
    ...(options.guestConnect ? { guestConnect: options.guestConnect } : {}),
  };
  const upstream: UpstreamClient =
    options.upstreamClient === 'node'
      ? new NodeUpstreamClient(upstreamOptions)
      : options.upstreamClient === 'undici'
        ? new UndiciUpstreamClient(upstreamOptions)
        : new AdaptiveUpstreamClient(upstreamOptions);
  const wakes = new WakeCoalescer(directory);

  const inFlight = new Map<string, number>();
  const webSockets = new Map<string, number>();
  const tunnels = new Set<{ abort(): void }>();
  const expectsContinue = new WeakSet<IncomingMessage>();
  /** Requests another host of the cluster forwarded here (a valid X-Cocoon-Peer): never forwarded again. */
  const fromPeer = new WeakMap<IncomingMessage, PeerClaims>();
  let closing = false;

  // ---- admission: everything before any backend is touched -------------------------------

  function protoOf(req: IncomingMessage): string {
    const peer = fromPeer.get(req);
    if (peer) return peer.proto;
    if (trustForwarded) {
      const xfp = req.headers['x-forwarded-proto'];
      const first = (Array.isArray(xfp) ? xfp[0] : xfp)?.split(',')[0]?.trim().toLowerCase();
      if (first === 'https' || first === 'http') return first;
    }
    return (req.socket as { encrypted?: boolean }).encrypted === true ? 'https' : 'http';
  }

  async function verifyCandidates(microvmId: string, candidates: readonly string[]): Promise<TokenVerification> {
    let first: TokenVerification | undefined;
    for (const c of candidates.slice(0, MAX_COOKIE_CANDIDATES)) {
      const r = tokens.verify(microvmId, c);
      const v = isPromiseLike(r) ? await r : r;
      if (v.ok) return v;
      first ??= v;
    }
    return first ?? { ok: false, reason: 'missing' };
  }

  async function admit(req: IncomingMessage, upgrade: boolean): Promise<Rejection | Redirect | Admitted> {
    const rawTarget = req.url ?? '';
    if (!rawTarget.startsWith('/')) {
      return reject(400, 'invalid_request_target', 'the request target must be a path (origin-form)');
    }
    let hostCount = 0;
    const raw = req.rawHeaders;
    for (let i = 0; i < raw.length; i += 2) if (raw[i]!.length === 4 && raw[i]!.toLowerCase() === 'host') hostCount++;
    const microvmHeader = req.headers[MICROVM_HEADER];
    const resolved = resolveMicroVM(req.headers.host, hostCount, Array.isArray(microvmHeader) ? microvmHeader.join(', ') : microvmHeader, domain);
    if (!resolved.ok) return reject(resolved.status, resolved.code, resolved.message);
    const microvmId = resolved.microvmId;
    const proto = protoOf(req);

    const cl = req.headers['content-length'];
    if (cl !== undefined && Number(cl) > maxBodyBytes) {
      return reject(413, 'request_body_too_large', `the request body exceeds the gateway's limit of ${maxBodyBytes} bytes`);
    }

    // Credentials: ?cocoon_token= (browser login), else X-Cocoon-Token, else AWS's X-aws-proxy-auth
    // (or its WebSocket subprotocol, aws-credentials.ts), else the cookie.
    let target = rawTarget;
    let verification: TokenVerification;
    let fromCookie = false;
    let awsAuth = false;
    const aws = readAwsCredentials(req, upgrade);
    const query = extractQueryToken(rawTarget);
    if (query.tokens.length > 1) {
      return reject(401, 'token_malformed', 'the URL carries more than one cocoon_token parameter');
    }
    if (query.tokens.length === 1) {
      const r = tokens.verify(microvmId, query.tokens[0]);
      verification = isPromiseLike(r) ? await r : r;
      if (verification.ok && !upgrade) {
        const maxAge = Math.min(3600, Math.floor((verification.expiresAt.getTime() - Date.now()) / 1000));
        const method = req.method ?? 'GET';
        return {
          kind: 'redirect',
          status: method === 'GET' || method === 'HEAD' ? 303 : 307,
          location: safeLocation(query.target),
          cookie: tokenCookie(query.tokens[0]!, maxAge, proto === 'https'),
        };
      }
      // A WebSocket cannot follow a redirect: the parameter is the credential, and is removed.
      target = query.target;
    } else {
      // The shell WebSocket also takes the token as a subprotocol (browsers cannot set headers).
      const cocoonHeader = req.headers[TOKEN_HEADER];
      awsAuth = cocoonHeader === undefined && aws.token !== undefined;
      const header = cocoonHeader ?? aws.token ?? (upgrade && options.shell && isShellPath(rawTarget) ? subprotocolToken(req) : undefined);
      if (header !== undefined) {
        const r = tokens.verify(microvmId, Array.isArray(header) ? header.join(', ') : header);
        verification = isPromiseLike(r) ? await r : r;
      } else {
        const cookies = readCookies(req.headers.cookie, TOKEN_COOKIE);
        fromCookie = cookies.length > 0;
        verification = fromCookie ? await verifyCandidates(microvmId, cookies) : { ok: false, reason: 'missing' };
      }
    }
    if (!verification.ok) {
      const f = AUTH_FAILURES[verification.reason];
      // AWS answers 403 to any refused X-aws-proxy-auth (expired included); Cocoon's own header keeps 401.
      if (awsAuth) return reject(403, f.code, f.message);
      const headers: OutgoingHttpHeaders = { 'www-authenticate': 'Cocoon-Token realm="cocoon"' };
      // A stale cookie is useless to the browser: drop it, so the next visit asks anew.
      if (fromCookie && f.status === 401) headers['set-cookie'] = clearTokenCookie(proto === 'https');
      return reject(f.status, f.code, f.message, headers);
    }
    // Scopes: a shell token opens only /.cocoon/shell, and only a shell token opens it.
    const wantsShell = upgrade && options.shell !== undefined && isShellPath(target);
    if (wantsShell !== ((verification.scope ?? 'http') === 'shell')) {
      return reject(403, 'token_scope', wantsShell
        ? 'this token cannot open a shell: issue one with POST /api/v1/microvms/{id}/tokens {"scope":"shell"}'
        : 'a shell token opens only the /.cocoon/shell WebSocket, not app requests');
    }

    const portHeader = req.headers[PORT_HEADER];
    const headerPort = parsePortHeader(Array.isArray(portHeader) ? portHeader.join(', ') : (portHeader ?? aws.port));
    if (headerPort === null) {
      return reject(400, 'invalid_port', `${portHeader === undefined ? 'X-aws-proxy-port (or the lambda-microvms.port.<n> subprotocol)' : 'X-Cocoon-Port'} must be one port number, 1-65535`);
    }
    // A port named by the host (`<port>-<id>.<domain>`, E2B's getHost) unless the header names one.
    const requestedPort = headerPort ?? resolved.hostPort;
    const allowed = verification.allowedPorts;
    if (requestedPort !== undefined && !portIsAllowed(allowed, requestedPort)) {
      return reject(403, 'port_not_allowed', `the token does not allow port ${requestedPort}`);
    }

    const found = directory.lookup(microvmId);
    const route = isPromiseLike(found) ? await found : found;
    if (route === null) return reject(404, 'microvm_not_found', `microVM ${microvmId} does not exist`);
    if (requestedPort === undefined && route.hasAppPort === false && !wantsShell) {
      return reject(409, 'no_app_port', `microVM ${microvmId} has no app port (its image was made with "port": null): use exec, or name a port with X-Cocoon-Port`);
    }
    const guestPort = requestedPort ?? route.appPort;
    if (!portIsAllowed(allowed, guestPort)) {
      return reject(403, 'port_not_allowed', `the token does not allow port ${guestPort}`);
    }
    switch (route.state) {
      case 'TERMINATING':
      case 'TERMINATED':
        return reject(410, 'microvm_terminated', `microVM ${microvmId} has been terminated`);
      case 'FAILED':
        return reject(502, 'microvm_failed', `microVM ${microvmId} has failed; see its state through the API`);
      case 'SUSPENDED':
      case 'SUSPENDING':
        if (!route.autoResumeEnabled) {
          return reject(409, 'microvm_suspended', `microVM ${microvmId} is suspended and autoResumeEnabled is false: resume it with POST /api/v1/microvms/${microvmId}/resume`);
        }
        break;
      default:
        break;
    }
    return { kind: 'admit', microvmId, route, guestPort, target, proto, awsSubprotocol: aws.offersBaseSubprotocol };
  }

  function dependencyFailure(error: unknown): Rejection {
    if (isCocoonError(error)) return reject(error.status, error.code, error.message);
    logger.error({ err: error }, 'gateway dependency failed');
    return reject(503, 'gateway_unavailable', 'the gateway could not check this request; retry shortly', { 'retry-after': retryAfter });
  }

  // ---- cluster: requests from and to other hosts (peer.ts) ---------------------------------

  function clientIpOf(req: IncomingMessage): string {
    return fromPeer.get(req)?.clientIp ?? clientAddress(req.socket.remoteAddress);
  }

  /** Checks X-Cocoon-Peer: null when the request may go on (absent, or valid and recorded), else the refusal. */
  function checkPeer(req: IncomingMessage): Rejection | null {
    const header = req.headers[PEER_HEADER];
    if (header === undefined || !options.peers) return null;
    const v = options.peers.verify(req.method ?? 'GET', req.url ?? '', header);
    if (!v.ok) {
      logger.warn({ path: pathOnly(req.url), reason: v.reason, from: clientAddress(req.socket.remoteAddress) }, 'refused a request with a bad X-Cocoon-Peer');
      return reject(401, 'peer_auth_failed', `X-Cocoon-Peer is for hosts of this cluster only (${v.reason})`);
    }
    fromPeer.set(req, { clientIp: v.clientIp, proto: v.proto });
    return null;
  }

  /** The request as the client sent it, for the owner's gateway, with this host's X-Cocoon-Peer. */
  function toPeer(req: IncomingMessage, peer: PeerTarget, proto: string, upgrade: boolean): string[] | Rejection {
    if (fromPeer.has(req) || !options.peers) {
      // One hop at most: the host that forwarded this believed the microVM was here.
      return reject(503, 'microvm_moved', `microVM is on another host now; retry`, { 'retry-after': retryAfter });
    }
    const headers = peerRequestHeaders(req.rawHeaders, upgrade);
    headers.push('X-Cocoon-Peer', options.peers.sign(req.method ?? 'GET', req.url ?? '/', peer.hostId, {
      clientIp: clientIpOf(req),
      proto: proto === 'https' ? 'https' : 'http',
    }));
    return headers;
  }

  async function forwardToPeer(req: IncomingMessage, res: ServerResponse, a: Pick<Admitted, 'microvmId' | 'proto'>, peer: PeerTarget): Promise<void> {
    const headers = toPeer(req, peer, a.proto, false);
    if (!Array.isArray(headers)) {
      sendError(req, res, headers);
      return;
    }
    if (expectsContinue.has(req)) res.writeContinue();
    const meter = requestHasBody(req) ? new BodyMeter(req, maxBodyBytes, bodyIdleTimeoutMs) : null;
    await forwardAndSettle(upstream, { host: peer.host, port: peer.port, method: req.method ?? 'GET', path: req.url ?? '/', headers, body: meter, res }, {
      meter,
      bodyRefused: (refusal) => sendBodyRefusal(req, res, refusal),
      unanswered: (failure) => {
        logger.warn({ microvmId: a.microvmId, peer: peer.hostId, err: failure.message }, 'forwarding to the owner host failed');
        sendError(req, res, failure.kind === 'timeout'
          ? reject(504, 'upstream_timeout', `microVM ${a.microvmId} did not answer in time (through host ${peer.hostId})`)
          : reject(502, 'peer_unreachable', `host ${peer.hostId}, which runs microVM ${a.microvmId}, did not answer; retry shortly`));
      },
    });
  }

  /**
   * A request a surface claims (E2B's envd) for a microVM another host runs: that host's
   * gateway serves it (its surface); a request forwarded here is served here.
   */
  async function surfaceOrPeer(surface: GatewaySurface, microvmId: string, req: IncomingMessage, res: ServerResponse): Promise<void> {
    const refused = checkPeer(req);
    if (refused) {
      sendError(req, res, refused);
      return;
    }
    if (!fromPeer.has(req)) {
      const found = directory.lookup(microvmId);
      const route = isPromiseLike(found) ? await found : found;
      if (route?.peer) {
        await forwardToPeer(req, res, { microvmId, proto: protoOf(req) }, route.peer);
        return;
      }
    }
    surface.handle(req, res);
  }

  function upgradeToPeer(req: IncomingMessage, socket: Duplex, head: Buffer, a: Admitted, peer: PeerTarget): void {
    const headers = toPeer(req, peer, a.proto, true);
    if (!Array.isArray(headers)) {
      refuseUpgrade(req, socket, headers);
      return;
    }
    const tunnel = proxyWebSocket({
      req,
      socket,
      head,
      host: peer.host,
      port: peer.port,
      path: req.url ?? '/',
      headers,
      handshakeTimeoutMs: Math.min(upstreamHeadersTimeoutMs, 60_000),
      onOpen: () => undefined,
      onClose: () => tunnels.delete(tunnel),
      onHandshakeEnd: (status) => {
        tunnels.delete(tunnel);
        if (status >= 500) logger.warn({ microvmId: a.microvmId, peer: peer.hostId, status }, 'WebSocket handshake through the owner host failed');
      },
    });
    tunnels.add(tunnel);
  }

  // ---- accounting ------------------------------------------------------------------------

  /** Takes an in-flight slot and reports the request; answers the release (idempotent). */
  function acquire(microvmId: string): (() => void) | null {
    const n = inFlight.get(microvmId) ?? 0;
    if (n >= maxInFlight) return null;
    inFlight.set(microvmId, n + 1);
    directory.requestStarted(microvmId);
    let released = false;
    return () => {
      if (released) return;
      released = true;
      const left = (inFlight.get(microvmId) ?? 1) - 1;
      if (left <= 0) inFlight.delete(microvmId);
      else inFlight.set(microvmId, left);
      directory.requestFinished(microvmId);
    };
  }

  type Resolved = { ok: true; host: string; port: number; backlog?: number | undefined } | { ok: true; peer: PeerTarget } | { ok: false; rejection: Rejection | null };

  /** RUNNING route, or wake it; then the upstream address for the guest port. */
  async function resolveUpstream(a: Admitted, gone: AbortSignal): Promise<Resolved> {
    let route = a.route;
    if (route.state !== 'RUNNING') {
      const outcome = await wakes.waitRunning(a.microvmId, wakeTimeoutMs, gone);
      switch (outcome.kind) {
        case 'client_gone':
          return { ok: false, rejection: null };
        case 'timeout':
          return {
            ok: false,
            rejection: reject(503, 'wake_timeout', `microVM ${a.microvmId} is still waking up; retry shortly`, { 'retry-after': retryAfter }),
          };
        case 'failed':
          if (isCocoonError(outcome.error)) {
            // A 503 (a resume that failed and left the microVM SUSPENDED) is worth retrying.
            const headers = outcome.error.status === 503 ? { 'retry-after': retryAfter } : undefined;
            return { ok: false, rejection: reject(outcome.error.status, outcome.error.code, outcome.error.message, headers) };
          }
          logger.warn({ microvmId: a.microvmId, err: outcome.error }, 'waking a microVM failed');
          return { ok: false, rejection: reject(502, 'wake_failed', `microVM ${a.microvmId} could not be woken`) };
        case 'running':
          route = outcome.route;
      }
      // Woken on (or found running by) another host of the cluster: forward there.
      if (route.peer) return { ok: true, peer: route.peer };
    }
    let port = route.upstreamPortFor(a.guestPort);
    // A port the token allows but nothing forwards yet (X-aws-proxy-port / X-Cocoon-Port): forward it now.
    if (port === null && a.guestPort !== route.appPort && route.exposePort) {
      try {
        port = await route.exposePort(a.guestPort);
      } catch (error) {
        return { ok: false, rejection: dependencyFailure(error) };
      }
    }
    if (port === null) {
      return a.guestPort === route.appPort
        ? { ok: false, rejection: reject(502, 'upstream_unavailable', `microVM ${a.microvmId} exposes no route to its app port`) }
        : { ok: false, rejection: reject(404, 'port_not_exposed', `microVM ${a.microvmId} does not expose port ${a.guestPort}`) };
    }
    return { ok: true, host: route.upstreamHost, port, backlog: route.upstreamBacklog };
  }

  // ---- HTTP ------------------------------------------------------------------------------

  function sendError(req: IncomingMessage, res: ServerResponse, r: Rejection, close = false): void {
    if (r.status >= 500) logger.warn({ microvmId: req.headers[MICROVM_HEADER], method: req.method, path: pathOnly(req.url), status: r.status, code: r.code }, r.message);
    else if (logger.isLevelEnabled('debug')) logger.debug({ method: req.method, path: pathOnly(req.url), status: r.status, code: r.code }, r.message);
    if (res.headersSent) {
      res.destroy();
      return;
    }
    const body = JSON.stringify({ error: { code: r.code, message: r.message } });
    const headers: OutgoingHttpHeaders = {
      ...r.headers,
      'content-type': 'application/json; charset=utf-8',
      'content-length': Buffer.byteLength(body),
      'cache-control': 'no-store',
    };
    // An unread request body is not worth draining: close instead.
    if (close || (requestHasBody(req) && !req.complete)) headers['connection'] = 'close';
    res.writeHead(r.status, headers);
    res.end(req.method === 'HEAD' ? undefined : body);
  }

  /** The body meter stopped the client's request body (too large, too slow): say so, and close. */
  function sendBodyRefusal(req: IncomingMessage, res: ServerResponse, refusal: CocoonError): void {
    sendError(req, res, reject(refusal.status, refusal.code, refusal.message), true);
  }

  async function onRequest(req: IncomingMessage, res: ServerResponse): Promise<void> {
    let admission: Rejection | Redirect | Admitted;
    try {
      admission = closing ? reject(503, 'gateway_closing', 'the gateway is shutting down', { 'retry-after': retryAfter }) : (checkPeer(req) ?? (await admit(req, false)));
    } catch (error) {
      admission = dependencyFailure(error);
    }
    if (admission.kind === 'reject') {
      sendError(req, res, admission, admission.status === 413);
      return;
    }
    if (admission.kind === 'redirect') {
      const headers: OutgoingHttpHeaders = {
        location: admission.location,
        'set-cookie': admission.cookie,
        'cache-control': 'no-store',
        'referrer-policy': 'no-referrer',
        'content-length': 0,
      };
      if (requestHasBody(req) && !req.complete) headers['connection'] = 'close';
      res.writeHead(admission.status, headers);
      res.end();
      return;
    }

    const a = admission;
    if (a.route.peer) {
      // Another host runs it: its gateway counts the request, wakes and proxies.
      await forwardToPeer(req, res, a, a.route.peer);
      return;
    }
    const release = acquire(a.microvmId);
    if (release === null) {
      sendError(req, res, reject(503, 'microvm_busy', `microVM ${a.microvmId} has too many requests in flight; retry shortly`, { 'retry-after': retryAfter }));
      return;
    }
    res.once('close', release);

    let resolved: Resolved;
    if (a.route.state === 'RUNNING') {
      const port = a.route.upstreamPortFor(a.guestPort);
      resolved = port === null ? await resolveUpstream(a, neverAborted) : { ok: true, host: a.route.upstreamHost, port, backlog: a.route.upstreamBacklog };
    } else {
      const gone = new AbortController();
      res.once('close', () => gone.abort());
      try {
        resolved = await resolveUpstream(a, gone.signal);
      } catch (error) {
        resolved = { ok: false, rejection: dependencyFailure(error) };
      }
    }
    if (!resolved.ok) {
      if (resolved.rejection !== null) sendError(req, res, resolved.rejection);
      return;
    }
    if ('peer' in resolved) {
      release();
      await forwardToPeer(req, res, a, resolved.peer);
      return;
    }

    const headers = upstreamRequestHeaders(req.rawHeaders, {
      clientIp: clientIpOf(req),
      proto: a.proto,
      upgrade: false,
      trustForwarded,
    });
    // `Expect: 100-continue`: the client sends its body only now that the request is admitted.
    if (expectsContinue.has(req)) res.writeContinue();
    const meter = requestHasBody(req) ? new BodyMeter(req, maxBodyBytes, bodyIdleTimeoutMs) : null;
    // A route that names its ports' backlog sets how many new connections may wait for the accept.
    const pending = resolved.backlog === undefined ? {} : { pendingConnects: pendingConnectsFor(resolved.backlog) };
    await forwardAndSettle(upstream, { host: resolved.host, port: resolved.port, method: req.method ?? 'GET', path: a.target, headers, body: meter, res, ...pending }, {
      meter,
      bodyRefused: (refusal) => sendBodyRefusal(req, res, refusal),
      unanswered: (failure) => sendError(
        req,
        res,
        failure.kind === 'timeout'
          ? reject(504, 'upstream_timeout', `microVM ${a.microvmId} did not answer in time`)
          : reject(502, 'upstream_unreachable', `the gateway could not reach the app of microVM ${a.microvmId} on port ${a.guestPort}`),
      ),
      cut: (failure) => logger.warn({ microvmId: a.microvmId, path: pathOnly(req.url), err: failure.message }, 'upstream failed mid-response'),
    });
  }

  // ---- WebSocket upgrades ----------------------------------------------------------------

  function refuseUpgrade(req: IncomingMessage, socket: Duplex, r: Rejection): void {
    if (r.status >= 500) logger.warn({ method: req.method, path: pathOnly(req.url), status: r.status, code: r.code }, r.message);
    const headers: Record<string, string> = { 'content-type': 'application/json; charset=utf-8', 'cache-control': 'no-store' };
    for (const [k, v] of Object.entries(r.headers ?? {})) if (v !== undefined) headers[k] = String(v);
    if (socket.writable) socket.end(rawResponse(r.status, headers, JSON.stringify({ error: { code: r.code, message: r.message } })));
    else socket.destroy();
  }

  async function onUpgrade(req: IncomingMessage, socket: Duplex, head: Buffer): Promise<void> {
    socket.on('error', () => socket.destroy());
    let admission: Rejection | Redirect | Admitted;
    try {
      admission = closing ? reject(503, 'gateway_closing', 'the gateway is shutting down') : (checkPeer(req) ?? (await admit(req, true)));
    } catch (error) {
      admission = dependencyFailure(error);
    }
    if (admission.kind !== 'admit') {
      refuseUpgrade(req, socket, admission.kind === 'reject' ? admission : reject(400, 'invalid_request', 'unexpected redirect'));
      return;
    }
    const a = admission;
    if (a.route.peer) {
      // Another host runs it (its shell too): its gateway serves the WebSocket.
      upgradeToPeer(req, socket, head, a, a.route.peer);
      return;
    }
    if (options.shell && isShellPath(a.target)) {
      // Served by the platform's exec service (it wakes the microVM and counts the session).
      options.shell(a.microvmId, req, socket, head);
      return;
    }
    if ((webSockets.get(a.microvmId) ?? 0) >= maxWebSockets) {
      refuseUpgrade(req, socket, reject(503, 'microvm_busy', `microVM ${a.microvmId} has too many open WebSockets`, { 'retry-after': retryAfter }));
      return;
    }
    const release = acquire(a.microvmId);
    if (release === null) {
      refuseUpgrade(req, socket, reject(503, 'microvm_busy', `microVM ${a.microvmId} has too many requests in flight; retry shortly`, { 'retry-after': retryAfter }));
      return;
    }
    const gone = new AbortController();
    const onGone = (): void => gone.abort();
    socket.once('close', onGone);
    let resolved: Resolved;
    try {
      resolved = await resolveUpstream(a, gone.signal);
    } catch (error) {
      resolved = { ok: false, rejection: dependencyFailure(error) };
    }
    socket.removeListener('close', onGone);
    if (!resolved.ok || socket.destroyed) {
      release();
      if (!resolved.ok && resolved.rejection !== null) refuseUpgrade(req, socket, resolved.rejection);
      else socket.destroy();
      return;
    }
    if ('peer' in resolved) {
      release();
      upgradeToPeer(req, socket, head, a, resolved.peer);
      return;
    }
    const headers = upstreamRequestHeaders(req.rawHeaders, {
      clientIp: clientIpOf(req),
      proto: a.proto,
      upgrade: true,
      trustForwarded,
    });
    const tunnel = proxyWebSocket({
      req,
      socket,
      head,
      host: resolved.host,
      port: resolved.port,
      path: a.target,
      headers,
      ...(a.awsSubprotocol ? { defaultSubprotocol: AWS_SUBPROTOCOL } : {}),
      handshakeTimeoutMs: Math.min(upstreamHeadersTimeoutMs, 60_000),
      onOpen: () => {
        release();
        webSockets.set(a.microvmId, (webSockets.get(a.microvmId) ?? 0) + 1);
        directory.webSocketOpened(a.microvmId);
      },
      onClose: () => {
        tunnels.delete(tunnel);
        const left = (webSockets.get(a.microvmId) ?? 1) - 1;
        if (left <= 0) webSockets.delete(a.microvmId);
        else webSockets.set(a.microvmId, left);
        directory.webSocketClosed(a.microvmId);
      },
      onHandshakeEnd: (status) => {
        tunnels.delete(tunnel);
        release();
        if (status >= 500) logger.warn({ microvmId: a.microvmId, status }, 'WebSocket handshake to the guest failed');
      },
    });
    tunnels.add(tunnel);
  }

  // ---- server ----------------------------------------------------------------------------

  const server = http.createServer({
    maxHeaderSize: options.maxHeaderBytes ?? 16 * 1024,
    headersTimeout: headersTimeoutMs,
    requestTimeout: 0, // bodies may be large; slow bodies are cut by BodyMeter's idle timer
    keepAliveTimeout: options.keepAliveTimeoutMs ?? 5_000,
    connectionsCheckingInterval: Math.max(50, Math.min(1_000, Math.floor(headersTimeoutMs / 4))),
    requireHostHeader: false, // routing answers a missing Host itself, as JSON
    noDelay: true,
    shouldUpgradeCallback: (req) => /(^|,)\s*websocket\s*(,|$)/i.test(req.headers.upgrade ?? ''),
  });
  const handle = (req: IncomingMessage, res: ServerResponse): void => {
    res.on('error', () => {});
    const surface = closing ? undefined : options.surfaces?.find((s) => s.claims(req));
    if (surface) {
      const microvmId = options.peers ? surface.microvmOf?.(req) : undefined;
      if (microvmId === undefined) surface.handle(req, res);
      else {
        surfaceOrPeer(surface, microvmId, req, res).catch((error: unknown) => {
          logger.warn({ err: error, path: pathOnly(req.url) }, 'forwarding a surface request failed');
          sendError(req, res, dependencyFailure(error));
        });
      }
      return;
    }
    onRequest(req, res).catch((error: unknown) => {
      logger.error({ err: error, path: pathOnly(req.url) }, 'gateway request handler failed');
      sendError(req, res, reject(500, 'internal', 'the gateway failed to handle the request'));
    });
  };
  server.on('request', handle);
  // Without this listener Node would answer 100 Continue before the token is checked.
  server.on('checkContinue', (req: IncomingMessage, res: ServerResponse) => {
    expectsContinue.add(req);
    handle(req, res);
  });
  server.on('upgrade', (req: IncomingMessage, socket: Duplex, head: Buffer) => {
    onUpgrade(req, socket, head).catch((error: unknown) => {
      logger.error({ err: error, path: pathOnly(req.url) }, 'gateway upgrade handler failed');
      socket.destroy();
    });
  });
  server.on('clientError', (error: NodeJS.ErrnoException, socket: Duplex) => {
    const [status, code, message] =
      error.code === 'HPE_HEADER_OVERFLOW'
        ? [431, 'headers_too_large', 'the request head is larger than the gateway accepts']
        : error.code === 'ERR_HTTP_REQUEST_TIMEOUT'
          ? [408, 'request_timeout', 'the client did not send its request in time']
          : [400, 'bad_request', 'the request is not valid HTTP/1.1'];
    if (socket.writable && !(error.code === 'ECONNRESET')) {
      socket.end(rawResponse(status, { 'content-type': 'application/json; charset=utf-8' }, JSON.stringify({ error: { code, message } })));
    }
    socket.destroy();
  });

  return {
    server,
    domain,
    listen(port = 0, host = '127.0.0.1'): Promise<AddressInfo> {
      return new Promise((resolve, rejectListen) => {
        server.once('error', rejectListen);
        server.listen(port, host, () => {
          server.removeListener('error', rejectListen);
          resolve(server.address() as AddressInfo);
        });
      });
    },
    async close(): Promise<void> {
      closing = true;
      wakes.close();
      for (const t of [...tunnels]) t.abort();
      const closed = new Promise<void>((resolve) => {
        if (!server.listening) resolve();
        else server.close(() => resolve());
      });
      server.closeAllConnections();
      await closed;
      await upstream.close();
    },
    stats(): GatewayStats {
      let n = 0;
      for (const v of inFlight.values()) n += v;
      let w = 0;
      for (const v of webSockets.values()) w += v;
      return { inFlight: n, webSockets: w, pendingWakes: wakes.pendingCount };
    },
  };
}

const neverAborted = new AbortController().signal;
