/**
 * The microVM state machine as data: which event is legal in which state, and the state it
 * leads to. Pure (no I/O, no clock): the engine, recovery and the store's compare-and-set all
 * ask this table instead of spelling states out at each call site, and it is tested on its own
 * (test/lifecycle/transitions.test.ts) without QEMU.
 *
 *   PENDING ──started──► RUNNING ──suspend──► SUSPENDING ──suspended──► SUSPENDED
 *                           ▲  ◄──suspend_abandoned──┘                     │ resume
 *                           └──────────resumed──────── RESUMING ◄──────────┘
 *                                         resume_failed: RESUMING ──► SUSPENDED
 *   any active state ──terminate──► TERMINATING ──terminated──► TERMINATED
 *   any active state ──fail──► FAILED (with a reason)
 *
 * Every event has exactly one target state, so "apply event E" is a compare-and-set from the
 * event's source states to its target. TERMINATED and FAILED accept no event.
 */
import { ACTIVE_MICROVM_STATES, MICROVM_STATES, type MicrovmState } from '../common/microvm-states.ts';

export { ACTIVE_MICROVM_STATES, FINAL_MICROVM_STATES, MICROVM_STATES, type MicrovmState } from '../common/microvm-states.ts';

export const MICROVM_EVENTS = [
  /** The VM of a PENDING microVM runs (from its image or its fork point). */
  'started',
  /** A decision to suspend (idle, the API, a shutdown). */
  'suspend',
  /** Memory and disk were committed as a new snapshot generation. */
  'suspended',
  /** The snapshot was abandoned while the VM lives on (a full disk…): back to RUNNING. */
  'suspend_abandoned',
  /** A decision to resume (a request woke it, or the API). */
  'resume',
  /** The VM was restored from its generation and runs. */
  'resumed',
  /** The restore did not happen, its generation is untouched: back to SUSPENDED. */
  'resume_failed',
  /** A decision to terminate (the API, the session's end, suspended too long). */
  'terminate',
  /** Its VM and files are gone. */
  'terminated',
  /** Something went wrong that cannot be undone; the reason is kept. */
  'fail',
] as const;

export type MicrovmEvent = (typeof MICROVM_EVENTS)[number];

interface EventRule {
  readonly from: readonly MicrovmState[];
  readonly to: MicrovmState;
}

const RULES: Readonly<Record<MicrovmEvent, EventRule>> = {
  started: { from: ['PENDING'], to: 'RUNNING' },
  suspend: { from: ['RUNNING'], to: 'SUSPENDING' },
  suspended: { from: ['SUSPENDING'], to: 'SUSPENDED' },
  suspend_abandoned: { from: ['SUSPENDING'], to: 'RUNNING' },
  resume: { from: ['SUSPENDED'], to: 'RESUMING' },
  resumed: { from: ['RESUMING'], to: 'RUNNING' },
  resume_failed: { from: ['RESUMING'], to: 'SUSPENDED' },
  // TERMINATING → TERMINATING: a second termination (a retry after a crash) records it again.
  terminate: { from: ACTIVE_MICROVM_STATES, to: 'TERMINATING' },
  terminated: { from: ['TERMINATING'], to: 'TERMINATED' },
  fail: { from: ACTIVE_MICROVM_STATES, to: 'FAILED' },
};

/** The state `event` leads to from `state`, or undefined when the event is illegal there. */
export function nextState(state: MicrovmState, event: MicrovmEvent): MicrovmState | undefined {
  const rule = RULES[event];
  return rule.from.includes(state) ? rule.to : undefined;
}

/** Whether `event` is legal in `state`. */
export function allows(state: MicrovmState, event: MicrovmEvent): boolean {
  return nextState(state, event) !== undefined;
}

/** The states in which `event` is legal. */
export function sourceStates(event: MicrovmEvent): readonly MicrovmState[] {
  return RULES[event].from;
}

/** The state `event` leads to (from any state where it is legal). */
export function targetState(event: MicrovmEvent): MicrovmState {
  return RULES[event].to;
}

/** The events legal in `state` (none for TERMINATED and FAILED). */
export function legalEvents(state: MicrovmState): MicrovmEvent[] {
  return MICROVM_EVENTS.filter((event) => allows(state, event));
}

/** Thrown when code asks for an event from a state the table does not allow (a bug, not a race). */
export class IllegalTransitionError extends Error {
  readonly state: MicrovmState;
  readonly event: MicrovmEvent;

  constructor(state: MicrovmState, event: MicrovmEvent) {
    super(`event '${event}' is not legal in state ${state} (legal there: ${legalEvents(state).join(', ') || 'none'})`);
    this.name = 'IllegalTransitionError';
    this.state = state;
    this.event = event;
  }
}

/** The state `event` leads to from `state`; throws IllegalTransitionError when it is illegal there. */
export function transition(state: MicrovmState, event: MicrovmEvent): MicrovmState {
  const next = nextState(state, event);
  if (next === undefined) throw new IllegalTransitionError(state, event);
  return next;
}

/**
 * The source states for a compare-and-set of `event`, narrowed to `only` when given (a caller
 * that saw one state and must move only from it). Throws when `only` names a state in which the
 * event is illegal: that is a bug in the caller, not a race with another operation.
 */
export function casSources(event: MicrovmEvent, only?: MicrovmState | readonly MicrovmState[]): MicrovmState[] {
  if (only === undefined) return [...sourceStates(event)];
  const wanted: readonly MicrovmState[] = typeof only === 'string' ? [only] : only;
  for (const state of wanted) if (!allows(state, event)) throw new IllegalTransitionError(state, event);
  return [...wanted];
}
