import { CocoonError } from '../common/errors.ts';
import { ACTIVE_MICROVM_STATES, MICROVM_STATES, type MicrovmState } from '../common/microvm-states.ts';
import { isArn, microvmArn } from './arn.ts';
import { appendEvent } from './events.ts';
import { newId } from './ids.ts';
import { decodeCursor, pageLimit, toPage, type Page, type PageRequest } from './pagination.ts';
import type { Db, SqlParam } from './sql.ts';
import { boolColumn, insertRow, jsonColumn, rowMapper } from './rows.ts';
import { bool, invalid, iso, placeholders, statesFilter } from './values.ts';

export { ACTIVE_MICROVM_STATES, FINAL_MICROVM_STATES, MICROVM_STATES, type MicrovmState } from '../common/microvm-states.ts';

export const MAX_SESSION_SECONDS = 28_800;

/** Named as AWS Lambda MicroVMs' IdlePolicy, so a compatible facade stays easy. */
export interface IdlePolicy {
  autoResumeEnabled: boolean;
  maxIdleDurationSeconds: number;
  /** null: stay SUSPENDED until the session ends. */
  suspendedDurationSeconds: number | null;
}

export interface Microvm {
  id: string;
  tenantId: string;
  arn: string;
  /** null once the image was deleted; `imageArn` still names it. */
  imageId: string | null;
  imageArn: string;
  state: MicrovmState;
  error: string | null;
  vcpus: number;
  memoryMiB: number;
  diskMiB: number;
  port: number;
  /** false: its image has no app port (gateway HTTP answers 409 no_app_port). */
  hasAppPort: boolean;
  idlePolicy: IdlePolicy;
  maximumDurationSeconds: number;
  networkEgress: boolean;
  clientToken: string | null;
  /** What lifecycle and vmm need to find the running VM again (pid, sockets, host port…). */
  runtime: Record<string, unknown>;
  createdAt: string;
  updatedAt: string;
  /** The session's end: createdAt + maximumDurationSeconds. */
  expiresAt: string;
  lastActivityAt: string;
  suspendedAt: string | null;
  terminatedAt: string | null;
  /** The host whose lifecycle runs it (null until one claims it: see `claimMicrovm`). */
  hostId: string | null;
  /** The fencing token of `hostId`'s lease: counts up on every change of owner (leases.ts). */
  leaseEpoch: number;
}

export interface NewMicrovm {
  tenantId: string;
  region: string;
  /** The image's id; it must belong to the tenant and be READY. */
  imageId: string;
  idlePolicy: IdlePolicy;
  maximumDurationSeconds: number;
  networkEgress?: boolean;
  /** Makes the start idempotent per tenant. */
  clientToken?: string | null;
  /**
   * A digest of the request's parameters: a retry with the same clientToken but another
   * digest is refused (`idempotency_conflict`) instead of silently returning the first result.
   */
  clientRequestHash?: string | null;
  /**
   * The body of the image's HTTP run hook (AWS's runHookPayload): at most 4096 bytes of UTF-8.
   * Sensitive: kept only until the run hook was sent, never logged, never in a view.
   */
  runHookPayload?: string | null;
  now?: Date;
}

/** AWS's limit on RunMicrovm's runHookPayload, bytes. */
export const MAX_RUN_HOOK_PAYLOAD_BYTES = 4096;

interface MicrovmRow {
  id: string;
  tenant_id: string;
  image_id: string | null;
  image_arn: string;
  arn: string;
  state: MicrovmState;
  error: string | null;
  vcpus: number;
  memory_mib: number;
  disk_mib: number;
  port: number;
  has_app_port?: number;
  auto_resume_enabled: number;
  max_idle_duration_seconds: number;
  suspended_duration_seconds: number | null;
  maximum_duration_seconds: number;
  network_egress: number;
  client_token: string | null;
  client_request_hash: string | null;
  run_hook_payload?: string | null;
  runtime: string;
  created_at: string;
  updated_at: string;
  expires_at: string;
  last_activity_at: string;
  suspended_at: string | null;
  terminated_at: string | null;
  host_id?: string | null;
  lease_epoch?: number;
}

const toMicrovm = rowMapper<MicrovmRow, Microvm>({
  id: 'id', tenantId: 'tenant_id', arn: 'arn', imageId: 'image_id', imageArn: 'image_arn', state: 'state', error: 'error',
  vcpus: 'vcpus', memoryMiB: 'memory_mib', diskMiB: 'disk_mib', port: 'port',
  hasAppPort: (row) => row.has_app_port !== 0,
  idlePolicy: (row) => ({
    autoResumeEnabled: bool(row.auto_resume_enabled),
    maxIdleDurationSeconds: row.max_idle_duration_seconds,
    suspendedDurationSeconds: row.suspended_duration_seconds,
  }),
  maximumDurationSeconds: 'maximum_duration_seconds',
  networkEgress: boolColumn('network_egress'),
  clientToken: 'client_token',
  runtime: jsonColumn('runtime'),
  createdAt: 'created_at', updatedAt: 'updated_at', expiresAt: 'expires_at', lastActivityAt: 'last_activity_at',
  suspendedAt: 'suspended_at', terminatedAt: 'terminated_at',
  hostId: (row) => row.host_id ?? null,
  leaseEpoch: (row) => row.lease_epoch ?? 0,
});

function checkNewMicrovm(input: NewMicrovm): void {
  const policy = input.idlePolicy;
  if (typeof policy !== 'object' || policy === null) throw invalid('idlePolicy is required');
  if (typeof policy.autoResumeEnabled !== 'boolean') throw invalid('idlePolicy.autoResumeEnabled must be true or false');
  const limit = input.maximumDurationSeconds;
  if (!Number.isInteger(limit) || limit < 1 || limit > MAX_SESSION_SECONDS) {
    throw invalid(`maximumDurationSeconds must be an integer from 1 to ${MAX_SESSION_SECONDS}`);
  }
  if (!Number.isInteger(policy.maxIdleDurationSeconds) || policy.maxIdleDurationSeconds < 1 || policy.maxIdleDurationSeconds > MAX_SESSION_SECONDS) {
    throw invalid(`idlePolicy.maxIdleDurationSeconds must be an integer from 1 to ${MAX_SESSION_SECONDS}`);
  }
  const suspended = policy.suspendedDurationSeconds;
  if (suspended !== null && (!Number.isInteger(suspended) || suspended < 1 || suspended > MAX_SESSION_SECONDS)) {
    throw invalid(`idlePolicy.suspendedDurationSeconds must be an integer from 1 to ${MAX_SESSION_SECONDS}, or absent`);
  }
  const token = input.clientToken;
  if (token != null && (typeof token !== 'string' || !/^[\x21-\x7e]{1,64}$/.test(token))) {
    throw invalid('clientToken must be 1–64 visible ASCII characters');
  }
  const payload = input.runHookPayload;
  if (payload != null && (typeof payload !== 'string' || Buffer.byteLength(payload, 'utf8') > MAX_RUN_HOOK_PAYLOAD_BYTES)) {
    throw invalid(`runHookPayload must be a string of at most ${MAX_RUN_HOOK_PAYLOAD_BYTES} bytes`);
  }
}

/**
 * Creates a PENDING microVM from a READY image, copying the image's resources and port, with
 * `expiresAt = now + maximumDurationSeconds`. With a clientToken it is idempotent: the same
 * token again returns the first microVM and `created: false`.
 */
export async function createMicrovm(db: Db, input: NewMicrovm): Promise<{ microvm: Microvm; created: boolean }> {
  checkNewMicrovm(input);
  const now = input.now ?? new Date();
  return db.transaction(async (tx) => {
    if (input.clientToken != null) {
      const existing = await tx.get<MicrovmRow>('SELECT * FROM microvms WHERE tenant_id = ? AND client_token = ?', [
        input.tenantId, input.clientToken,
      ]);
      if (existing !== undefined) {
        const hash = input.clientRequestHash ?? null;
        if (hash !== null && existing.client_request_hash !== null && hash !== existing.client_request_hash) {
          throw new CocoonError(
            'idempotency_conflict',
            `clientToken '${input.clientToken}' was already used to start ${existing.id} with other parameters; use a new clientToken`,
            { status: 409 },
          );
        }
        return { microvm: toMicrovm(existing), created: false };
      }
    }
    const image = await tx.get<{ id: string; arn: string; state: string; vcpus: number; memory_mib: number; disk_mib: number; port: number; has_app_port: number; network_egress: number; account_id: string }>(
      `SELECT i.id, i.arn, i.state, i.vcpus, i.memory_mib, i.disk_mib, i.port, i.has_app_port, i.network_egress, t.account_id
         FROM images i JOIN tenants t ON t.id = i.tenant_id
        WHERE i.id = ? AND i.tenant_id = ?`,
      [input.imageId, input.tenantId],
    );
    if (image === undefined) throw new CocoonError('image_not_found', `no image '${input.imageId}'`, { status: 404 });
    if (image.state !== 'READY') {
      throw new CocoonError(
        'image_not_ready',
        `image ${image.arn} is ${image.state}; a microVM can start once it is READY`,
        { status: 409 },
      );
    }
    const id = newId('microvm', now.getTime());
    const row: MicrovmRow = {
      id,
      tenant_id: input.tenantId,
      image_id: image.id,
      image_arn: image.arn,
      arn: microvmArn(input.region, image.account_id, id),
      state: 'PENDING',
      error: null,
      vcpus: image.vcpus,
      memory_mib: image.memory_mib,
      disk_mib: image.disk_mib,
      port: image.port,
      has_app_port: image.has_app_port,
      auto_resume_enabled: input.idlePolicy.autoResumeEnabled ? 1 : 0,
      max_idle_duration_seconds: input.idlePolicy.maxIdleDurationSeconds,
      suspended_duration_seconds: input.idlePolicy.suspendedDurationSeconds,
      maximum_duration_seconds: input.maximumDurationSeconds,
      network_egress: (input.networkEgress ?? bool(image.network_egress)) ? 1 : 0,
      client_token: input.clientToken ?? null,
      client_request_hash: input.clientRequestHash ?? null,
      ...(input.runHookPayload != null ? { run_hook_payload: input.runHookPayload } : {}),
      runtime: '{}',
      created_at: iso(now),
      updated_at: iso(now),
      expires_at: iso(new Date(now.getTime() + input.maximumDurationSeconds * 1000)),
      last_activity_at: iso(now),
      suspended_at: null,
      terminated_at: null,
    };
    await insertRow(tx, 'microvms', row);
    await appendEvent(tx, {
      tenantId: row.tenant_id, resourceType: 'microvm', resourceId: id, type: 'created', toState: 'PENDING', now,
    });
    return { microvm: toMicrovm(row), created: true };
  });
}

/**
 * The run hook's body kept for a microVM (undefined: none). Read by the lifecycle right before
 * it sends POST /run; `clearRunHookPayload` drops it once sent.
 */
export async function getRunHookPayload(db: Db, id: string): Promise<string | undefined> {
  const row = await db.get<{ run_hook_payload: string | null }>('SELECT run_hook_payload FROM microvms WHERE id = ?', [id]);
  return row?.run_hook_payload ?? undefined;
}

export async function clearRunHookPayload(db: Db, id: string): Promise<void> {
  await db.run('UPDATE microvms SET run_hook_payload = NULL WHERE id = ? AND run_hook_payload IS NOT NULL', [id]);
}

/** Any tenant's microVM by id (gateway, lifecycle). */
export async function getMicrovm(db: Db, id: string): Promise<Microvm | undefined> {
  const row = await db.get<MicrovmRow>('SELECT * FROM microvms WHERE id = ?', [id]);
  return row && toMicrovm(row);
}

/** A tenant's microVM by id or ARN. */
export async function findTenantMicrovm(db: Db, tenantId: string, idOrArn: string): Promise<Microvm | undefined> {
  const column = isArn(idOrArn) ? 'arn' : 'id';
  const row = await db.get<MicrovmRow>(`SELECT * FROM microvms WHERE tenant_id = ? AND ${column} = ?`, [tenantId, idOrArn]);
  return row && toMicrovm(row);
}

export async function findMicrovmByClientToken(db: Db, tenantId: string, clientToken: string): Promise<Microvm | undefined> {
  const row = await db.get<MicrovmRow>('SELECT * FROM microvms WHERE tenant_id = ? AND client_token = ?', [tenantId, clientToken]);
  return row && toMicrovm(row);
}

export interface MicrovmQuery extends PageRequest {
  tenantId: string;
  state?: MicrovmState | readonly MicrovmState[];
  /** Image id. */
  imageId?: string;
  /** Image ARN (still matches once the image was deleted). */
  imageArn?: string;
}

/** A tenant's microVMs, newest first, with keyset pagination. */
export async function listMicrovms(db: Db, query: MicrovmQuery): Promise<Page<Microvm>> {
  const limit = pageLimit(query.limit);
  const cursor = decodeCursor(query.cursor);
  const states = statesFilter(query.state, MICROVM_STATES, 'microVM state');
  const where = ['tenant_id = ?'];
  const params: SqlParam[] = [query.tenantId];
  if (states) { where.push(`state IN ${placeholders(states.length)}`); params.push(...states); }
  if (query.imageId !== undefined) { where.push('image_id = ?'); params.push(query.imageId); }
  if (query.imageArn !== undefined) { where.push('image_arn = ?'); params.push(query.imageArn); }
  if (cursor) { where.push('id < ?'); params.push(cursor); }
  const rows = await db.all<MicrovmRow>(
    `SELECT * FROM microvms WHERE ${where.join(' AND ')} ORDER BY id DESC LIMIT ?`,
    [...params, limit + 1],
  );
  return toPage(rows.map(toMicrovm), limit);
}

/** Every microVM in one of `states`, any tenant, oldest first (lifecycle recovery after a restart). */
export async function listMicrovmsInStates(
  db: Db,
  states: readonly MicrovmState[] = ACTIVE_MICROVM_STATES,
): Promise<Microvm[]> {
  const list = statesFilter(states, MICROVM_STATES, 'microVM state') as MicrovmState[];
  const rows = await db.all<MicrovmRow>(`SELECT * FROM microvms WHERE state IN ${placeholders(list.length)} ORDER BY id`, list);
  return rows.map(toMicrovm);
}

/**
 * The microVMs in `states` that `hostId` runs, and those no host has claimed yet (oldest first):
 * what one host's recovery and scheduler look at. Another host's rows are never among them.
 */
export async function listHostMicrovms(
  db: Db,
  hostId: string,
  states: readonly MicrovmState[] = ACTIVE_MICROVM_STATES,
): Promise<Microvm[]> {
  const list = statesFilter(states, MICROVM_STATES, 'microVM state') as MicrovmState[];
  const rows = await db.all<MicrovmRow>(
    `SELECT * FROM microvms WHERE state IN ${placeholders(list.length)} AND (host_id = ? OR host_id IS NULL) ORDER BY id`,
    [...list, hostId],
  );
  return rows.map(toMicrovm);
}

/**
 * Makes `hostId` the host that runs the microVM, if no other host has (compare-and-set; the same
 * host again is a no-op). Answers whether the microVM is now this host's. Taking an ownerless
 * microVM is a change of owner: its lease epoch counts up (leases.ts).
 */
export async function claimMicrovm(db: Db, id: string, hostId: string): Promise<boolean> {
  await db.run('UPDATE microvms SET host_id = ?, lease_epoch = lease_epoch + 1 WHERE id = ? AND host_id IS NULL', [hostId, id]);
  const row = await db.get<{ host_id: string | null }>('SELECT host_id FROM microvms WHERE id = ?', [id]);
  return row?.host_id === hostId;
}

/** Active microVMs whose session ended at or before `now`. */
export async function listExpiredMicrovms(db: Db, now: Date = new Date()): Promise<Microvm[]> {
  const active = ACTIVE_MICROVM_STATES;
  const rows = await db.all<MicrovmRow>(
    `SELECT * FROM microvms WHERE state IN ${placeholders(active.length)} AND expires_at <= ? ORDER BY expires_at`,
    [...active, iso(now)],
  );
  return rows.map(toMicrovm);
}

export interface MicrovmTransition {
  /** Why it FAILED (kept only for FAILED). */
  error?: string | null;
  /** Replaces the runtime record when given. */
  runtime?: Record<string, unknown>;
  /**
   * The lease epoch the writing host holds (leases.ts): the move happens only while the row
   * still has it, so a host whose lease was taken over changes nothing. Undefined: unfenced
   * (single host).
   */
  leaseEpoch?: number;
  now?: Date;
}

/**
 * Compare-and-set: moves the microVM to `to` only if it is in `from` (one state or several)
 * and returns whether it moved. Timestamps follow the state: SUSPENDED sets suspendedAt,
 * RUNNING clears it (and counts as activity), TERMINATED/FAILED set terminatedAt. The change
 * is written to the event log in the same transaction.
 */
export async function transitionMicrovm(
  db: Db,
  id: string,
  from: MicrovmState | readonly MicrovmState[],
  to: MicrovmState,
  patch: MicrovmTransition = {},
): Promise<boolean> {
  const fromStates = statesFilter(from, MICROVM_STATES, 'microVM state') as MicrovmState[];
  statesFilter(to, MICROVM_STATES, 'microVM state');
  const now = iso(patch.now ?? new Date());
  return db.transaction(async (tx) => {
    const current = await tx.get<{ state: MicrovmState; tenant_id: string; lease_epoch: number }>(
      'SELECT state, tenant_id, lease_epoch FROM microvms WHERE id = ?', [id],
    );
    if (current === undefined || !fromStates.includes(current.state)) return false;
    if (patch.leaseEpoch !== undefined && current.lease_epoch !== patch.leaseEpoch) return false;
    const error = to === 'FAILED' ? (patch.error ?? 'the microVM failed') : null;
    const sets = ['state = ?', 'error = ?', 'updated_at = ?'];
    const params: SqlParam[] = [to, error, now];
    if (patch.runtime !== undefined) { sets.push('runtime = ?'); params.push(JSON.stringify(patch.runtime)); }
    if (to === 'SUSPENDED') { sets.push('suspended_at = ?'); params.push(now); }
    if (to === 'RUNNING') { sets.push('suspended_at = NULL', 'last_activity_at = ?'); params.push(now); }
    if (to === 'TERMINATED' || to === 'FAILED') { sets.push('terminated_at = ?'); params.push(now); }
    const result = await tx.run(`UPDATE microvms SET ${sets.join(', ')} WHERE id = ? AND state = ? AND lease_epoch = ?`, [
      ...params, id, current.state, current.lease_epoch,
    ]);
    if (result.changes !== 1) return false;
    await appendEvent(tx, {
      tenantId: current.tenant_id, resourceType: 'microvm', resourceId: id, type: 'state_changed',
      fromState: current.state, toState: to, message: error, now: new Date(now),
    });
    return true;
  });
}

/**
 * Records traffic (the gateway calls this, throttled): lastActivityAt only moves forward, so
 * late or concurrent reports cannot move it back. Returns whether it changed.
 */
export async function touchMicrovmActivity(db: Db, id: string, at: Date = new Date()): Promise<boolean> {
  const result = await db.run('UPDATE microvms SET last_activity_at = ? WHERE id = ? AND last_activity_at < ?', [
    iso(at), id, iso(at),
  ]);
  return result.changes === 1;
}

/**
 * Replaces the runtime record only while the microVM is in `state` (compare-and-set), and, with
 * `leaseEpoch`, only while the writer still holds that lease epoch; answers whether it did.
 */
export async function setMicrovmRuntimeIf(
  db: Db,
  id: string,
  state: MicrovmState,
  runtime: Record<string, unknown>,
  now: Date = new Date(),
  leaseEpoch?: number,
): Promise<boolean> {
  const fence = leaseEpoch === undefined ? '' : ' AND lease_epoch = ?';
  const result = await db.run(`UPDATE microvms SET runtime = ?, updated_at = ? WHERE id = ? AND state = ?${fence}`, [
    JSON.stringify(runtime), iso(now), id, state, ...(leaseEpoch === undefined ? [] : [leaseEpoch]),
  ]);
  return result.changes === 1;
}

/** Replaces the runtime record without a state change. */
export async function setMicrovmRuntime(db: Db, id: string, runtime: Record<string, unknown>, now: Date = new Date()): Promise<boolean> {
  const result = await db.run('UPDATE microvms SET runtime = ?, updated_at = ? WHERE id = ?', [JSON.stringify(runtime), iso(now), id]);
  return result.changes === 1;
}

export interface NewForks {
  /** The microVM forked (its tenant, image, resources, port, egress and idle policy are copied). */
  source: Microvm;
  region: string;
  /** Ids made beforehand (`newId('microvm')`): the fork point's files are linked under them first. */
  ids: string[];
  /** Default: the source's. */
  idlePolicy?: IdlePolicy;
  /** Default: the source's; each fork's session starts now. */
  maximumDurationSeconds?: number;
  /** What the lifecycle records for each (it starts from its own generation 1). */
  runtime: Record<string, unknown>;
  /**
   * Created SUSPENDED on this host (`hostId`) instead of PENDING: generation 1 is committed
   * already, and each fork wakes on its first request or resume like any suspended microVM.
   */
  suspendedOn?: { hostId: string };
  now?: Date;
}

/**
 * Creates PENDING (or, with `suspendedOn`, SUSPENDED) forks of a microVM, all or none (one
 * transaction): each is a microVM of its own (own session, idle policy, tokens) that the
 * lifecycle starts (or wakes) from its fork point.
 */
export async function createForks(db: Db, input: NewForks): Promise<Microvm[]> {
  const now = input.now ?? new Date();
  const source = input.source;
  const idlePolicy = input.idlePolicy ?? source.idlePolicy;
  const maximumDurationSeconds = input.maximumDurationSeconds ?? source.maximumDurationSeconds;
  checkNewMicrovm({ tenantId: source.tenantId, region: input.region, imageId: source.imageId ?? '', idlePolicy, maximumDurationSeconds });
  return db.transaction(async (tx) => {
    const tenant = await tx.get<{ account_id: string }>('SELECT account_id FROM tenants WHERE id = ?', [source.tenantId]);
    if (tenant === undefined) throw new CocoonError('tenant_not_found', `no tenant '${source.tenantId}'`, { status: 404 });
    const account = tenant.account_id;
    const created: Microvm[] = [];
    for (const id of input.ids) {
      const row: MicrovmRow = {
        id,
        tenant_id: source.tenantId,
        image_id: source.imageId,
        image_arn: source.imageArn,
        arn: microvmArn(input.region, account, id),
        state: input.suspendedOn ? 'SUSPENDED' : 'PENDING',
        error: null,
        vcpus: source.vcpus,
        memory_mib: source.memoryMiB,
        disk_mib: source.diskMiB,
        port: source.port,
        auto_resume_enabled: idlePolicy.autoResumeEnabled ? 1 : 0,
        max_idle_duration_seconds: idlePolicy.maxIdleDurationSeconds,
        suspended_duration_seconds: idlePolicy.suspendedDurationSeconds,
        maximum_duration_seconds: maximumDurationSeconds,
        network_egress: source.networkEgress ? 1 : 0,
        client_token: null,
        client_request_hash: null,
        runtime: JSON.stringify(input.runtime),
        created_at: iso(now),
        updated_at: iso(now),
        expires_at: iso(new Date(now.getTime() + maximumDurationSeconds * 1000)),
        last_activity_at: iso(now),
        suspended_at: input.suspendedOn ? iso(now) : null,
        terminated_at: null,
        // Claimed for this host like a launch claims it (claimMicrovm: a change of owner counts the epoch up).
        ...(input.suspendedOn ? { host_id: input.suspendedOn.hostId, lease_epoch: 1 } : {}),
      };
      await insertRow(tx, 'microvms', row);
      await appendEvent(tx, {
        tenantId: row.tenant_id, resourceType: 'microvm', resourceId: id, type: 'created', toState: row.state,
        message: `forked from ${source.id}${input.suspendedOn ? ', suspended' : ''}`, now,
      });
      created.push(toMicrovm(row));
    }
    return created;
  });
}
