import assert from 'node:assert/strict';
import { test } from 'node:test';
import { isCocoonError } from '../../src/common/errors.ts';
import { loadConfig } from '../../src/config/config.ts';
import { openMetadataStore } from '../../src/store/open.ts';
import { quiet, tempDataDir } from './helpers.ts';

test('COCOON_DATABASE_URL picks the database: unset is SQLite, anything but postgres:// is refused', async (t) => {
  assert.equal(loadConfig({}).databaseUrl, undefined);
  assert.equal(loadConfig({ COCOON_DATABASE_URL: '' }).databaseUrl, undefined);
  assert.equal(loadConfig({ COCOON_DATABASE_URL: 'postgres://h/db' }).databaseUrl, 'postgres://h/db');
  const dir = await tempDataDir(t);
  for (const url of ['mysql://u:secret@h/db', 'sqlite:///tmp/x.db', 'cocoon.db']) {
    await assert.rejects(
      openMetadataStore(dir, { logger: quiet, databaseUrl: url }),
      (e) => isCocoonError(e, 'invalid_config') && /COCOON_DATABASE_URL/.test(e.message) && !e.message.includes('secret'),
    );
  }
});

test('an unreachable PostgreSQL is a clear error that does not print the password', async (t) => {
  const dir = await tempDataDir(t);
  await assert.rejects(
    openMetadataStore(dir, { logger: quiet, databaseUrl: `postgres://cocoon:hunter2@localhost:5432/db?host=${encodeURIComponent(dir)}` }),
    (e) => isCocoonError(e, 'database_unavailable') && e.status === 503 && !e.message.includes('hunter2') && /COCOON_DATABASE_URL/.test(e.message),
  );
});
