/**
 * Tokens as the gateway sees them: the one implementation (src/store/tokens.ts, SQL-backed,
 * hash only, constant-time) behind the gateway's TokenVerifier.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { createTokenVerifier, hashToken, parseToken } from '../../src/gateway/tokens.ts';
import { createMicrovm } from '../../src/store/microvms.ts';
import { createToken, revokeToken } from '../../src/store/tokens.ts';
import { readyImage, someTenant, tempDb } from '../store/helpers.ts';

const POLICY = { autoResumeEnabled: true, maxIdleDurationSeconds: 300, suspendedDurationSeconds: null };
const SECRET_AT = 'cocoon_tk_'.length + 26 + 1;

async function setup(t: Parameters<typeof tempDb>[0]) {
  const { db } = await tempDb(t);
  const tenant = await someTenant(db);
  const image = await readyImage(db, tenant.id);
  const start = { tenantId: tenant.id, region: 'local', imageId: image.id, idlePolicy: POLICY, maximumDurationSeconds: 3600 };
  const vm1 = (await createMicrovm(db, start)).microvm.id;
  const vm2 = (await createMicrovm(db, start)).microvm.id;
  const issue = async (microvmId: string, opts: { allowedPorts?: number[]; expirationMinutes?: number; now?: Date } = {}) => {
    const { token, secret } = await createToken(db, { microvmId, tenantId: tenant.id, ...opts });
    return { id: token.id, token: secret, expiresAt: new Date(token.expiresAt) };
  };
  return { db, vm1, vm2, issue };
}

/** Another well-formed secret (43 base64url characters, canonical). */
function otherSecret(): string {
  return Buffer.from(crypto.getRandomValues(new Uint8Array(32))).toString('base64url');
}

test('issued tokens: format, ≥128-bit secret, only a hash is kept', async (t) => {
  const { db, vm1, issue } = await setup(t);
  const seen = new Set<string>();
  for (let i = 0; i < 50; i++) {
    const { id, token } = await issue(vm1);
    assert.match(token, /^cocoon_tk_[0-9a-z]{26}_[A-Za-z0-9_-]{43}$/);
    assert.equal(Buffer.from(token.slice(SECRET_AT), 'base64url').length, 32, '256-bit secret');
    assert.equal(parseToken(token), id);
    assert.ok(!seen.has(token));
    seen.add(token);
    const row = await db.get<Record<string, unknown>>('SELECT * FROM tokens WHERE id = ?', [id]);
    assert.equal(row?.token_hash, hashToken(token));
    assert.ok(!JSON.stringify(row).includes(token.slice(SECRET_AT)), 'the store never holds the secret');
  }
});

test('parseToken rejects anything not exactly a token, and never throws', () => {
  const good = `cocoon_tk_${'0'.repeat(26)}_${'A'.repeat(43)}`;
  assert.equal(parseToken(good), `tok-${'0'.repeat(26)}`);
  for (const bad of ['', 'cocoon_tk_', good + 'x', good.slice(1), good.toUpperCase(), ` ${good}`, good.replace('cocoon_tk_', 'cocoon-tk-'),
    `cocoon_tk_${'u'.repeat(26)}_${'A'.repeat(43)}`, `cct_0123456789abcdef_${'A'.repeat(43)}`]) {
    assert.equal(parseToken(bad), undefined, JSON.stringify(bad));
  }
  // Non-canonical base64url: the last character's unused low bits must be zero.
  assert.equal(parseToken(`cocoon_tk_${'0'.repeat(26)}_${'A'.repeat(42)}B`), undefined);
  fc.assert(
    fc.property(fc.string({ maxLength: 100 }), (s) => {
      const r = parseToken(s);
      return r === undefined || /^tok-[0-9a-z]{26}$/.test(r);
    }),
  );
});

test('verify: every failure reason, and details only for holders of the secret', async (t) => {
  const { db, vm1, vm2, issue } = await setup(t);
  let clock = Date.now();
  const verifier = createTokenVerifier(db, { now: () => clock });
  const good = await issue(vm1, { allowedPorts: [8080], expirationMinutes: 5, now: new Date(clock) });
  const revoked = await issue(vm1);
  assert.equal(await revokeToken(db, vm1, revoked.id), true);

  assert.deepEqual(await verifier.verify(vm1, good.token), { ok: true, tokenId: good.id, allowedPorts: [8080], expiresAt: good.expiresAt, scope: 'http' });
  const all = await verifier.verify(vm1, (await issue(vm1)).token);
  assert.equal(all.ok && all.allowedPorts, 'all');
  assert.deepEqual(await verifier.verify(vm1, undefined), { ok: false, reason: 'missing' });
  assert.deepEqual(await verifier.verify(vm1, ''), { ok: false, reason: 'missing' });
  assert.deepEqual(await verifier.verify(vm1, 'Bearer x'), { ok: false, reason: 'malformed' });
  assert.deepEqual(await verifier.verify(vm1, `cocoon_tk_${'0'.repeat(26)}_${otherSecret()}`), { ok: false, reason: 'unknown' });
  assert.deepEqual(await verifier.verify(vm2, good.token), { ok: false, reason: 'other_microvm' });
  assert.deepEqual(await verifier.verify(vm1, revoked.token), { ok: false, reason: 'revoked' });

  // Right id, wrong secret: "unknown", not "revoked"/"other_microvm"/"expired".
  assert.deepEqual(await verifier.verify(vm1, revoked.token.slice(0, SECRET_AT) + otherSecret()), { ok: false, reason: 'unknown' });
  assert.deepEqual(await verifier.verify(vm2, good.token.slice(0, SECRET_AT) + otherSecret()), { ok: false, reason: 'unknown' });

  clock = good.expiresAt.getTime() - 1;
  assert.equal((await verifier.verify(vm1, good.token)).ok, true, 'valid until the last millisecond');
  clock += 1;
  assert.deepEqual(await verifier.verify(vm1, good.token), { ok: false, reason: 'expired' });
});

test('remembered tokens (SQLite): the store is read once per token, a revocation is effective at the next request, every refusal stays', async (t) => {
  const { db, vm1, vm2, issue } = await setup(t);
  // The real database, with its reads counted.
  let reads = 0;
  const counted = new Proxy(db, {
    get(target, name, receiver) {
      if (name === 'get') return (...args: Parameters<typeof db.get>) => (reads++, target.get(...args));
      const value = Reflect.get(target, name, receiver);
      return typeof value === 'function' ? value.bind(target) : value;
    },
  });
  let clock = Date.now();
  const verifier = createTokenVerifier(counted, { now: () => clock });
  const a = await issue(vm1, { expirationMinutes: 5, now: new Date(clock) });
  const b = await issue(vm1);

  const first = await verifier.verify(vm1, a.token);
  assert.equal(first.ok, true);
  assert.equal(reads, 1);
  const again = verifier.verify(vm1, a.token);
  assert.ok(!(again instanceof Promise), 'a remembered token is answered at once');
  assert.deepEqual(again, first);
  assert.equal(reads, 1, 'remembered: no database read');
  assert.deepEqual(verifier.verify(vm2, a.token), { ok: false, reason: 'other_microvm' });
  assert.equal(reads, 1);

  // Its id with another secret is never taken for it: the store says unknown.
  assert.deepEqual(await verifier.verify(vm1, a.token.slice(0, SECRET_AT) + otherSecret()), { ok: false, reason: 'unknown' });
  assert.equal((await verifier.verify(vm1, a.token)).ok, true, 'and the right one is still accepted');

  // A revocation forgets every remembered verdict (the other token is read again); the revoked one is refused at once.
  assert.equal((await verifier.verify(vm1, b.token)).ok, true);
  assert.equal(await revokeToken(db, vm1, a.id), true);
  const readsBefore = reads;
  assert.deepEqual(await verifier.verify(vm1, a.token), { ok: false, reason: 'revoked' });
  assert.deepEqual(await verifier.verify(vm1, a.token), { ok: false, reason: 'revoked' }, 'a refusal is never remembered as an acceptance');
  assert.equal((await verifier.verify(vm1, b.token)).ok, true);
  assert.equal(reads, readsBefore + 3, 'after a revocation the store is asked again');

  // The expiry is checked on every request, remembered or not.
  const c = await issue(vm1, { expirationMinutes: 1, now: new Date(clock) });
  assert.equal((await verifier.verify(vm1, c.token)).ok, true);
  clock = c.expiresAt.getTime();
  assert.deepEqual(await verifier.verify(vm1, c.token), { ok: false, reason: 'expired' });

  // remember: false (the default on PostgreSQL, where other hosts revoke): every request reads the store.
  const unremembering = createTokenVerifier(counted, { now: () => clock, remember: false });
  const d = await issue(vm1);
  const readsNow = reads;
  await unremembering.verify(vm1, d.token);
  await unremembering.verify(vm1, d.token);
  assert.equal(reads, readsNow + 2);
});
