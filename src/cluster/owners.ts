/**
 * Where a microVM runs, as forwarding needs it: its lease's owner (`microvms.host_id`,
 * src/store/leases.ts) and how to reach that host (`hosts.api_url` / `gateway_url`). An owner
 * counts as another live host only while its row is LIVE and its heartbeat is within the
 * dead-after bound; otherwise (ownerless, this host, a dead or silent owner, one that left no
 * address) the request is served here, where the lifecycle takes over (placement, lease).
 *
 * Host rows are cached for a second: a forwarded request costs one lease read, not two.
 */
import { getHost, type Host } from '../store/hosts.ts';
import { getMicrovmLease } from '../store/leases.ts';
import type { Db } from '../store/sql.ts';

export interface PeerHost {
  hostId: string;
  /** `http://address:port` of its API, or null when it registered none. */
  apiUrl: string | null;
  /** `http://address:port` of its gateway, or null when it registered none. */
  gatewayUrl: string | null;
}

export type Owner =
  | { kind: 'none' }
  | { kind: 'self' }
  /** Another LIVE host holds the lease: forward there. */
  | { kind: 'peer'; host: PeerHost }
  /** Another host holds the lease but is not reachable as live (silent, DEAD, or no row). */
  | { kind: 'lost'; hostId: string };

export interface OwnerLookupOptions {
  db: Db;
  selfId: string;
  /** A host silent longer than this is not forwarded to. */
  deadAfterMs: number;
  /** How long a host row is reused. Default 1 s. */
  cacheMs?: number;
  now?: () => number;
}

export class OwnerLookup {
  readonly selfId: string;
  readonly #db: Db;
  readonly #deadAfterMs: number;
  readonly #cacheMs: number;
  readonly #now: () => number;
  readonly #hosts = new Map<string, { host: Host | undefined; until: number }>();

  constructor(options: OwnerLookupOptions) {
    this.#db = options.db;
    this.selfId = options.selfId;
    this.#deadAfterMs = options.deadAfterMs;
    this.#cacheMs = options.cacheMs ?? 1_000;
    this.#now = options.now ?? Date.now;
  }

  async ownerOf(microvmId: string): Promise<Owner | undefined> {
    const lease = await getMicrovmLease(this.#db, microvmId);
    if (!lease) return undefined;
    if (lease.hostId === null) return { kind: 'none' };
    if (lease.hostId === this.selfId) return { kind: 'self' };
    const host = await this.host(lease.hostId);
    return host ? { kind: 'peer', host } : { kind: 'lost', hostId: lease.hostId };
  }

  /** The host `id` while it is LIVE and heartbeating, else undefined. */
  async host(id: string): Promise<PeerHost | undefined> {
    const now = this.#now();
    let cached = this.#hosts.get(id);
    if (!cached || cached.until < now) {
      cached = { host: await getHost(this.#db, id), until: now + this.#cacheMs };
      this.#hosts.set(id, cached);
      if (this.#hosts.size > 10_000) this.#hosts.clear();
    }
    const host = cached.host;
    if (!host || host.state !== 'LIVE' || now - Date.parse(host.heartbeatAt) > this.#deadAfterMs) return undefined;
    return { hostId: host.id, apiUrl: host.apiUrl, gatewayUrl: host.gatewayUrl };
  }

  /** Forget a host (a forward to it failed: its row may have changed). */
  forget(id: string): void {
    this.#hosts.delete(id);
  }
}
