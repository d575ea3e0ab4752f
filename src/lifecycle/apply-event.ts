/**
 * The one way the lifecycle changes a microVM's state in the store: an event of the transition
 * table (transitions.ts), applied as the store's compare-and-set from the event's legal source
 * states to its target. A refused move (the row is in a state where the event is illegal: another
 * operation or host moved it meanwhile) answers false and writes nothing.
 */
import { transitionMicrovm, type MicrovmTransition } from '../store/microvms.ts';
import type { Db } from '../store/sql.ts';
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
