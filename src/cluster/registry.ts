/**
 * This host in the cluster's `hosts` table: it registers at start (its addresses and capacity),
 * heartbeats every interval, and sweeps: a host silent longer than the dead-after bound is
 * declared dead (src/store/hosts.ts `declareHostDead`: once, by whichever host gets there
 * first; its SUSPENDED microVMs become ownerless, its running ones FAILED `host_lost`).
 *
 * Two rules keep a database outage from turning into a massacre, and a partitioned host from
 * running on alongside its successor:
 * - a host sweeps only after it has itself been heartbeating without a gap for a whole
 *   dead-after period, so after PostgreSQL comes back every host gets that long to heartbeat
 *   again before anyone is judged;
 * - a host whose heartbeats have not reached the database for dead-after minus one interval
 *   fences itself (`onLeaseExpiring`: the engine stops its VMs) before any other host may
 *   declare it dead; a host that learns it was declared dead (its heartbeat is refused) does
 *   the same (`onDeclaredDead`), then registers again, owning nothing.
 * The fencing epochs of src/store/leases.ts back both up: whatever such a host still writes
 * with its old leases changes nothing.
 */
import type { Logger } from '../common/log.ts';
import { declareHostDead, heartbeatHost, listSilentHosts, registerHost, type HostLoss } from '../store/hosts.ts';
import type { Db } from '../store/sql.ts';
import type { ClusterSettings } from './config.ts';

export interface RegistryHooks {
  /** The heartbeat was refused: another host declared this one dead and took its leases. Stop every VM. */
  onDeclaredDead?(): Promise<void>;
  /** No heartbeat reached the database for dead-after minus one interval: stop every VM before others may take over. */
  onLeaseExpiring?(): Promise<void>;
  /** Heartbeats are accepted again after `onLeaseExpiring` or `onDeclaredDead`: settle what was stopped. */
  onReconnected?(): Promise<void>;
  /** This host's sweep declared another host dead. */
  onHostLost?(hostId: string, loss: HostLoss): void;
}

export interface HostRegistryOptions {
  db: Db;
  hostId: string;
  settings: Pick<ClusterSettings, 'heartbeatIntervalMs' | 'deadAfterMs' | 'capacity'>;
  apiUrl: string | null;
  gatewayUrl: string | null;
  logger: Logger;
  hooks?: RegistryHooks;
  /** Monotonic milliseconds (tests step it). */
  monotonic?: () => number;
  /** Wall-clock time written to the database (tests step it). */
  now?: () => Date;
}

export class HostRegistry {
  readonly hostId: string;
  readonly #o: HostRegistryOptions;
  readonly #monotonic: () => number;
  readonly #now: () => Date;
  #timer: NodeJS.Timeout | undefined;
  #tick: Promise<void> | undefined;
  /** When the last heartbeat that the database accepted was sent. */
  #lastAcceptedAt = 0;
  /** Since when every heartbeat was accepted (undefined: the last one failed). */
  #connectedSince: number | undefined;
  #fenced = false;
  #stopped = false;

  constructor(options: HostRegistryOptions) {
    this.#o = options;
    this.hostId = options.hostId;
    this.#monotonic = options.monotonic ?? (() => performance.now());
    this.#now = options.now ?? (() => new Date());
  }

  /** Whether this host fenced itself (no heartbeat for too long) and has not been accepted since. */
  get fenced(): boolean {
    return this.#fenced;
  }

  /** Registers (throws when the database refuses: the server does not start), then heartbeats and sweeps every interval. */
  async start(): Promise<void> {
    await this.register();
    this.#timer = setInterval(() => {
      // A round that fails (the database went away between the heartbeat and the sweep, or
      // while registering again) must neither end the process (an unhandled rejection) nor the
      // timer: log it, and the next interval tries again.
      if (this.#tick === undefined) {
        this.#tick = this.tick()
          .catch((error: unknown) => this.#o.logger.warn({ host: this.hostId, err: (error as Error).message }, 'heartbeat round failed; trying again next interval'))
          .finally(() => { this.#tick = undefined; });
      }
    }, this.#o.settings.heartbeatIntervalMs);
    this.#timer.unref();
  }

  async stop(): Promise<void> {
    this.#stopped = true;
    if (this.#timer) clearInterval(this.#timer);
    await this.#tick;
  }

  /** One round: heartbeat, then sweep. */
  async tick(): Promise<void> {
    await this.beat();
    if (!this.#stopped) await this.sweep();
  }

  /** Writes this host's row (LIVE, its addresses and capacity); `start` does it first. */
  async register(): Promise<void> {
    const sentAt = this.#monotonic();
    await registerHost(this.#o.db, {
      id: this.hostId, apiUrl: this.#o.apiUrl, gatewayUrl: this.#o.gatewayUrl, capacity: this.#o.settings.capacity, now: this.#now(),
    });
    this.#accepted(sentAt);
  }

  #accepted(sentAt: number): void {
    this.#lastAcceptedAt = sentAt;
    this.#connectedSince ??= sentAt;
    if (this.#fenced) this.#o.logger.info({ host: this.hostId }, 'heartbeats reach the database again');
    this.#fenced = false;
  }

  /** One heartbeat, and what follows from its answer (see the file's comment). */
  async beat(): Promise<void> {
    const sentAt = this.#monotonic();
    let alive: boolean;
    try {
      alive = await heartbeatHost(this.#o.db, this.hostId, this.#now());
    } catch (error) {
      this.#connectedSince = undefined;
      const silentMs = this.#monotonic() - this.#lastAcceptedAt;
      const limit = this.#o.settings.deadAfterMs - this.#o.settings.heartbeatIntervalMs;
      this.#o.logger.warn({ host: this.hostId, err: (error as Error).message, silentMs }, 'heartbeat failed');
      if (!this.#fenced && silentMs >= limit) {
        this.#fenced = true;
        this.#o.logger.error(
          { host: this.hostId, silentMs },
          'no heartbeat reached the database for too long: stopping this host\'s VMs before another host takes them over',
        );
        await this.#o.hooks?.onLeaseExpiring?.();
      }
      return;
    }
    if (alive) {
      const wasFenced = this.#fenced;
      this.#accepted(sentAt);
      if (wasFenced) await this.#o.hooks?.onReconnected?.();
      return;
    }
    this.#o.logger.error({ host: this.hostId }, 'this host was declared dead by another host: stopping its VMs, then registering again');
    this.#connectedSince = undefined;
    this.#fenced = true;
    await this.#o.hooks?.onDeclaredDead?.();
    if (this.#stopped) return;
    await this.register();
    await this.#o.hooks?.onReconnected?.();
  }

  /** Declares dead the hosts silent longer than the bound (only once this host has been connected that long itself). */
  async sweep(): Promise<HostLoss[]> {
    const since = this.#connectedSince;
    const { deadAfterMs } = this.#o.settings;
    if (since === undefined || this.#monotonic() - since < deadAfterMs) return [];
    const now = this.#now();
    const silentBefore = new Date(now.getTime() - deadAfterMs);
    const losses: HostLoss[] = [];
    for (const host of await listSilentHosts(this.#o.db, silentBefore)) {
      if (host.id === this.hostId) continue;
      const loss = await declareHostDead(this.#o.db, host.id, { silentBefore, by: this.hostId, now });
      if (!loss.declared) continue;
      losses.push(loss);
      this.#o.logger.warn(
        { host: host.id, lastHeartbeat: host.heartbeatAt, released: loss.released.length, failed: loss.failed, terminated: loss.terminated.length },
        'declared a silent host dead: its SUSPENDED microVMs are resumable anywhere, its running ones FAILED (host_lost)',
      );
      this.#o.hooks?.onHostLost?.(host.id, loss);
    }
    return losses;
  }
}
