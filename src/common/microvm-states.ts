/**
 * The states of a microVM: one name (`MicrovmState`) for the one union that the store, the
 * lifecycle, the gateway and the API share. It lives here, in the folder every role may import,
 * so that none of them has to import another role for it (no folder cycle). Which state follows
 * which is the lifecycle's transition table (src/lifecycle/transitions.ts).
 */
export const MICROVM_STATES = [
  'PENDING', 'RUNNING', 'SUSPENDING', 'SUSPENDED', 'RESUMING', 'TERMINATING', 'TERMINATED', 'FAILED',
] as const;

export type MicrovmState = (typeof MICROVM_STATES)[number];

/** States a microVM never leaves. */
export const FINAL_MICROVM_STATES: readonly MicrovmState[] = ['TERMINATED', 'FAILED'];

/** States of a microVM that still exists (every state but the final ones). */
export const ACTIVE_MICROVM_STATES: readonly MicrovmState[] = MICROVM_STATES.filter((s) => !FINAL_MICROVM_STATES.includes(s));

export function isMicrovmState(value: unknown): value is MicrovmState {
  return typeof value === 'string' && (MICROVM_STATES as readonly string[]).includes(value);
}
