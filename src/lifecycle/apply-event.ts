/**
 * The one way the lifecycle changes a microVM's state in the store: an event of the transition
 * table (transitions.ts), applied as the store's compare-and-set from the event's legal source
 * states to its target. A refused move (the row is in a state where the event is illegal: another
 * operation or host moved it meanwhile) answers false and writes nothing.
 */
import { getMicrovm, transitionMicrovm, type MicrovmTransition } from '../store/microvms.ts';
import type { Db } from '../store/sql.ts';
import { runtimeRecord, type Runtime } from './storage.ts';
import { casSources, targetState, type MicrovmEvent, type MicrovmState } from './transitions.ts';

export async function applyMicrovmEvent(
  db: Db,
  id: string,
  event: MicrovmEvent,
  patch: MicrovmTransition = {},
  /** Move only from this state (or these), each of which must allow the event. */
  only?: MicrovmState | readonly MicrovmState[],
): Promise<boolean> {
  return transitionMicrovm(db, id, casSources(event, only), targetState(event), patch);
}

/** What `applyInstanceEvent` keeps in step with the store: the lifecycle's in-memory record (instance.ts). */
export interface EventTarget {
  readonly id: string;
  state: MicrovmState;
  runtime: Runtime;
  suspendedAt: number;
  /** In a cluster: the lease epoch this host holds; the move happens only while the row still has it. */
  readonly leaseEpoch?: number | undefined;
}

/**
 * Applies an event to a microVM the lifecycle holds: compare-and-set in the store, then in
 * memory; a refused move reads the state the store has now.
 */
export async function applyInstanceEvent(db: Db, instance: EventTarget, event: MicrovmEvent, patch: { runtime?: Runtime; error?: string } = {}): Promise<boolean> {
  const to = targetState(event);
  const moved = await applyMicrovmEvent(db, instance.id, event, {
    ...(patch.runtime ? { runtime: runtimeRecord(patch.runtime) } : {}),
    ...(patch.error !== undefined ? { error: patch.error } : {}),
    ...(instance.leaseEpoch !== undefined ? { leaseEpoch: instance.leaseEpoch } : {}),
  });
  if (moved) {
    instance.state = to;
    if (patch.runtime) instance.runtime = patch.runtime;
    if (to === 'SUSPENDED') instance.suspendedAt = Date.now();
  } else {
    const current = await getMicrovm(db, instance.id);
    if (current) instance.state = current.state;
  }
  return moved;
}
