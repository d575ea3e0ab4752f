/**
 * PhaseClock (src/vmm/phases.ts): the records the benchmarks print add up to the whole they
 * measure, also when a step brings phases of its own (a VM's restore inside a lifecycle resume).
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { PhaseClock } from '../../src/vmm/phases.ts';

function busy(ms: number): void {
  const end = performance.now() + ms;
  while (performance.now() < end);
}

test('markParts charges a step its own phases under a prefix, and what they leave out as the rest; the record adds up', () => {
  const started = performance.now();
  const clock = new PhaseClock();
  busy(5);
  clock.mark('before');
  busy(20);
  // The step measured 4 + 6 ms of its ~20 ms itself.
  clock.markParts({ spawn: 4, load: 6 }, 'vm_', 'step_rest');
  busy(3);
  clock.mark('after');
  const whole = performance.now() - started;

  assert.deepEqual(Object.keys(clock.phases), ['before', 'vm_spawn', 'vm_load', 'step_rest', 'after']);
  assert.equal(clock.phases['vm_spawn'], 4);
  assert.equal(clock.phases['vm_load'], 6);
  assert.ok(clock.phases['step_rest']! >= 10, `the rest of the step: ${clock.phases['step_rest']}`);
  const sum = Object.values(clock.phases).reduce((a, b) => a + b, 0);
  assert.ok(sum <= whole && sum > whole - 1, `phases ${sum} ms, whole ${whole} ms`);
});

test('markParts without parts (a VM adopted, no record) charges the whole step to the rest; parts longer than the step never make it negative', () => {
  const clock = new PhaseClock();
  busy(2);
  clock.markParts(undefined, 'vm_', 'restore_rest');
  assert.ok(clock.phases['restore_rest']! >= 2);
  clock.markParts({ spawn: 1000 }, 'vm_', 'restore_rest2');
  assert.equal(clock.phases['restore_rest2'], 0);
});
