/**
 * Authentication between hosts (src/cluster/peer-auth.ts) and which API requests go to the
 * owner host (src/cluster/api-forwarding.ts `microvmOfRequest`), and the shared secret they use
 * (src/store/cluster-secrets.ts). Pure, fast: no server, no QEMU.
 */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { microvmOfRequest } from '../../src/cluster/api-forwarding.ts';
import { PeerAuth } from '../../src/cluster/peer-auth.ts';
import { ensureClusterSecret, PEER_HMAC_SECRET } from '../../src/store/cluster-secrets.ts';
import { tempDb } from '../store/helpers.ts';

const SECRET = 'k'.repeat(43);
const CLAIMS = { clientIp: '203.0.113.7', proto: 'https' } as const;

function pair(now: { ms: number }, secret = SECRET): { a: PeerAuth; b: PeerAuth } {
  return {
    a: new PeerAuth({ hostId: 'host-a', secret, now: () => now.ms }),
    b: new PeerAuth({ hostId: 'host-b', secret, now: () => now.ms }),
  };
}

describe('peer auth', () => {
  test('a header signed by A for B verifies on B once, with the client address and protocol', () => {
    const now = { ms: 1_800_000_000_000 };
    const { a, b } = pair(now);
    const header = a.sign('GET', '/x?y=1', 'host-b', CLAIMS);
    assert.deepEqual(b.verify('GET', '/x?y=1', header), { ok: true, fromHostId: 'host-a', ...CLAIMS });
    assert.deepEqual(b.verify('GET', '/x?y=1', header), { ok: false, reason: 'replayed' });
  });

  test('missing, malformed, repeated and oversized headers are refused', () => {
    const { b } = pair({ ms: Date.now() });
    assert.deepEqual(b.verify('GET', '/', undefined), { ok: false, reason: 'missing' });
    for (const bad of ['', 'v1', 'v2;h=host-a', 'x'.repeat(5000), `v1;h=host-a;t=1;n=${'a'.repeat(22)};c=1.2.3.4;p=http;s=${'a'.repeat(43)};extra=1`]) {
      assert.equal(b.verify('GET', '/', bad).ok, false, bad.slice(0, 40));
    }
    const { a } = pair({ ms: Date.now() });
    const header = a.sign('GET', '/', 'host-b', CLAIMS);
    assert.deepEqual(b.verify('GET', '/', [header, header]), { ok: false, reason: 'malformed' });
  });

  test('tampered: another method, target, client address, signer or signature does not verify', () => {
    const now = { ms: 1_800_000_000_000 };
    const { a, b } = pair(now);
    const header = a.sign('POST', '/api/v1/microvms/x/suspend', 'host-b', CLAIMS);
    assert.equal(b.verify('DELETE', '/api/v1/microvms/x/suspend', header).ok, false);
    assert.equal(b.verify('POST', '/api/v1/microvms/y/suspend', header).ok, false);
    assert.deepEqual(b.verify('POST', '/api/v1/microvms/x/suspend', header.replace('c=203.0.113.7', 'c=127.0.0.1')), { ok: false, reason: 'bad_signature' });
    assert.deepEqual(b.verify('POST', '/api/v1/microvms/x/suspend', header.replace('h=host-a', 'h=host-c')), { ok: false, reason: 'bad_signature' });
    const s = header.slice(header.indexOf(';s=') + 3);
    const flipped = header.slice(0, header.length - s.length) + (s[0] === 'A' ? 'B' : 'A') + s.slice(1);
    assert.deepEqual(b.verify('POST', '/api/v1/microvms/x/suspend', flipped), { ok: false, reason: 'bad_signature' });
    // Signed with another cluster's key.
    const other = new PeerAuth({ hostId: 'host-a', secret: 'z'.repeat(43), now: () => now.ms });
    assert.deepEqual(b.verify('GET', '/', other.sign('GET', '/', 'host-b', CLAIMS)), { ok: false, reason: 'bad_signature' });
    // The untampered one still works (failures do not use up its nonce).
    assert.equal(b.verify('POST', '/api/v1/microvms/x/suspend', header).ok, true);
  });

  test('a header is bound to the host it was signed for: replaying it at a third host fails', () => {
    const now = { ms: 1_800_000_000_000 };
    const { a } = pair(now);
    const c = new PeerAuth({ hostId: 'host-c', secret: SECRET, now: () => now.ms });
    assert.deepEqual(c.verify('GET', '/', a.sign('GET', '/', 'host-b', CLAIMS)), { ok: false, reason: 'bad_signature' });
  });

  test('expired: outside the time window either way', () => {
    const now = { ms: 1_800_000_000_000 };
    const { a, b } = pair(now);
    const old = a.sign('GET', '/', 'host-b', CLAIMS);
    now.ms += 15_001;
    assert.deepEqual(b.verify('GET', '/', old), { ok: false, reason: 'expired' });
    const future = a.sign('GET', '/', 'host-b', CLAIMS);
    now.ms -= 30_002;
    assert.deepEqual(b.verify('GET', '/', future), { ok: false, reason: 'expired' });
  });

  test('the nonce memory is bounded: full → busy, and it forgets nonces once their window passed', () => {
    const now = { ms: 1_800_000_000_000 };
    const a = new PeerAuth({ hostId: 'host-a', secret: SECRET, now: () => now.ms });
    const b = new PeerAuth({ hostId: 'host-b', secret: SECRET, now: () => now.ms, maxNonces: 3 });
    for (let i = 0; i < 3; i++) assert.equal(b.verify('GET', '/', a.sign('GET', '/', 'host-b', CLAIMS)).ok, true);
    assert.deepEqual(b.verify('GET', '/', a.sign('GET', '/', 'host-b', CLAIMS)), { ok: false, reason: 'busy' });
    now.ms += 16_000;
    assert.equal(b.verify('GET', '/', a.sign('GET', '/', 'host-b', CLAIMS)).ok, true);
  });

  test('a short secret is refused', () => {
    assert.throws(() => new PeerAuth({ hostId: 'h', secret: 'short' }));
  });
});

describe('which API requests go to the owner', () => {
  const id = 'mvm-01jdq8x0000000000000000000';
  test('operations below a microVM, and its DELETE, in the three APIs', () => {
    for (const [method, url] of [
      ['POST', `/api/v1/microvms/${id}/suspend`],
      ['POST', `/api/v1/microvms/${id}/exec`],
      ['GET', `/api/v1/microvms/${id}/files?path=/etc/hostname`],
      ['GET', `/api/v1/microvms/${id}/exec/ws`],
      ['DELETE', `/api/v1/microvms/${id}`],
      ['POST', `/e2b/sandboxes/${id}/pause`],
      ['DELETE', `/e2b/sandboxes/${id}`],
      ['POST', `/2025-09-09/microvms/${id}/suspend`],
      ['DELETE', `/2025-09-09/microvms/${encodeURIComponent(`arn:cocoon:local-1:123456789012:microvm/${id}`)}`],
    ] as const) {
      assert.equal(microvmOfRequest(method, url), id, `${method} ${url}`);
    }
  });
  test('reads of the row, lists, other resources and junk stay here', () => {
    for (const [method, url] of [
      ['GET', `/api/v1/microvms/${id}`],
      ['GET', '/api/v1/microvms'],
      ['POST', '/api/v1/microvms'],
      ['GET', `/e2b/sandboxes/${id}`],
      ['POST', '/api/v1/images/img-01jdq8x0000000000000000000/x'],
      ['POST', '/api/v1/microvms/not-an-id/suspend'],
      ['POST', '/api/v1/microvms/%E0%A4%A/suspend'],
    ] as const) {
      assert.equal(microvmOfRequest(method, url), undefined, `${method} ${url}`);
    }
  });
});

describe('cluster secrets', () => {
  test('made once: every caller gets the first value', async (t) => {
    const { db } = await tempDb(t);
    const values = await Promise.all([1, 2, 3].map(() => ensureClusterSecret(db, PEER_HMAC_SECRET)));
    assert.equal(new Set(values).size, 1);
    assert.match(values[0]!, /^[A-Za-z0-9_-]{43}$/);
    assert.equal(await ensureClusterSecret(db, PEER_HMAC_SECRET), values[0]);
    assert.notEqual(await ensureClusterSecret(db, 'other'), values[0]);
  });
});
