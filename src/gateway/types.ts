/**
 * What the gateway needs from the rest of the platform. The gateway depends on these small
 * interfaces only, never on the VM driver or the SQL store: the platform wires real
 * implementations (lifecycle, store) in, tests wire doubles.
 */
import type { MicrovmState } from '../common/microvm-states.ts';
import { portInSpecs, type PortSpec } from '../common/ports.ts';
import type { PeerTarget } from './peer.ts';

/** The one state union (src/common/microvm-states.ts), re-exported for the gateway's users. */
export type { MicrovmState } from '../common/microvm-states.ts';

/** A value or a promise of it: in-memory implementations answer synchronously, SQL ones may not. */
export type MaybePromise<T> = T | Promise<T>;

export function isPromiseLike<T>(v: MaybePromise<T>): v is Promise<T> {
  return typeof (v as { then?: unknown } | null)?.then === 'function';
}

/** Ports a token opens: a list of guest ports and ranges, or every port of its microVM. */
export type AllowedPorts = readonly PortSpec[] | 'all';

/** Whether a token's ports include `port`. */
export function portIsAllowed(allowed: AllowedPorts, port: number): boolean {
  return allowed === 'all' || portInSpecs(allowed, port);
}

/** Why a presented token was refused. */
export type TokenFailureReason =
  | 'missing'
  | 'malformed'
  | 'unknown'
  | 'expired'
  | 'revoked'
  | 'other_microvm';

export type TokenVerification =
  | { ok: true; tokenId: string; allowedPorts: AllowedPorts; expiresAt: Date; /** Default 'http'. */ scope?: 'http' | 'shell' }
  | { ok: false; reason: TokenFailureReason };

export interface TokenVerifier {
  /**
   * Checks `presented` (the raw token string, possibly empty or garbage) for `microvmId`.
   * Must compare secrets in constant time and must report `expired`, `revoked` or
   * `other_microvm` only for a token whose secret matched (otherwise `unknown`), so that a
   * guessed token id reveals nothing.
   */
  verify(microvmId: string, presented: string | undefined): MaybePromise<TokenVerification>;
}

/**
 * Where the gateway sends a microVM's traffic. `upstreamPortFor` maps a guest port to the host
 * port that forwards to it (QEMU `hostfwd`), or null when that guest port is not exposed.
 * While the microVM is not RUNNING the mapping may be stale or null: the gateway uses it only
 * for RUNNING records and for the record `ensureRunning` answers.
 */
export interface MicroVMRoute {
  readonly id: string;
  readonly state: MicrovmState;
  /** The image's app port (guest side): the default when a request names no port. */
  readonly appPort: number;
  /** false: the image has no app port; a request that names no port answers 409 no_app_port. Default true. */
  readonly hasAppPort?: boolean;
  readonly autoResumeEnabled: boolean;
  /** Host the forwarded ports listen on, normally `127.0.0.1`. */
  readonly upstreamHost: string;
  /**
   * Connections each forwarded port queues for its VMM to accept (the listener's backlog):
   * the gateway lets that many new connections wait at once (upstream.ts pendingConnectsFor).
   * Absent: 1, libslirp's own.
   */
  readonly upstreamBacklog?: number;
  upstreamPortFor(guestPort: number): number | null;
  /**
   * Forwards a guest port that `upstreamPortFor` does not know yet (a request named it, and its
   * token allows it) on the RUNNING microVM, answering its host port; null when it cannot now.
   * Optional: without it such a port answers 404 port_not_exposed.
   */
  exposePort?(guestPort: number): Promise<number | null>;
  /**
   * Another host of the cluster runs the microVM: the gateway forwards the request to that
   * host's gateway (peer.ts) instead of a guest port. Absent on one host.
   */
  readonly peer?: PeerTarget;
}

/**
 * Activity reports for the idle timer. The gateway calls `requestStarted` once a request has
 * passed the token check, the lookup and the port check, right before it wakes the microVM or
 * proxies (with a synchronous `lookup` there is no turn of the event loop between the lookup's
 * answer and this call, so the idle timer cannot slip in between), and `requestFinished`
 * exactly once per `requestStarted`, when the response has been sent or the exchange failed or
 * was abandoned. A WebSocket counts as a request during its handshake, then `webSocketOpened` /
 * `webSocketClosed` bracket its life. Requests refused before that (bad token, 404, 409, 410)
 * are not activity. Implementations must ignore unknown ids and must not throw.
 */
export interface GatewayActivity {
  requestStarted(microvmId: string): void;
  requestFinished(microvmId: string): void;
  webSocketOpened(microvmId: string): void;
  webSocketClosed(microvmId: string): void;
}

export interface MicroVMDirectory extends GatewayActivity {
  /** The microVM's current routing record, or null when no such microVM exists. */
  lookup(microvmId: string): MaybePromise<MicroVMRoute | null>;
  /**
   * Brings the microVM to RUNNING (wakes a SUSPENDED one, waits out PENDING, RESUMING,
   * SUSPENDING→SUSPENDED→RESUMING) and answers its RUNNING record, i.e. the upstream address.
   * Rejects with a CocoonError (its `status` and `code` reach the client) when it cannot,
   * e.g. the microVM was terminated meanwhile.
   *
   * Coalescing: the GATEWAY coalesces its own concurrent wakes (at most one pending
   * `ensureRunning` per microVM per gateway process), so an implementation need not. It must
   * still be safe against a concurrent resume from the API (the lifecycle's job).
   * `signal` aborts only when the gateway shuts down; a wake whose clients gave up (timeout,
   * disconnect) is left to finish, since those clients were told to retry.
   */
  ensureRunning(microvmId: string, signal: AbortSignal): Promise<MicroVMRoute>;
}
