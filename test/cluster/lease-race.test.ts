/**
 * Two hosts racing to wake one SUSPENDED microVM (issue 15, "exactly one runs it"): three
 * Cocoon server processes on one PostgreSQL. Host A launches a microVM and suspends it, then
 * is SIGKILLed; B or C declares it dead (its SUSPENDED microVM becomes ownerless), then B and C
 * are asked to resume it at the same moment. Exactly one acquires the lease and runs it, with
 * its memory as it was; the other answers `microvm_on_other_host` naming the winner.
 *
 * The hosts share one data directory (each its own host id, ports and database connections):
 * until snapshots live in S3 (cluster-s3), that is how B and C both see the microVM's files on
 * one machine. It is safe here because all three start before any VM exists (a start-up sweeps
 * QEMUs it does not know under the directory) and no host is restarted.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, test } from 'node:test';
import { getHost } from '../../src/store/hosts.ts';
import { getMicrovm } from '../../src/store/microvms.ts';
import { openMetadataStore } from '../../src/store/open.ts';
import { findTenantByName } from '../../src/store/tenants.ts';
import { ADMIN_KEY_FILE } from '../../src/server.ts';
import { createTestImage, TESTAPP_PORT } from '../support/image.ts';
import { useClusterDatabase } from '../support/cluster.ts';
import { apiClient, gatewayRequest } from '../support/server.ts';
import { cleanupDir, qemuProcessesMentioning, tempDir } from '../support/vm.ts';
import { quiet } from '../store/helpers.ts';

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

const dataDir = tempDir('cocoon-race-');
// Daemons and the store handle end before PostgreSQL; then no QEMU may be left.
const cluster = useClusterDatabase();
after(() => {
  const leaked = cleanupDir(dataDir);
  assert.deepEqual(leaked, [], 'QEMU processes left behind');
});

test('three hosts, one dead: two race to resume its SUSPENDED microVM, exactly one runs it', async () => {
  const databaseUrl = await cluster.createDatabase('race');
  const env = (host: string) => ({
    COCOON_DATABASE_URL: databaseUrl, COCOON_HOST_ID: host, COCOON_HEARTBEAT_INTERVAL: '1', COCOON_HOST_DEAD_AFTER: '3', COCOON_LOG_LEVEL: 'warn',
  });
  const a = await cluster.daemon(dataDir, env('host-a'));
  const [b, c] = await Promise.all([cluster.daemon(dataDir, env('host-b')), cluster.daemon(dataDir, env('host-c'))]);
  const db = (await openMetadataStore(dataDir, { databaseUrl, logger: quiet })).db;
  cluster.onEnd(() => db.close());
  const adminKey = fs.readFileSync(path.join(dataDir, ADMIN_KEY_FILE), 'utf8').trim();
  const admin = await findTenantByName(db, 'admin');
  const image = await createTestImage({ db, dataDir, tenantId: admin!.id });
  const api = { a: apiClient(a.info.apiUrl, adminKey), b: apiClient(b.info.apiUrl, adminKey), c: apiClient(c.info.apiUrl, adminKey) };

  // Launched through A (the receiving host takes the lease), a counter in its memory, suspended.
  const started = await api.a('POST', '/microvms', { image: image.arn, idlePolicy: { maxIdleDurationSeconds: 3600 } });
  assert.equal(started.status, 201, JSON.stringify(started.body));
  const { id, token } = started.body as { id: string; token: string };
  const count = async (gatewayPort: number) => {
    const answer = await gatewayRequest(gatewayPort, id, token, '/count', { port: TESTAPP_PORT });
    assert.equal(answer.status, 200, answer.body);
    return answer.body.trim();
  };
  assert.equal(await count(a.info.gatewayPort), '1');
  assert.equal((await getMicrovm(db, id))?.hostId, 'host-a');
  const suspended = await api.a('POST', `/microvms/${id}/suspend`);
  assert.equal(suspended.body?.state, 'SUSPENDED', JSON.stringify(suspended.body));
  const epochBefore = (await getMicrovm(db, id))!.leaseEpoch;

  // Another host asked while A lives: A owns it, so B forwards the request to A (src/cluster/
  // api-forwarding.ts); B never runs it.
  const early = await api.b('POST', `/microvms/${id}/resume`);
  assert.equal(early.status, 200, JSON.stringify(early.body));
  assert.deepEqual([(await getMicrovm(db, id))?.state, (await getMicrovm(db, id))?.hostId], ['RUNNING', 'host-a']);
  assert.equal((await getMicrovm(db, id))?.leaseEpoch, epochBefore, 'the owner resumed it: no change of owner');
  assert.equal((await api.b('POST', `/microvms/${id}/suspend`)).body?.state, 'SUSPENDED');

  // A dies; within the dead-after bound (3 s, and its sweeper's own 3 s) B or C declares it dead.
  await a.kill();
  for (let i = 0; i < 300 && (await getHost(db, 'host-a'))?.state !== 'DEAD'; i++) await sleep(100);
  assert.equal((await getHost(db, 'host-a'))?.state, 'DEAD');
  const orphan = await getMicrovm(db, id);
  assert.deepEqual([orphan?.state, orphan?.hostId], ['SUSPENDED', null]);
  assert.equal(orphan?.leaseEpoch, epochBefore + 1);

  // B and C at the same moment.
  const [viaB, viaC] = await Promise.all([api.b('POST', `/microvms/${id}/resume`), api.c('POST', `/microvms/${id}/resume`)]);
  const answers = { 'host-b': viaB, 'host-c': viaC };
  const running = await getMicrovm(db, id);
  const winner = running?.hostId as 'host-b' | 'host-c';
  assert.ok(winner === 'host-b' || winner === 'host-c', `B or C runs it, not ${winner}`);
  assert.equal(running?.state, 'RUNNING');
  assert.equal(answers[winner].status, 200, JSON.stringify(answers[winner].body));
  // The loser lost the lease race: it answers microvm_on_other_host naming the winner (or, once
  // it forwards such an answer, the winner's 200); it never starts a VM.
  const loser = answers[winner === 'host-b' ? 'host-c' : 'host-b'];
  if (loser.status !== 200) {
    assert.equal(loser.status, 409, JSON.stringify(loser.body));
    assert.equal(loser.body?.error?.code, 'microvm_on_other_host');
    assert.match(loser.body.error.message, new RegExp(winner));
  }
  assert.equal(running?.leaseEpoch, epochBefore + 2, 'one take-over, one epoch');
  assert.equal(qemuProcessesMentioning(id).length, 1, 'one VM runs it');
  // Its memory as it was: the counter goes on, through the winner's gateway.
  assert.equal(await count((winner === 'host-b' ? b : c).info.gatewayPort), '2');
});
