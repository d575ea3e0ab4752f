/**
 * Tokens restricted to ports and port ranges (AWS's PortSpecification: port, range, allPorts):
 * stored normalized, checked by `checkToken`, and answered by the gateway's verifier.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { createTokenVerifier } from '../../src/gateway/tokens.ts';
import { portIsAllowed } from '../../src/gateway/types.ts';
import { createMicrovm } from '../../src/store/microvms.ts';
import { checkToken, createToken, normalizePortSpecs, portAllowed } from '../../src/store/tokens.ts';
import { readyImage, someTenant, tempDb } from './helpers.ts';

const POLICY = { autoResumeEnabled: true, maxIdleDurationSeconds: 300, suspendedDurationSeconds: null };

test('ports and ranges are stored normalized and admit exactly what they name', async (t) => {
  const { db } = await tempDb(t);
  const tenant = await someTenant(db);
  const image = await readyImage(db, tenant.id);
  const { microvm } = await createMicrovm(db, { tenantId: tenant.id, region: 'local', imageId: image.id, idlePolicy: POLICY, maximumDurationSeconds: 3600 });
  const { token, secret } = await createToken(db, {
    microvmId: microvm.id,
    tenantId: tenant.id,
    allowedPorts: [{ from: 9000, to: 9010 }, 8080, 8080, { from: 9000, to: 9010 }, { from: 3000, to: 3000 }],
  });
  assert.deepEqual(token.allowedPorts, [8080, { from: 3000, to: 3000 }, { from: 9000, to: 9010 }]);
  for (const [port, verdict] of [[8080, 'ok'], [3000, 'ok'], [9000, 'ok'], [9005, 'ok'], [9010, 'ok'], [8999, 'port_not_allowed'], [9011, 'port_not_allowed'], [8081, 'port_not_allowed']] as const) {
    assert.equal(checkToken(token, { microvmId: microvm.id, port }), verdict, `port ${port}`);
  }
  const verified = await createTokenVerifier(db).verify(microvm.id, secret);
  assert.ok(verified.ok);
  assert.deepEqual(verified.allowedPorts, [8080, { from: 3000, to: 3000 }, { from: 9000, to: 9010 }]);
  assert.equal(portIsAllowed(verified.allowedPorts, 9003), true);
  assert.equal(portIsAllowed(verified.allowedPorts, 9011), false);
  assert.equal(portIsAllowed('all', 1), true);

  const all = await createToken(db, { microvmId: microvm.id, tenantId: tenant.id, allowedPorts: null });
  assert.equal(all.token.allowedPorts, null, 'null: every port (AWS allPorts)');
  assert.equal(portAllowed(null, 65535), true);
});

test('malformed port specifications are refused', () => {
  for (const bad of [[], [0], [65536], [1.5], ['80'], [{ from: 10, to: 9 }], [{ from: 1 }], [{ from: 1, to: 2, x: 3 }], [null], Array(65).fill(80)]) {
    assert.throws(() => normalizePortSpecs(bad), (e: any) => e.code === 'invalid_request', JSON.stringify(bad));
  }
});
