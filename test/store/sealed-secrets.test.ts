import assert from 'node:assert/strict';
import { readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { createApiKey, findApiKeyForSigning, revokeApiKey } from '../../src/store/api-keys.ts';
import { SEAL_KEY_FILE, sealerForDataDir, sealerFromKey } from '../../src/store/sealed-secrets.ts';
import { createTenant } from '../../src/store/tenants.ts';
import { tempDataDir, tempDb } from './helpers.ts';

test('sealer: round trip, bound to its context, tamper and garbage refused', () => {
  const sealer = sealerFromKey(Buffer.alloc(32, 7));
  const sealed = sealer.seal('cocoon_ak_secret', 'ak-1');
  assert.match(sealed, /^v1\.[A-Za-z0-9_-]{16}\.[A-Za-z0-9_-]+$/);
  assert.ok(!sealed.includes('secret'));
  assert.notEqual(sealer.seal('cocoon_ak_secret', 'ak-1'), sealed, 'a fresh nonce every time');
  assert.equal(sealer.unseal(sealed, 'ak-1'), 'cocoon_ak_secret');
  assert.equal(sealer.unseal(sealed, 'ak-2'), undefined, 'moved to another key id');
  assert.equal(sealerFromKey(Buffer.alloc(32, 8)).unseal(sealed, 'ak-1'), undefined, 'another key file');
  const [v, nonce, body] = sealed.split('.') as [string, string, string];
  const flipped = body.slice(0, 2) + (body[2] === 'A' ? 'B' : 'A') + body.slice(3);
  for (const bad of [`${v}.${nonce}.${flipped}`, `v2.${nonce}.${body}`, `${v}.${nonce}`, `${sealed}.x`, '', 'x'.repeat(5000), `${v}.AAAA.${body}`]) {
    assert.equal(sealer.unseal(bad, 'ak-1'), undefined, bad.slice(0, 40));
  }
  assert.throws(() => sealerFromKey(Buffer.alloc(16)));
});

test('sealer of a data dir: one 0600 key file, made once, kept across processes', async (t) => {
  const dir = await tempDataDir(t);
  const sealer = sealerForDataDir(dir);
  const file = join(dir, SEAL_KEY_FILE);
  assert.equal((await stat(file)).mode & 0o777, 0o600);
  const key = await readFile(file, 'utf8');
  const sealed = sealer.seal('s', 'c');
  // A fresh reader of the same file (another process) opens it.
  assert.equal(sealerFromKey(Buffer.from(key.trim(), 'base64')).unseal(sealed, 'c'), 's');
  assert.equal(sealerForDataDir(dir), sealer);
  const other = await tempDataDir(t);
  await writeFile(join(other, SEAL_KEY_FILE), 'short\n', { mode: 0o600 });
  assert.throws(() => sealerForDataDir(other), /does not hold a 32-byte/);
});

test('API keys made with a sealer can be found for signing; the plain secret is not stored', async (t) => {
  const { db, dir } = await tempDb(t);
  const sealer = sealerForDataDir(dir);
  const tenant = await createTenant(db, { name: 'signer' });
  const { apiKey, secret } = await createApiKey(db, tenant.id, { name: 'aws', sealer });
  const found = await findApiKeyForSigning(db, apiKey.id);
  assert.equal(found?.tenant.id, tenant.id);
  assert.equal(sealer.unseal(found!.sealedSecret!, apiKey.id), secret);
  const files = await Promise.all([readFile(db.path), readFile(`${db.path}-wal`).catch(() => Buffer.alloc(0))]);
  assert.ok(!Buffer.concat(files).includes(secret.slice(10)));

  const { apiKey: plain } = await createApiKey(db, tenant.id);
  assert.equal((await findApiKeyForSigning(db, plain.id))?.sealedSecret, null, 'made without a sealer: cannot sign');
  assert.equal(await findApiKeyForSigning(db, 'ak-unknown'), undefined);
  assert.equal(await findApiKeyForSigning(db, 'x'.repeat(500)), undefined);
  await revokeApiKey(db, tenant.id, apiKey.id);
  assert.equal(await findApiKeyForSigning(db, apiKey.id), undefined, 'revoked');
});
