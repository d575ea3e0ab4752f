/**
 * Placement of a launch with a real microVM: two Cocoon server processes on one PostgreSQL
 * (sharing one data directory, as lease-race.test.ts does, so both see the image). Host B,
 * which receives `POST /microvms`, offers less memory than the image needs
 * (COCOON_HOST_MEMORY_MIB), so the launch is forwarded to host A, which runs it: the row is A's,
 * one QEMU runs it, and the app inside answers through B's gateway (forwarded to A's).
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, test } from 'node:test';
import { getMicrovm } from '../../src/store/microvms.ts';
import { openMetadataStore } from '../../src/store/open.ts';
import { findTenantByName } from '../../src/store/tenants.ts';
import { ADMIN_KEY_FILE } from '../../src/server.ts';
import { createTestImage, TESTAPP_PORT } from '../support/image.ts';
import { useClusterDatabase } from '../support/cluster.ts';
import { apiClient, gatewayRequest } from '../support/server.ts';
import { cleanupDir, qemuProcessesMentioning, tempDir } from '../support/vm.ts';
import { quiet } from '../store/helpers.ts';

const dataDir = tempDir('cocoon-place-vm-');
// Daemons and the store handle end before PostgreSQL; then no QEMU may be left.
const cluster = useClusterDatabase();
after(() => {
  const leaked = cleanupDir(dataDir);
  assert.deepEqual(leaked, [], 'QEMU processes left behind');
});

test('a launch sent to a host without room runs on the other host and answers through the receiving host\'s gateway', async () => {
  const databaseUrl = await cluster.createDatabase('placevm');
  const env = (host: string, extra: Record<string, string> = {}) => ({ COCOON_DATABASE_URL: databaseUrl, COCOON_HOST_ID: host, COCOON_LOG_LEVEL: 'warn', ...extra });
  const a = await cluster.daemon(dataDir, env('host-a'));
  const b = await cluster.daemon(dataDir, env('host-b', { COCOON_HOST_MEMORY_MIB: '64' }));
  const db = (await openMetadataStore(dataDir, { databaseUrl, logger: quiet })).db;
  cluster.onEnd(() => db.close());
  const adminKey = fs.readFileSync(path.join(dataDir, ADMIN_KEY_FILE), 'utf8').trim();
  const admin = await findTenantByName(db, 'admin');
  const image = await createTestImage({ db, dataDir, tenantId: admin!.id });
  assert.ok(image.memoryMiB > 64, 'the image needs more memory than host B offers');

  const started = await apiClient(b.info.apiUrl, adminKey)('POST', '/microvms', { image: image.arn });
  assert.equal(started.status, 201, JSON.stringify(started.body));
  const { id, token } = started.body as { id: string; token: string };
  const answer = await gatewayRequest(b.info.gatewayPort, id, token, '/count', { port: TESTAPP_PORT });
  assert.equal(answer.status, 200, answer.body);
  assert.equal(answer.body.trim(), '1');
  const row = await getMicrovm(db, id);
  assert.deepEqual([row?.state, row?.hostId], ['RUNNING', 'host-a']);
  assert.equal(qemuProcessesMentioning(id).length, 1, 'one VM runs it');
  assert.equal((await apiClient(b.info.apiUrl, adminKey)('DELETE', `/microvms/${id}`)).status < 300, true);
});
