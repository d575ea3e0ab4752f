/**
 * The hosts of a cluster: every Cocoon process that shares this database registers itself here
 * (its id, the URLs other hosts use to reach its API and gateway, its capacity), heartbeats, and
 * is declared DEAD by another host once it was silent longer than the bounded time
 * (docs/cluster.md). A host's microVMs are the rows whose `microvms.host_id` names it, under a
 * lease with a fencing token (`leases.ts`).
 *
 * Times are the database rows' ISO-8601 text, written from each host's clock: the dead-after
 * bound must stay well above the clock skew between hosts (NTP keeps it far below a second).
 */
import { appendEvent } from './events.ts';
import type { Db } from './sql.ts';
import { rowMapper } from './rows.ts';
import { invalid, iso, placeholders } from './values.ts';

export const HOST_STATES = ['LIVE', 'DEAD'] as const;
export type HostState = (typeof HOST_STATES)[number];

/** The event a microVM gets (beside its state change) when its host was declared dead. */
export const HOST_LOST_EVENT = 'host_lost';

export interface HostCapacity {
  vcpus: number;
  memoryMiB: number;
  diskMiB: number;
}

export interface Host {
  id: string;
  /** Where other hosts reach this host's API (`http://10.0.0.5:7070`); null: not reachable from others. */
  apiUrl: string | null;
  /** Where other hosts reach this host's gateway; null: not reachable from others. */
  gatewayUrl: string | null;
  capacity: HostCapacity;
  state: HostState;
  /** When it registered last (its process started). */
  startedAt: string;
  heartbeatAt: string;
  deadAt: string | null;
  /** The host whose sweeper declared it dead. */
  declaredDeadBy: string | null;
}

interface HostRow {
  id: string;
  api_url: string | null;
  gateway_url: string | null;
  vcpus: number;
  memory_mib: number;
  disk_mib: number;
  state: HostState;
  started_at: string;
  heartbeat_at: string;
  dead_at: string | null;
  declared_dead_by: string | null;
}

const toHost = rowMapper<HostRow, Host>({
  id: 'id', apiUrl: 'api_url', gatewayUrl: 'gateway_url',
  capacity: (row) => ({ vcpus: row.vcpus, memoryMiB: row.memory_mib, diskMiB: row.disk_mib }),
  state: 'state', startedAt: 'started_at', heartbeatAt: 'heartbeat_at', deadAt: 'dead_at', declaredDeadBy: 'declared_dead_by',
});

export interface HostRegistration {
  id: string;
  apiUrl?: string | null;
  gatewayUrl?: string | null;
  capacity: HostCapacity;
  now?: Date;
}

const MAX_URL = 2048;

function checkRegistration(input: HostRegistration): void {
  if (typeof input.id !== 'string' || !/^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/.test(input.id)) throw invalid('host id must be 1-64 of [A-Za-z0-9._-]');
  for (const [name, url] of [['apiUrl', input.apiUrl], ['gatewayUrl', input.gatewayUrl]] as const) {
    if (url == null) continue;
    if (typeof url !== 'string' || url.length > MAX_URL || !/^https?:\/\/[^\s/]+\/?$/.test(url)) throw invalid(`${name} must be an http(s) URL of a host and port`);
  }
  for (const [name, value] of Object.entries(input.capacity)) {
    if (!Number.isSafeInteger(value) || value < 0) throw invalid(`capacity.${name} must be a non-negative integer`);
  }
}

/**
 * Registers this host (at start): inserts it, or makes its row LIVE again with the new
 * addresses and capacity (a restart, or a return after it was declared dead: what it owned
 * then is not given back; the take-over bumped every lease it held).
 */
export async function registerHost(db: Db, input: HostRegistration): Promise<Host> {
  checkRegistration(input);
  const now = iso(input.now ?? new Date());
  const row: HostRow = {
    id: input.id, api_url: input.apiUrl ?? null, gateway_url: input.gatewayUrl ?? null,
    vcpus: input.capacity.vcpus, memory_mib: input.capacity.memoryMiB, disk_mib: input.capacity.diskMiB,
    state: 'LIVE', started_at: now, heartbeat_at: now, dead_at: null, declared_dead_by: null,
  };
  const columns = Object.keys(row);
  const updates = columns.filter((c) => c !== 'id').map((c) => `${c} = excluded.${c}`);
  await db.run(
    `INSERT INTO hosts (${columns.join(', ')}) VALUES ${placeholders(columns.length)}
       ON CONFLICT (id) DO UPDATE SET ${updates.join(', ')}`,
    Object.values(row),
  );
  return toHost(row);
}

/**
 * Records that the host is alive. Answers false when it is not LIVE (another host declared it
 * dead: its leases were taken over, so it must stop the VMs it still runs, then register again)
 * or was never registered.
 */
export async function heartbeatHost(db: Db, id: string, now: Date = new Date()): Promise<boolean> {
  const result = await db.run("UPDATE hosts SET heartbeat_at = ? WHERE id = ? AND state = 'LIVE'", [iso(now), id]);
  return result.changes === 1;
}

export async function getHost(db: Db, id: string): Promise<Host | undefined> {
  const row = await db.get<HostRow>('SELECT * FROM hosts WHERE id = ?', [id]);
  return row && toHost(row);
}

/** Every host ever registered, LIVE or DEAD, by id. */
export async function listHosts(db: Db): Promise<Host[]> {
  return (await db.all<HostRow>('SELECT * FROM hosts ORDER BY id')).map(toHost);
}

/** The LIVE hosts that heartbeat at or after `since` (now − dead-after), by id. */
export async function listLiveHosts(db: Db, since: Date): Promise<Host[]> {
  const rows = await db.all<HostRow>("SELECT * FROM hosts WHERE state = 'LIVE' AND heartbeat_at >= ? ORDER BY id", [iso(since)]);
  return rows.map(toHost);
}

/** LIVE hosts silent since before `before` (now − dead-after): what a sweeper declares dead. */
export async function listSilentHosts(db: Db, before: Date): Promise<Host[]> {
  const rows = await db.all<HostRow>("SELECT * FROM hosts WHERE state = 'LIVE' AND heartbeat_at < ? ORDER BY heartbeat_at", [iso(before)]);
  return rows.map(toHost);
}

/** What was done to a dead host's microVMs (ids). */
export interface HostLoss {
  /** false: the host heartbeat meanwhile, or another sweeper declared it first (nothing was done). */
  declared: boolean;
  /** SUSPENDED microVMs made ownerless: any host may resume them. */
  released: string[];
  /** RUNNING (and PENDING, RESUMING, SUSPENDING) microVMs that ended FAILED with `host_lost`. */
  failed: string[];
  /** TERMINATING microVMs, whose VM went with the host: TERMINATED. */
  terminated: string[];
}

/** The states in which a dead host's microVM ends FAILED: its memory was only on that host. */
const LOST_STATES = ['PENDING', 'RUNNING', 'RESUMING', 'SUSPENDING'] as const;

/**
 * Declares a host dead, once, in one transaction (compare-and-set on its heartbeat: it must be
 * LIVE and silent since before `silentBefore`, so a host that just heartbeat, or a second
 * sweeper racing, changes nothing), and ends its microVMs' leases (each epoch + 1, so writes
 * the host might still make are fenced off):
 * - SUSPENDED: ownerless (host_id NULL), resumable by any host from the committed snapshot;
 * - PENDING, RUNNING, RESUMING, SUSPENDING: FAILED with a reason naming the host (the memory
 *   was only there; nothing is rolled back silently);
 * - TERMINATING: TERMINATED (its VM went with the host).
 * Each gets a `host_lost` event beside the state change.
 */
export async function declareHostDead(
  db: Db,
  id: string,
  options: { silentBefore: Date; by: string; now?: Date },
): Promise<HostLoss> {
  const now = options.now ?? new Date();
  const at = iso(now);
  return db.transaction(async (tx) => {
    const loss: HostLoss = { declared: false, released: [], failed: [], terminated: [] };
    const host = await tx.get<HostRow>('SELECT * FROM hosts WHERE id = ?', [id]);
    if (host === undefined || host.state !== 'LIVE' || host.heartbeat_at >= iso(options.silentBefore)) return loss;
    const moved = await tx.run(
      "UPDATE hosts SET state = 'DEAD', dead_at = ?, declared_dead_by = ? WHERE id = ? AND state = 'LIVE' AND heartbeat_at = ?",
      [at, options.by, id, host.heartbeat_at],
    );
    if (moved.changes !== 1) return loss;
    loss.declared = true;
    const owned = await tx.all<{ id: string; tenant_id: string; state: string }>(
      "SELECT id, tenant_id, state FROM microvms WHERE host_id = ? AND state NOT IN ('TERMINATED', 'FAILED') ORDER BY id",
      [id],
    );
    const since = `host ${id} stopped heartbeating at ${host.heartbeat_at} and was declared dead by ${options.by}`;
    for (const vm of owned) {
      let to: string;
      let message: string;
      if (vm.state === 'SUSPENDED') {
        await tx.run('UPDATE microvms SET host_id = NULL, lease_epoch = lease_epoch + 1, updated_at = ? WHERE id = ?', [at, vm.id]);
        loss.released.push(vm.id);
        await appendEvent(tx, {
          tenantId: vm.tenant_id, resourceType: 'microvm', resourceId: vm.id, type: HOST_LOST_EVENT,
          message: `${since}; the microVM stays SUSPENDED and any host may resume it`, data: { hostId: id }, now,
        });
        continue;
      } else if (vm.state === 'TERMINATING') {
        to = 'TERMINATED';
        message = `${since} while the microVM was TERMINATING`;
        loss.terminated.push(vm.id);
      } else if ((LOST_STATES as readonly string[]).includes(vm.state)) {
        to = 'FAILED';
        message = `host_lost: ${since} while the microVM was ${vm.state}; its memory was only on that host`;
        loss.failed.push(vm.id);
      } else {
        continue;
      }
      await tx.run(
        `UPDATE microvms SET state = ?, error = ?, updated_at = ?, terminated_at = ?, host_id = NULL, lease_epoch = lease_epoch + 1
          WHERE id = ?`,
        [to, to === 'FAILED' ? message : null, at, at, vm.id],
      );
      await appendEvent(tx, {
        tenantId: vm.tenant_id, resourceType: 'microvm', resourceId: vm.id, type: HOST_LOST_EVENT,
        fromState: vm.state, toState: to, message, data: { hostId: id }, now,
      });
      await appendEvent(tx, {
        tenantId: vm.tenant_id, resourceType: 'microvm', resourceId: vm.id, type: 'state_changed',
        fromState: vm.state, toState: to, message: to === 'FAILED' ? message : null, now,
      });
    }
    return loss;
  });
}

/** The resources a host's microVMs take (those it owns that are not final). */
export interface HostUsage {
  hostId: string;
  /** Of the microVMs that run (or are about to): PENDING, RUNNING, RESUMING, SUSPENDING. */
  vcpus: number;
  memoryMiB: number;
  /** Of every microVM it owns that is not final, SUSPENDED ones included (their files are there). */
  diskMiB: number;
  /** Its microVMs that run (or are about to). */
  running: number;
}

/** What each LIVE host's microVMs take (a host with none is listed with zeros). */
export async function listHostUsage(db: Db): Promise<HostUsage[]> {
  const rows = await db.all<{ id: string; vcpus: number | null; memory_mib: number | null; disk_mib: number | null; running: number | null }>(
    `SELECT h.id,
            SUM(CASE WHEN m.state IN ('PENDING', 'RUNNING', 'RESUMING', 'SUSPENDING') THEN m.vcpus ELSE 0 END) AS vcpus,
            SUM(CASE WHEN m.state IN ('PENDING', 'RUNNING', 'RESUMING', 'SUSPENDING') THEN m.memory_mib ELSE 0 END) AS memory_mib,
            SUM(CASE WHEN m.id IS NOT NULL THEN m.disk_mib ELSE 0 END) AS disk_mib,
            SUM(CASE WHEN m.state IN ('PENDING', 'RUNNING', 'RESUMING', 'SUSPENDING') THEN 1 ELSE 0 END) AS running
       FROM hosts h
       LEFT JOIN microvms m ON m.host_id = h.id AND m.state NOT IN ('TERMINATED', 'FAILED')
      WHERE h.state = 'LIVE'
      GROUP BY h.id
      ORDER BY h.id`,
  );
  return rows.map((r) => ({ hostId: r.id, vcpus: r.vcpus ?? 0, memoryMiB: r.memory_mib ?? 0, diskMiB: r.disk_mib ?? 0, running: r.running ?? 0 }));
}

/**
 * The hosts that have held a microVM of the image (so its snapshot is in their local cache,
 * most likely): what placement prefers after the receiving host.
 */
export async function listHostsWithImage(db: Db, imageId: string): Promise<string[]> {
  const rows = await db.all<{ host_id: string }>('SELECT DISTINCT host_id FROM microvms WHERE image_id = ? AND host_id IS NOT NULL ORDER BY host_id', [imageId]);
  return rows.map((r) => r.host_id);
}
