/**
 * API requests that must run where the microVM runs (suspend, terminate, exec, files, logs,
 * fork, checkpoint…: anything below `/microvms/{id}/` and a DELETE of it, in Cocoon's API, the
 * E2B API and the AWS API) go to the owner host's API when another live host owns the microVM
 * (owners.ts). The request goes on as the client sent it, body streamed, with X-Cocoon-Peer
 * signed by this host (peer-auth.ts); the owner checks the API key again and never forwards it
 * further. Reads of a microVM's row (`GET /microvms/{id}`, lists) and everything else are
 * answered by any host from the database.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import { Readable, type Duplex } from 'node:stream';
import type { ApiForwarding, LaunchSize } from '../api/app.ts';
import { isCocoonError } from '../common/errors.ts';
import type { Logger } from '../common/log.ts';
import { PEER_HEADER, peerRequestHeaders, peerTarget, type PeerTarget } from '../gateway/peer.ts';
import { forwardAndSettle, UndiciUpstreamClient, type UpstreamFailure } from '../gateway/upstream.ts';
import { proxyWebSocket, rawResponse } from '../gateway/websocket.ts';
import type { OwnerLookup } from './owners.ts';
import type { PeerAuth } from './peer-auth.ts';

/** `/api/v1/microvms/{id}`, `/e2b/sandboxes/{id}`, `/2025-09-09/microvms/{id or ARN}`, then what follows. */
const MICROVM_PATH = /^(?:\/api\/v1\/microvms|\/e2b\/sandboxes|\/2025-09-09\/microvms)\/([^/?]{1,600})(\/[^?]*)?(?:\?.*)?$/;
const MICROVM_ID = /(mvm-[0-9a-z]{26})$/;

/** The microVM a request acts on where it runs (not a read of its row), or undefined. */
export function microvmOfRequest(method: string, url: string): string | undefined {
  const m = MICROVM_PATH.exec(url);
  if (!m) return undefined;
  const rest = m[2] ?? '';
  if ((rest === '' || rest === '/') && method !== 'DELETE') return undefined;
  let segment: string;
  try {
    segment = decodeURIComponent(m[1]!);
  } catch {
    return undefined;
  }
  return MICROVM_ID.exec(segment)?.[1];
}

/** A request that wakes the microVM it names: Cocoon's and AWS's resume, E2B's resume and connect. */
export function isWakeRequest(method: string, url: string): boolean {
  const m = MICROVM_PATH.exec(url);
  return method === 'POST' && m !== null && (m[2] === '/resume' || (m[2] === '/connect' && url.startsWith('/e2b/')));
}

function errorJson(status: number, code: string, message: string): string {
  return JSON.stringify({ error: { code, message } });
}

function sendJson(res: ServerResponse, status: number, code: string, message: string, headers: Record<string, string> = {}): void {
  if (res.headersSent) {
    res.destroy();
    return;
  }
  const body = errorJson(status, code, message);
  res.writeHead(status, { ...headers, 'content-type': 'application/json; charset=utf-8', 'content-length': Buffer.byteLength(body), 'cache-control': 'no-store' });
  res.end(body);
}

export interface ApiForwarderOptions {
  owners: OwnerLookup;
  auth: PeerAuth;
  logger: Logger;
  /** Placement of a launch (placement.ts, this host preferred); throws `no_host_capacity`. */
  place?: (size: LaunchSize) => Promise<{ id: string; apiUrl: string | null }>;
  /**
   * Placement of a wake of a SUSPENDED microVM that no live host runs: the host chosen, or
   * undefined where it is not such a microVM; throws `no_host_capacity`.
   */
  placeWake?: (microvmId: string) => Promise<{ id: string; apiUrl: string | null } | undefined>;
}

export function createApiForwarder(options: ApiForwarderOptions): ApiForwarding & { close(): Promise<void> } {
  const { owners, auth, logger, place, placeWake } = options;
  const client = new UndiciUpstreamClient({
    connectionsPerUpstream: 256,
    connectTimeoutMs: 5_000,
    // A terminate or an exec may take long before its answer starts, and an exec's output may pause.
    headersTimeoutMs: 600_000,
    bodyTimeoutMs: 0,
    keepAliveTimeoutMs: 4_000,
  });

  /** Checks X-Cocoon-Peer: 'peer' (valid: serve here), 'none', or the refusal's message. */
  function checkPeer(req: IncomingMessage): 'peer' | 'none' | string {
    const header = req.headers[PEER_HEADER];
    if (header === undefined) return 'none';
    const v = auth.verify(req.method ?? 'GET', req.url ?? '', header);
    if (v.ok) return 'peer';
    logger.warn({ path: (req.url ?? '').split('?')[0]?.slice(0, 200), reason: v.reason }, 'refused an API request with a bad X-Cocoon-Peer');
    return `X-Cocoon-Peer is for hosts of this cluster only (${v.reason})`;
  }

  async function ownerTarget(req: IncomingMessage): Promise<PeerTarget | undefined> {
    const microvmId = microvmOfRequest(req.method ?? 'GET', req.url ?? '');
    if (!microvmId) return undefined;
    const owner = await owners.ownerOf(microvmId);
    if (owner?.kind !== 'peer') return undefined;
    return peerTarget(owner.host.hostId, owner.host.apiUrl);
  }

  /** Where a resume of a microVM no live host runs goes when placement picks another host. */
  async function placedTarget(req: IncomingMessage): Promise<PeerTarget | undefined> {
    if (!placeWake || !isWakeRequest(req.method ?? 'GET', req.url ?? '')) return undefined;
    const microvmId = microvmOfRequest(req.method ?? 'GET', req.url ?? '');
    const host = microvmId ? await placeWake(microvmId) : undefined;
    return host && host.id !== owners.selfId ? peerTarget(host.id, host.apiUrl) : undefined;
  }

  function signedHeaders(req: IncomingMessage, target: PeerTarget, upgrade: boolean): string[] {
    const headers = peerRequestHeaders(req.rawHeaders, upgrade);
    const clientIp = (req.socket.remoteAddress ?? '').replace(/^::ffff:/, '');
    headers.push('X-Cocoon-Peer', auth.sign(req.method ?? 'GET', req.url ?? '/', target.hostId, { clientIp, proto: 'http' }));
    return headers;
  }

  return {
    async request(req, res, take) {
      const peer = checkPeer(req);
      if (peer === 'peer') return false;
      if (peer !== 'none') {
        take();
        sendJson(res, 401, 'peer_auth_failed', peer);
        return true;
      }
      let target: PeerTarget | undefined;
      try {
        target = (await ownerTarget(req)) ?? (await placedTarget(req));
      } catch (error) {
        if (!isCocoonError(error, 'no_host_capacity')) throw error;
        take();
        sendJson(res, error.status, error.code, error.message, { 'retry-after': '5' });
        return true;
      }
      if (!target) return false;
      take();
      const hasBody = req.headers['transfer-encoding'] !== undefined || (req.headers['content-length'] !== undefined && req.headers['content-length'] !== '0');
      const failed = (failure: UpstreamFailure): void => {
        owners.forget(target.hostId);
        logger.warn({ peer: target.hostId, path: (req.url ?? '').split('?')[0], err: failure.message }, 'forwarding an API request to the owner host failed');
      };
      await forwardAndSettle(client, {
        host: target.host,
        port: target.port,
        method: req.method ?? 'GET',
        path: req.url ?? '/',
        headers: signedHeaders(req, target, false),
        body: hasBody ? req : null,
        res,
      }, {
        unanswered: (failure) => {
          failed(failure);
          sendJson(res, 502, 'peer_unreachable', `host ${target.hostId}, which runs this microVM, did not answer; retry shortly`, { connection: 'close' });
        },
        cut: failed,
      });
      return true;
    },
    async place(req, res, take, size, body) {
      // A launch another host forwarded here runs here (one hop, never a loop): its X-Cocoon-Peer
      // was verified by `request` before the route ran.
      if (!place || req.headers[PEER_HEADER] !== undefined) return false;
      const host = await place(size);
      if (host.id === owners.selfId || !host.apiUrl) return false;
      const target = peerTarget(host.id, host.apiUrl);
      if (!target) return false;
      take();
      // The body was parsed by the route: it goes on re-serialized, with its own length.
      const payload = Buffer.from(JSON.stringify(body ?? {}));
      const headers = signedHeaders(req, target, false);
      const keep: string[] = [];
      for (let i = 0; i < headers.length; i += 2) {
        if (/^(content-length|content-type|transfer-encoding)$/i.test(headers[i]!)) continue;
        keep.push(headers[i]!, headers[i + 1]!);
      }
      keep.push('content-type', 'application/json', 'content-length', String(payload.length));
      const failed = (failure: UpstreamFailure): void => {
        owners.forget(target.hostId);
        logger.warn({ peer: target.hostId, err: failure.message }, 'forwarding a launch to the host placement chose failed');
      };
      await forwardAndSettle(client, { host: target.host, port: target.port, method: 'POST', path: req.url ?? '/', headers: keep, body: Readable.from([payload]), res }, {
        unanswered: (failure) => {
          failed(failure);
          sendJson(res, 502, 'peer_unreachable', `host ${target.hostId}, chosen to run this microVM, did not answer; retry shortly`, { connection: 'close' });
        },
        cut: failed,
      });
      return true;
    },
    async upgrade(req: IncomingMessage, socket: Duplex, head: Buffer) {
      const peer = checkPeer(req);
      if (peer === 'peer') return false;
      if (peer !== 'none') {
        socket.end(rawResponse(401, { 'content-type': 'application/json; charset=utf-8' }, errorJson(401, 'peer_auth_failed', peer)));
        return true;
      }
      const target = await ownerTarget(req);
      if (!target) return false;
      proxyWebSocket({
        req,
        socket,
        head,
        host: target.host,
        port: target.port,
        path: req.url ?? '/',
        headers: signedHeaders(req, target, true),
        handshakeTimeoutMs: 60_000,
        onOpen: () => undefined,
        onClose: () => undefined,
        onHandshakeEnd: () => undefined,
      });
      return true;
    },
    close: () => client.close(),
  };
}
