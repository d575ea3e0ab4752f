import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { isCocoonError } from '../../src/common/errors.ts';
import {
  InMemoryTokenStore,
  createTokenVerifier,
  generateToken,
  hashToken,
  issueToken,
  normalizeAllowedPorts,
  parseToken,
} from '../../src/gateway/tokens.ts';

test('generated tokens: format, ≥128-bit secret, only a hash is kept', () => {
  const seen = new Set<string>();
  for (let i = 0; i < 200; i++) {
    const g = generateToken();
    assert.match(g.token, /^cct_[0-9a-f]{16}_[A-Za-z0-9_-]{43}$/);
    assert.equal(Buffer.from(g.token.slice(21), 'base64url').length, 32, '256-bit secret');
    assert.equal(g.secretHash, hashToken(g.token));
    assert.match(g.secretHash, /^[0-9a-f]{64}$/);
    assert.ok(!g.secretHash.includes(g.token.slice(21)));
    assert.deepEqual(parseToken(g.token), { tokenId: g.tokenId });
    assert.ok(!seen.has(g.token));
    seen.add(g.token);
  }
});

test('parseToken rejects anything not exactly a token, and never throws', () => {
  const g = generateToken();
  for (const bad of ['', 'cct_', g.token + 'x', g.token.slice(1), g.token.toUpperCase(), ` ${g.token}`, g.token.replace('cct_', 'cct-'), 'cct_' + 'g'.repeat(16) + '_' + 'A'.repeat(43)]) {
    assert.equal(parseToken(bad), null, JSON.stringify(bad));
  }
  // Non-canonical base64url: the last character's unused low bits must be zero.
  const canonical = 'cct_0123456789abcdef_' + 'A'.repeat(42) + 'A';
  assert.notEqual(parseToken(canonical), null);
  assert.equal(parseToken('cct_0123456789abcdef_' + 'A'.repeat(42) + 'B'), null);
  fc.assert(
    fc.property(fc.string({ maxLength: 100 }), (s) => {
      const r = parseToken(s);
      return r === null || /^[0-9a-f]{16}$/.test(r.tokenId);
    }),
  );
});

test('issueToken validates expiry (1-60 min) and ports', async () => {
  const store = new InMemoryTokenStore();
  const now = new Date('2030-01-01T00:00:00Z');
  const t = await issueToken(store, { microvmId: 'vm1', now });
  assert.equal(t.expiresAt.getTime() - now.getTime(), 60 * 60_000, 'default 60 minutes');
  assert.equal(t.allowedPorts, 'all');
  const stored = store.get(t.id)!;
  assert.equal(stored.secretHash, hashToken(t.token));
  assert.ok(!JSON.stringify(stored).includes(t.token.slice(21)), 'the store never holds the secret');

  for (const expirationMinutes of [0, 61, 1.5, -1]) {
    await assert.rejects(issueToken(store, { microvmId: 'vm1', expirationMinutes }), (e) => isCocoonError(e, 'invalid_token_expiration') && e.status === 400);
  }
  for (const allowedPorts of [[], [0], [65536], [80.5]] as number[][]) {
    await assert.rejects(issueToken(store, { microvmId: 'vm1', allowedPorts }), (e) => isCocoonError(e, 'invalid_allowed_ports'));
  }
  assert.deepEqual(normalizeAllowedPorts([9000, 80, 80]), [80, 9000]);
});

test('verify: every failure reason, and details only for holders of the secret', async () => {
  const store = new InMemoryTokenStore();
  let clock = Date.parse('2030-01-01T00:00:00Z');
  const verifier = createTokenVerifier(store, { now: () => clock });
  const now = new Date(clock);
  const good = await issueToken(store, { microvmId: 'vm1', allowedPorts: [8080], expirationMinutes: 5, now });
  const revoked = await issueToken(store, { microvmId: 'vm1', now });
  store.revoke(revoked.id, now);

  const ok = await verifier.verify('vm1', good.token);
  assert.deepEqual(ok, { ok: true, tokenId: good.id, allowedPorts: [8080], expiresAt: good.expiresAt });
  assert.deepEqual(await verifier.verify('vm1', undefined), { ok: false, reason: 'missing' });
  assert.deepEqual(await verifier.verify('vm1', ''), { ok: false, reason: 'missing' });
  assert.deepEqual(await verifier.verify('vm1', 'Bearer x'), { ok: false, reason: 'malformed' });
  assert.deepEqual(await verifier.verify('vm1', generateToken().token), { ok: false, reason: 'unknown' });
  assert.deepEqual(await verifier.verify('vm2', good.token), { ok: false, reason: 'other_microvm' });
  assert.deepEqual(await verifier.verify('vm1', revoked.token), { ok: false, reason: 'revoked' });

  // Right id, wrong secret: "unknown", not "revoked"/"other_microvm"/"expired".
  const forged = `cct_${revoked.id}_${generateToken().token.slice(21)}`;
  assert.deepEqual(await verifier.verify('vm1', forged), { ok: false, reason: 'unknown' });
  assert.deepEqual(await verifier.verify('vm2', `cct_${good.id}_${generateToken().token.slice(21)}`), { ok: false, reason: 'unknown' });

  clock += 5 * 60_000 - 1;
  assert.equal((await verifier.verify('vm1', good.token)).ok, true, 'valid until the last millisecond');
  clock += 1;
  assert.deepEqual(await verifier.verify('vm1', good.token), { ok: false, reason: 'expired' });

  assert.equal(store.revokeAllForMicroVM('vm1', now), 1);
  assert.equal(store.deleteExpired(new Date(clock + 3600_000)), 2);
  assert.equal(store.size, 0);
});
