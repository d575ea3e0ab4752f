/** Accelerator choice: explicit choices are honoured, `auto` probes KVM with a real guest boot. */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { test } from 'node:test';
import { isCocoonError } from '../../src/common/errors.ts';
import { loadGuestArtifacts } from '../../src/guest/artifacts.ts';
import { chooseAccelerator, parseAcceleratorChoice } from '../../src/vmm/qemu/accel.ts';

test('COCOON_ACCEL accepts auto, kvm and tcg, and refuses anything else', () => {
  assert.equal(parseAcceleratorChoice(undefined), 'auto');
  assert.equal(parseAcceleratorChoice('TCG'), 'tcg');
  assert.throws(() => parseAcceleratorChoice('hvf'), (error) => isCocoonError(error, 'invalid_config'));
});

test('tcg is taken as asked; auto boots a probe guest under KVM and falls back to TCG', async () => {
  const guest = loadGuestArtifacts();
  assert.equal(await chooseAccelerator('tcg', guest), 'tcg');
  const chosen = await chooseAccelerator('auto', guest);
  assert.ok(chosen === 'kvm' || chosen === 'tcg');
  if (!fs.existsSync('/dev/kvm')) assert.equal(chosen, 'tcg');
  // The probe leaves no process behind (npm test's leak check also looks for its temp dir).
  assert.equal(await chooseAccelerator('auto', guest), chosen, 'the probe result is kept');
});
