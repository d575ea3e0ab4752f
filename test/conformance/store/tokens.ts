import assert from 'node:assert/strict';
import { isCocoonError } from '../../../src/common/errors.ts';
import { createMicrovm, transitionMicrovm } from '../../../src/store/microvms.ts';
import {
  checkToken, createToken, deleteExpiredTokens, findTokenBySecret, listTokens, revokeToken,
} from '../../../src/store/tokens.ts';
import { readyImage, someTenant } from '../../store/helpers.ts';
import type { StoreSuite } from './suite.ts';

export default function define({ it, tempDb }: StoreSuite): void {
  const POLICY = { autoResumeEnabled: true, maxIdleDurationSeconds: 300, suspendedDurationSeconds: null };

  async function setup(t: Parameters<typeof tempDb>[0]) {
    const { db } = await tempDb(t);
    const tenant = await someTenant(db);
    const image = await readyImage(db, tenant.id);
    const start = { tenantId: tenant.id, region: 'local', imageId: image.id, idlePolicy: POLICY, maximumDurationSeconds: 3600 };
    const { microvm } = await createMicrovm(db, start);
    const { microvm: other } = await createMicrovm(db, start);
    return { db, tenant, microvm, other };
  }

  it('a token is found by its secret and admits only its microVM, ports and lifetime', async (t) => {
    const { db, tenant, microvm, other } = await setup(t);
    const now = new Date('2026-01-01T00:00:00.000Z');
    const { token, secret } = await createToken(db, { microvmId: microvm.id, tenantId: tenant.id, expirationMinutes: 15, allowedPorts: [8080, 3000, 8080], now });
    assert.match(secret, /^cocoon_tk_[0-9a-z]{26}_[A-Za-z0-9_-]{43}$/);
    assert.equal(secret.slice(10, 36), token.id.slice(4), 'the token names its id');
    assert.deepEqual(token.allowedPorts, [3000, 8080]);
    assert.equal(token.expiresAt, '2026-01-01T00:15:00.000Z');

    const found = await findTokenBySecret(db, secret);
    assert.deepEqual(found, token);
    const at = (minutes: number) => new Date(now.getTime() + minutes * 60_000);
    assert.equal(checkToken(token, { microvmId: microvm.id, port: 8080, now: at(1) }), 'ok');
    assert.equal(checkToken(token, { microvmId: microvm.id, port: 9999, now: at(1) }), 'port_not_allowed');
    assert.equal(checkToken(token, { microvmId: other.id, port: 8080, now: at(1) }), 'wrong_microvm');
    assert.equal(checkToken(token, { microvmId: microvm.id, port: 8080, now: at(15) }), 'expired');

    const forged = `${secret.slice(0, 37)}${'A'.repeat(42)}A`; // the right id, another secret
    for (const wrong of [undefined, '', 'cocoon_tk_x', secret.toUpperCase(), `${secret} `, 'y'.repeat(5000), forged, 42]) {
      assert.equal(await findTokenBySecret(db, wrong), undefined);
    }

    const all = await createToken(db, { microvmId: microvm.id, tenantId: tenant.id });
    assert.equal(all.token.allowedPorts, null);
    assert.equal(checkToken(all.token, { microvmId: microvm.id, port: 1234 }), 'ok');
    assert.deepEqual((await listTokens(db, microvm.id)).map((x) => x.id), [token.id, all.token.id]);
  });

  it('revocation takes effect at once and only for the right microVM', async (t) => {
    const { db, tenant, microvm, other } = await setup(t);
    const { token, secret } = await createToken(db, { microvmId: microvm.id, tenantId: tenant.id });
    assert.equal(await revokeToken(db, other.id, token.id), false);
    assert.equal(await revokeToken(db, microvm.id, token.id), true);
    assert.equal(await revokeToken(db, microvm.id, token.id), false);
    const found = await findTokenBySecret(db, secret);
    assert.equal(checkToken(found!, { microvmId: microvm.id, port: 8080 }), 'revoked');
  });

  it('token requests are validated; a terminated microVM gets none', async (t) => {
    const { db, tenant, microvm } = await setup(t);
    const bad = [{ expirationMinutes: 0 }, { expirationMinutes: 61 }, { expirationMinutes: 1.5 }, { allowedPorts: [] }, { allowedPorts: [0] }, { allowedPorts: [65536] }];
    for (const override of bad) {
      await assert.rejects(createToken(db, { microvmId: microvm.id, tenantId: tenant.id, ...override }), (e) => isCocoonError(e, 'invalid_request'), JSON.stringify(override));
    }
    const stranger = await someTenant(db);
    await assert.rejects(createToken(db, { microvmId: microvm.id, tenantId: stranger.id }), (e) => isCocoonError(e, 'microvm_not_found'));
    await transitionMicrovm(db, microvm.id, 'PENDING', 'TERMINATED');
    await assert.rejects(createToken(db, { microvmId: microvm.id, tenantId: tenant.id }), (e) => isCocoonError(e, 'microvm_terminated') && e.status === 409);
  });

  it('expired tokens can be swept', async (t) => {
    const { db, tenant, microvm } = await setup(t);
    const now = new Date('2026-01-01T00:00:00.000Z');
    await createToken(db, { microvmId: microvm.id, tenantId: tenant.id, expirationMinutes: 1, now });
    await createToken(db, { microvmId: microvm.id, tenantId: tenant.id, expirationMinutes: 60, now });
    assert.equal(await deleteExpiredTokens(db, new Date(now.getTime() + 5 * 60_000)), 1);
    assert.equal((await listTokens(db, microvm.id)).length, 1);
  });
}
