/**
 * Which host runs a microVM, when hosts share one database (docs/cluster.md): the lifecycle side
 * of the leases in src/store/leases.ts. Used only when the engine runs with `leases: true` (a
 * cluster); with one host the engine never calls it and nothing changes.
 *
 * - A launch (PENDING) and a resume (SUSPENDED) acquire the microVM's lease first, by
 *   compare-and-set: of several hosts racing, exactly one wins; the others learn the owner and
 *   answer `microvm_on_other_host` with its id and URLs, so that the caller can forward there.
 * - Every state write of the owner carries the epoch it got (apply-event.ts): once another host
 *   took the lease over, the write changes nothing, and the owner stops its VM.
 * - A microVM this process does not hold yet (another host's before, or made ownerless by a
 *   host's loss) is loaded on demand when a request needs it here.
 */
import { CocoonError } from '../common/errors.ts';
import { getHost } from '../store/hosts.ts';
import { acquireMicrovmLease, type LeaseOutcome } from '../store/leases.ts';
import { getMicrovm, type Microvm } from '../store/microvms.ts';
import type { Db } from '../store/sql.ts';
import { FINAL_MICROVM_STATES, type MicrovmState } from './transitions.ts';

/** The answer for a microVM another live host runs: where to forward. */
export async function onOtherHostError(db: Db, microvmId: string, ownerHostId: string): Promise<CocoonError> {
  const owner = await getHost(db, ownerHostId);
  return new CocoonError(
    'microvm_on_other_host',
    `microVM ${microvmId} runs on host ${ownerHostId}${owner?.apiUrl ? ` (${owner.apiUrl})` : ''}; send the request there`,
    { details: { hostId: ownerHostId, apiUrl: owner?.apiUrl ?? null, gatewayUrl: owner?.gatewayUrl ?? null } },
  );
}

/**
 * Acquires the lease for `hostId` while the microVM is in one of `states`. Answers the epoch;
 * throws `microvm_on_other_host` when a live host holds it; undefined when the microVM is in
 * another state (or gone): the caller reads the row again.
 */
export async function acquireLease(db: Db, microvmId: string, hostId: string, states: readonly MicrovmState[]): Promise<number | undefined> {
  const outcome: LeaseOutcome = await acquireMicrovmLease(db, microvmId, hostId, { states });
  if (outcome.acquired) return outcome.epoch;
  if (outcome.reason === 'owned' && outcome.ownerHostId !== null) throw await onOtherHostError(db, microvmId, outcome.ownerHostId);
  if (outcome.reason === 'state' && outcome.ownerHostId !== null && outcome.ownerHostId !== hostId) {
    // Another host moved it meanwhile (resumed it, say): it runs there.
    throw await onOtherHostError(db, microvmId, outcome.ownerHostId);
  }
  return undefined;
}

/**
 * The row of a microVM this host may start managing now: its own, or one without a live owner
 * (ownerless, or its owner was declared dead). Throws `microvm_on_other_host` for one a live
 * host runs; undefined when there is no such microVM.
 */
export async function ownableMicrovm(db: Db, microvmId: string, hostId: string): Promise<Microvm | undefined> {
  const microvm = await getMicrovm(db, microvmId);
  if (microvm === undefined || microvm.hostId === null || microvm.hostId === hostId) return microvm;
  if ((FINAL_MICROVM_STATES as readonly string[]).includes(microvm.state)) return microvm;
  const owner = await getHost(db, microvm.hostId);
  if (owner?.state === 'DEAD') return microvm;
  throw await onOtherHostError(db, microvmId, microvm.hostId);
}
