/**
 * Which host runs a microVM: a lease held in its row (`microvms.host_id`) with a fencing token
 * (`microvms.lease_epoch`). The epoch counts up on every change of owner: an acquire by another
 * host, a release, a take-over after the owner was declared dead (`hosts.ts`). The owner passes
 * the epoch it got with each state write (`transitionMicrovm(…, { leaseEpoch })`,
 * `setMicrovmRuntimeIf(…, leaseEpoch)`), which then changes nothing once the lease moved on: a
 * slow or partitioned host cannot overwrite what the new owner did, and learns from the refusal
 * that it must stop its VM. Every change here is a compare-and-set in one transaction, so across
 * any number of hosts exactly one acquire wins (docs/cluster.md).
 */
import type { MicrovmState } from '../common/microvm-states.ts';
import type { Db } from './sql.ts';
import { statesFilter } from './values.ts';
import { MICROVM_STATES } from '../common/microvm-states.ts';

export interface MicrovmLease {
  microvmId: string;
  /** The owner; null: ownerless (any host may acquire it). */
  hostId: string | null;
  epoch: number;
  state: MicrovmState;
}

export type LeaseOutcome =
  | { acquired: true; epoch: number; state: MicrovmState; /** false: this host held it already (epoch unchanged). */ changed: boolean }
  | {
      acquired: false;
      /** owned: a LIVE host holds it (`ownerHostId`: forward there); state: not in the states asked for; not_found: no such microVM. */
      reason: 'owned' | 'state' | 'not_found';
      ownerHostId: string | null;
      epoch: number;
      state: MicrovmState | null;
    };

interface LeaseRow {
  host_id: string | null;
  lease_epoch: number;
  state: MicrovmState;
}

export async function getMicrovmLease(db: Db, id: string): Promise<MicrovmLease | undefined> {
  const row = await db.get<LeaseRow>('SELECT host_id, lease_epoch, state FROM microvms WHERE id = ?', [id]);
  return row && { microvmId: id, hostId: row.host_id, epoch: row.lease_epoch, state: row.state };
}

/** Whether `hostId` holds the microVM's lease at `epoch` (nothing took it over since). */
export async function holdsMicrovmLease(db: Db, id: string, hostId: string, epoch: number): Promise<boolean> {
  const row = await db.get<{ n: number }>('SELECT 1 AS n FROM microvms WHERE id = ? AND host_id = ? AND lease_epoch = ?', [id, hostId, epoch]);
  return row !== undefined;
}

/**
 * Acquires the microVM's lease for `hostId` (compare-and-set on the epoch; exactly one of any
 * number of racing hosts wins). It is free when ownerless, when `hostId` holds it already (then
 * the epoch stays), or when its owner was declared DEAD; a LIVE owner keeps it, and so does an
 * owner with no `hosts` row (a single-host database before it joined a cluster: never guessed
 * dead). With `states`, only a microVM in one of them is acquired (a resume asks for SUSPENDED).
 */
export async function acquireMicrovmLease(
  db: Db,
  id: string,
  hostId: string,
  options: { states?: readonly MicrovmState[] } = {},
): Promise<LeaseOutcome> {
  const states = statesFilter(options.states, MICROVM_STATES, 'microVM state');
  return db.transaction(async (tx) => {
    const row = await tx.get<LeaseRow & { owner_state: string | null }>(
      `SELECT m.host_id, m.lease_epoch, m.state, h.state AS owner_state
         FROM microvms m LEFT JOIN hosts h ON h.id = m.host_id
        WHERE m.id = ?`,
      [id],
    );
    if (row === undefined) return { acquired: false, reason: 'not_found', ownerHostId: null, epoch: 0, state: null };
    if (states !== undefined && !states.includes(row.state)) {
      return { acquired: false, reason: 'state', ownerHostId: row.host_id, epoch: row.lease_epoch, state: row.state };
    }
    if (row.host_id === hostId) return { acquired: true, epoch: row.lease_epoch, state: row.state, changed: false };
    if (row.host_id !== null && row.owner_state !== 'DEAD') {
      return { acquired: false, reason: 'owned', ownerHostId: row.host_id, epoch: row.lease_epoch, state: row.state };
    }
    const epoch = row.lease_epoch + 1;
    const result = await tx.run('UPDATE microvms SET host_id = ?, lease_epoch = ? WHERE id = ? AND lease_epoch = ?', [
      hostId, epoch, id, row.lease_epoch,
    ]);
    if (result.changes !== 1) {
      // Only reachable where the engine lets two writers interleave (it does not: both dialects
      // serialize transactions); answered as a loss rather than assumed.
      const now = await tx.get<LeaseRow>('SELECT host_id, lease_epoch, state FROM microvms WHERE id = ?', [id]);
      return { acquired: false, reason: 'owned', ownerHostId: now?.host_id ?? null, epoch: now?.lease_epoch ?? 0, state: now?.state ?? null };
    }
    return { acquired: true, epoch, state: row.state, changed: true };
  });
}

/**
 * Gives the lease up (the microVM becomes ownerless, its epoch counts up so that nothing the
 * releasing host still writes with the old one lands). Only the holder at `epoch` can; answers
 * whether it did.
 */
export async function releaseMicrovmLease(db: Db, id: string, hostId: string, epoch: number): Promise<boolean> {
  const result = await db.run('UPDATE microvms SET host_id = NULL, lease_epoch = lease_epoch + 1 WHERE id = ? AND host_id = ? AND lease_epoch = ?', [
    id, hostId, epoch,
  ]);
  return result.changes === 1;
}
