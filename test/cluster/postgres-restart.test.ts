/**
 * PostgreSQL restarted while microVMs run (issue 15's acceptance point), with real parts: a
 * private PostgreSQL, s3rver, one Cocoon server on them (API, gateway, the cluster module's
 * heartbeats) and real QEMU. Two microVMs RUNNING and one SUSPENDED; PostgreSQL is stopped with
 * a fast shutdown (every connection cut) for a few heartbeat intervals and started again on the
 * same socket. During the outage: the gateway keeps serving the running microVMs to tokens it
 * accepted before, the API answers 503 `database_unavailable` (and does not hang), the QEMUs run
 * on. After it: the API answers by itself again (new pool connections), heartbeats resume, the
 * host is still LIVE, no microVM is FAILED or rolled back, a suspend and a resume work, and the
 * guests' memory and files are intact. One test image (no image pipeline) for the file.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { loadConfig } from '../../src/config/config.ts';
import { ADMIN_KEY_FILE, startServer, type RunningServer } from '../../src/server.ts';
import { getHost } from '../../src/store/hosts.ts';
import { findTenantByName } from '../../src/store/tenants.ts';
import { clusterModule } from '../../src/wiring/cluster.ts';
import { microvmModule, type MicrovmModule } from '../../src/wiring/microvms.ts';
import { apiPort, execCall } from '../exec/helpers.ts';
import { startS3rver, type TestS3Server } from '../objectstore/s3rver-server.ts';
import { createTestImage } from '../support/image.ts';
import { PostgresServer } from '../support/postgres.ts';
import { apiClient, gatewayRequest, type ApiClient } from '../support/server.ts';
import { cleanupDir, tempDir } from '../support/vm.ts';

const SLOW = { timeout: 900_000 };
const BUCKET = 'cocoon-pg-restart';
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

describe('PostgreSQL restarted while microVMs run (PostgreSQL, s3rver, one Cocoon server; real QEMU)', () => {
  const dataDir = tempDir('cocoon-pgrestart-');
  const savedEnv = { ...process.env };
  let pg: PostgresServer | undefined;
  let s3: TestS3Server | undefined;
  let server: RunningServer | undefined;
  let microvms: MicrovmModule;
  let api: ApiClient;
  let key: string;
  let imageId: string;
  const ids: string[] = [];

  before(async () => {
    pg = await PostgresServer.start();
    const databaseUrl = await pg.createDatabase('pgrestart');
    s3 = await startS3rver([BUCKET]);
    Object.assign(process.env, {
      COCOON_S3_BUCKET: BUCKET, COCOON_S3_ENDPOINT: s3.endpoint, COCOON_S3_REGION: 'us-east-1',
      COCOON_S3_ACCESS_KEY_ID: s3.credentials.accessKeyId, COCOON_S3_SECRET_ACCESS_KEY: s3.credentials.secretAccessKey,
    });
    // Heartbeats every second, dead after 10 s: the outage below spans several heartbeats but
    // stays under the self-fencing bound (dead-after minus one interval).
    const config = loadConfig({ COCOON_DATA_DIR: dataDir, COCOON_DATABASE_URL: databaseUrl, COCOON_HEARTBEAT_INTERVAL: '1', COCOON_HOST_DEAD_AFTER: '10' });
    microvms = microvmModule();
    server = await startServer({ ...config, apiPort: 0, gatewayPort: 0 }, [microvms, clusterModule(microvms)]);
    key = fs.readFileSync(path.join(dataDir, ADMIN_KEY_FILE), 'utf8').trim();
    api = apiClient(server.apiUrl, key);
    const admin = await findTenantByName(server.db, 'admin');
    imageId = (await createTestImage({ db: server.db, dataDir, tenantId: admin!.id })).id;
  });
  after(async () => {
    for (const id of ids) await api?.('DELETE', `/microvms/${id}`).catch(() => undefined);
    try {
      await server?.close();
    } finally {
      const leaked = cleanupDir(dataDir);
      await s3?.stop().catch(() => undefined);
      await pg?.stop();
      for (const name of Object.keys(process.env)) if (!(name in savedEnv)) delete process.env[name];
      assert.deepEqual(leaked, [], 'no QEMU left');
    }
  });

  const state = async (id: string): Promise<string> => (await api('GET', `/microvms/${id}`)).body.state;
  const launch = async (): Promise<string> => {
    const created = await api('POST', '/microvms', { image: imageId, idlePolicy: { maxIdleDurationSeconds: 3600 } });
    assert.equal(created.status, 201, JSON.stringify(created.body));
    ids.push(created.body.id);
    for (let i = 0; i < 1800 && (await state(created.body.id)) !== 'RUNNING'; i++) await sleep(100);
    assert.equal(await state(created.body.id), 'RUNNING');
    return created.body.id;
  };
  const exec = async (id: string, command: string): Promise<string> => {
    const r = await execCall(apiPort(server!.apiUrl), key, id, { command });
    assert.equal(r.status, 200, JSON.stringify(r.error));
    assert.equal(r.exit?.exitCode, 0, `${command}: ${r.stderr}`);
    return r.stdout.trim();
  };
  /** A file in a RAM-only tmpfs (memory) and one on the disk, with a fresh random token each. */
  const writeState = async (id: string) => {
    await exec(id, 'mkdir -p /mnt/ram /data && mount -t tmpfs ram /mnt/ram && cat /proc/sys/kernel/random/uuid > /mnt/ram/token && cat /proc/sys/kernel/random/uuid > /data/on-disk && sync');
    return readState(id);
  };
  const readState = async (id: string) => ({ memory: await exec(id, 'cat /mnt/ram/token'), disk: await exec(id, 'cat /data/on-disk') });

  test('an outage of a few seconds: the gateway serves on, the API says database_unavailable; after it everything answers and nothing is lost', SLOW, async () => {
    const [a, b, c] = [await launch(), await launch(), await launch()];
    const stateOf = { [a]: await writeState(a), [b]: await writeState(b), [c]: await writeState(c) };
    const suspended = await api('POST', `/microvms/${c}/suspend`);
    assert.equal(suspended.status, 200, JSON.stringify(suspended.body));
    assert.equal(suspended.body.state, 'SUSPENDED');
    const token = async (id: string): Promise<string> => {
      const issued = await api('POST', `/microvms/${id}/tokens`, {});
      assert.equal(issued.status, 201, JSON.stringify(issued.body));
      return issued.body.token;
    };
    const tokens = { [a]: await token(a), [b]: await token(b), [c]: await token(c) };
    const gateway = (id: string) => gatewayRequest(microvms.gatewayPort, id, tokens[id], '/');
    for (const id of [a, b]) assert.equal((await gateway(id)).status, 200, 'served before the outage');
    const beatBefore = (await getHost(server!.db, microvms.engine.hostId))!.heartbeatAt;

    await pg!.halt();
    try {
      // The gateway answers for the running microVMs without the database (the token was
      // accepted before; the route is this host's own).
      for (const id of [a, b]) {
        const served = await gateway(id);
        assert.equal(served.status, 200, `gateway during the outage: ${served.body}`);
      }
      // The suspended one would have to be woken: that needs the database.
      const wake = await gateway(c);
      assert.equal(wake.status, 503, wake.body);
      assert.equal(JSON.parse(wake.body).error.code, 'database_unavailable');
      // The API: a 503 with the stable code, not a 500, not a hang.
      for (const [method, route] of [['GET', `/microvms/${a}`], ['POST', `/microvms/${b}/suspend`], ['GET', '/microvms']] as const) {
        const answer = await api(method, route);
        assert.equal(answer.status, 503, `${method} ${route}: ${JSON.stringify(answer.body)}`);
        assert.equal(answer.body.error.code, 'database_unavailable');
      }
      // Several heartbeat intervals with the database down.
      await sleep(3500);
      for (const id of [a, b]) assert.equal((await gateway(id)).status, 200, 'still served');
    } finally {
      await pg!.startAgain();
    }

    // The API answers again without anyone restarting anything.
    assert.equal((await api('GET', `/microvms/${a}`)).status, 200);
    let host = await getHost(server!.db, microvms.engine.hostId);
    for (let i = 0; i < 50 && !(host!.heartbeatAt > beatBefore); i++) {
      await sleep(200);
      host = await getHost(server!.db, microvms.engine.hostId);
    }
    assert.equal(host!.state, 'LIVE');
    assert.ok(host!.heartbeatAt > beatBefore, 'heartbeats resumed');
    assert.deepEqual([await state(a), await state(b), await state(c)], ['RUNNING', 'RUNNING', 'SUSPENDED'], 'nothing FAILED, nothing rolled back');
    for (const id of [a, b]) {
      assert.equal((await gateway(id)).status, 200);
      assert.deepEqual(await readState(id), stateOf[id], 'memory and files intact');
    }

    // A suspend and a resume work; what the guests hold survives them.
    const again = await api('POST', `/microvms/${a}/suspend`);
    assert.equal(again.status, 200, JSON.stringify(again.body));
    assert.equal(again.body.state, 'SUSPENDED');
    for (const id of [a, c]) {
      const resumed = await api('POST', `/microvms/${id}/resume`);
      assert.equal(resumed.status, 200, JSON.stringify(resumed.body));
      for (let i = 0; i < 600 && (await state(id)) !== 'RUNNING'; i++) await sleep(100);
      assert.equal(await state(id), 'RUNNING');
      assert.deepEqual(await readState(id), stateOf[id], 'memory and files intact after suspend and resume');
      assert.equal((await gateway(id)).status, 200);
    }
    assert.equal((await getHost(server!.db, microvms.engine.hostId))!.state, 'LIVE', 'never declared dead');
  });
});
