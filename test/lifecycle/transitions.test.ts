// The microVM transition table on its own: every state × event, illegal ones refused, in memory
// and through the store's compare-and-set (a real SQLite file). No QEMU, no VM: fast.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { applyMicrovmEvent } from '../../src/lifecycle/apply-event.ts';
import {
  ACTIVE_MICROVM_STATES,
  FINAL_MICROVM_STATES,
  IllegalTransitionError,
  MICROVM_EVENTS,
  MICROVM_STATES,
  allows,
  casSources,
  legalEvents,
  nextState,
  transition,
  type MicrovmEvent,
  type MicrovmState,
} from '../../src/lifecycle/transitions.ts';
import { createMicrovm, getMicrovm, transitionMicrovm } from '../../src/store/microvms.ts';
import { readyImage, someTenant, tempDb } from '../store/helpers.ts';

// The expected table, written out by hand (not derived from the module under test): for each
// state, the events legal there and where they lead. Every pair not listed is illegal.
const EXPECTED: Record<MicrovmState, Partial<Record<MicrovmEvent, MicrovmState>>> = {
  PENDING: { started: 'RUNNING', terminate: 'TERMINATING', fail: 'FAILED' },
  RUNNING: { suspend: 'SUSPENDING', terminate: 'TERMINATING', fail: 'FAILED' },
  SUSPENDING: { suspended: 'SUSPENDED', suspend_abandoned: 'RUNNING', terminate: 'TERMINATING', fail: 'FAILED' },
  SUSPENDED: { resume: 'RESUMING', terminate: 'TERMINATING', fail: 'FAILED' },
  RESUMING: { resumed: 'RUNNING', resume_failed: 'SUSPENDED', terminate: 'TERMINATING', fail: 'FAILED' },
  TERMINATING: { terminated: 'TERMINATED', terminate: 'TERMINATING', fail: 'FAILED' },
  TERMINATED: {},
  FAILED: {},
};

const PAIRS = MICROVM_STATES.flatMap((state) => MICROVM_EVENTS.map((event) => ({ state, event })));

test('every state × event: legal ones lead where the table says, illegal ones are refused', () => {
  assert.equal(PAIRS.length, 8 * 10);
  for (const { state, event } of PAIRS) {
    const expected = EXPECTED[state][event];
    assert.equal(nextState(state, event), expected, `${state} × ${event}`);
    assert.equal(allows(state, event), expected !== undefined, `${state} × ${event}`);
    if (expected === undefined) {
      assert.throws(() => transition(state, event), (error: unknown) => {
        assert.ok(error instanceof IllegalTransitionError);
        assert.equal(error.state, state);
        assert.equal(error.event, event);
        assert.match(error.message, new RegExp(`'${event}' is not legal in state ${state}`));
        return true;
      });
    } else {
      assert.equal(transition(state, event), expected);
    }
  }
});

test('final states accept no event; every other state can still end', () => {
  for (const state of FINAL_MICROVM_STATES) assert.deepEqual(legalEvents(state), [], state);
  for (const state of ACTIVE_MICROVM_STATES) {
    assert.ok(allows(state, 'terminate'), `${state} can be terminated`);
    assert.ok(allows(state, 'fail'), `${state} can fail`);
  }
  assert.deepEqual([...ACTIVE_MICROVM_STATES, ...FINAL_MICROVM_STATES].sort(), [...MICROVM_STATES].sort());
});

test('every state is reachable from PENDING and every event is used somewhere', () => {
  const seen = new Set<MicrovmState>(['PENDING']);
  const todo: MicrovmState[] = ['PENDING'];
  while (todo.length > 0) {
    const state = todo.pop()!;
    for (const event of legalEvents(state)) {
      const next = transition(state, event);
      if (!seen.has(next)) { seen.add(next); todo.push(next); }
    }
  }
  assert.deepEqual([...seen].sort(), [...MICROVM_STATES].sort());
  for (const event of MICROVM_EVENTS) assert.ok(MICROVM_STATES.some((s) => allows(s, event)), `${event} is legal somewhere`);
});

test('a compare-and-set narrowed to a state where the event is illegal is a bug, not a race', () => {
  assert.deepEqual(casSources('suspend'), ['RUNNING']);
  assert.deepEqual(casSources('fail', 'SUSPENDING'), ['SUSPENDING']);
  assert.throws(() => casSources('suspend', 'SUSPENDED'), IllegalTransitionError);
  assert.throws(() => casSources('fail', ['RUNNING', 'FAILED']), IllegalTransitionError);
});

test('property: any sequence of events walks the table (illegal events change nothing, final states stay)', () => {
  fc.assert(
    fc.property(fc.array(fc.constantFrom(...MICROVM_EVENTS), { maxLength: 40 }), (events) => {
      let state: MicrovmState = 'PENDING';
      for (const event of events) {
        const expected: MicrovmState | undefined = EXPECTED[state][event];
        const before: MicrovmState = state;
        state = nextState(state, event) ?? state;
        assert.equal(state, expected ?? before);
        if (FINAL_MICROVM_STATES.includes(before)) assert.equal(state, before);
      }
    }),
    { numRuns: 500 },
  );
});

test('the store applies events by the table: every state × event against a real database', async (t) => {
  const { db } = await tempDb(t);
  const tenant = await someTenant(db);
  const image = await readyImage(db, tenant.id);
  const policy = { autoResumeEnabled: true, maxIdleDurationSeconds: 300, suspendedDurationSeconds: null };
  for (const { state, event } of PAIRS) {
    const { microvm } = await createMicrovm(db, { tenantId: tenant.id, region: 'local', imageId: image.id, idlePolicy: policy, maximumDurationSeconds: 600 });
    // Put the row in `state` with the raw compare-and-set (fixtures may jump).
    if (state !== 'PENDING') assert.ok(await transitionMicrovm(db, microvm.id, 'PENDING', state));
    const expected = EXPECTED[state][event];
    const moved = await applyMicrovmEvent(db, microvm.id, event, event === 'fail' ? { error: 'test' } : {});
    assert.equal(moved, expected !== undefined, `${state} × ${event}`);
    assert.equal((await getMicrovm(db, microvm.id))?.state, expected ?? state, `${state} × ${event}`);
  }
});

test('the store refuses an event when the row moved on meanwhile (compare-and-set narrowed to what the caller saw)', async (t) => {
  const { db } = await tempDb(t);
  const tenant = await someTenant(db);
  const image = await readyImage(db, tenant.id);
  const policy = { autoResumeEnabled: true, maxIdleDurationSeconds: 300, suspendedDurationSeconds: null };
  const { microvm } = await createMicrovm(db, { tenantId: tenant.id, region: 'local', imageId: image.id, idlePolicy: policy, maximumDurationSeconds: 600 });
  assert.ok(await applyMicrovmEvent(db, microvm.id, 'started'));
  // A caller that saw PENDING must not fail a microVM that is RUNNING now.
  assert.equal(await applyMicrovmEvent(db, microvm.id, 'fail', { error: 'stale' }, 'PENDING'), false);
  assert.equal((await getMicrovm(db, microvm.id))?.state, 'RUNNING');
  assert.ok(await applyMicrovmEvent(db, microvm.id, 'fail', { error: 'seen running' }, 'RUNNING'));
  const failed = await getMicrovm(db, microvm.id);
  assert.equal(failed?.state, 'FAILED');
  assert.equal(failed?.error, 'seen running');
});
