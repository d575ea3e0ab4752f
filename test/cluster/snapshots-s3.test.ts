/**
 * Snapshots in S3 with real parts: PostgreSQL (the cluster's metadata store), s3rver (an
 * S3-protocol server on loopback) and one Cocoon server with real buildah and QEMU. An image's
 * snapshot is in S3 once it is READY; a suspend's generation is in S3 once the microVM is
 * SUSPENDED; with the local generations and image cache removed (as on another host) a resume
 * downloads them and the guest's memory, files and processes are intact. S3 unreachable during
 * a suspend (before the snapshot, and after it): a clear error, the microVM keeps RUNNING with
 * its state, and a later suspend succeeds. One image build for the file.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { ListObjectsV2Command, S3Client } from '@aws-sdk/client-s3';
import { ensureBaseImages } from '../../src/builder/base-images.ts';
import { loadConfig } from '../../src/config/config.ts';
import { startServer, type RunningServer } from '../../src/server.ts';
import { imagesModule } from '../../src/wiring/images.ts';
import { microvmModule } from '../../src/wiring/microvms.ts';
import { apiPort, execCall } from '../exec/helpers.ts';
import { client, makeBundle, type Client } from '../images/helpers.ts';
import { startS3rver, type TestS3Server } from '../objectstore/s3rver-server.ts';
import { PostgresServer } from '../support/postgres.ts';
import { cleanupDir, tempDir } from '../support/vm.ts';

const BUCKET = 'cocoon-cluster';
const PREFIX = 'cocoon';
const SLOW = { timeout: 900_000 };

describe('snapshots in S3 (PostgreSQL, s3rver, one Cocoon server; real buildah and QEMU)', () => {
  const dataDir = tempDir('cocoon-s3snap-');
  const savedEnv = { ...process.env };
  let pg: PostgresServer;
  let s3: TestS3Server;
  let s3client: S3Client;
  let server: RunningServer;
  let api: Client;
  let key: string;
  let imageId: string;
  let id: string;
  /** Set by a test: S3 goes away right after the suspend's local snapshot is committed. */
  let cutS3AfterSnapshot = false;

  before(async () => {
    await ensureBaseImages();
    pg = await PostgresServer.start();
    const databaseUrl = await pg.createDatabase('s3snap');
    s3 = await startS3rver([BUCKET]);
    s3client = new S3Client({ region: 'us-east-1', endpoint: s3.endpoint, forcePathStyle: true, credentials: s3.credentials });
    // The object store comes from the environment, as on a real host.
    Object.assign(process.env, {
      COCOON_S3_BUCKET: BUCKET,
      COCOON_S3_ENDPOINT: s3.endpoint,
      COCOON_S3_REGION: 'us-east-1',
      COCOON_S3_ACCESS_KEY_ID: s3.credentials.accessKeyId,
      COCOON_S3_SECRET_ACCESS_KEY: s3.credentials.secretAccessKey,
      COCOON_S3_PREFIX: PREFIX,
    });
    const microvms = microvmModule({
      lifecycle: {
        pauseAt: async (point) => {
          if (point === 'suspend:committed' && cutS3AfterSnapshot) {
            cutS3AfterSnapshot = false;
            await s3.pause();
          }
        },
      },
    });
    server = await startServer({ ...loadConfig({ COCOON_DATA_DIR: dataDir, COCOON_DATABASE_URL: databaseUrl }), apiPort: 0, gatewayPort: 0 }, [imagesModule(), microvms]);
    key = fs.readFileSync(path.join(dataDir, 'admin-api-key'), 'utf8').trim();
    api = client(server.apiUrl, key);
  });
  after(async () => {
    if (id) await api.delete(`/microvms/${id}`).catch(() => undefined);
    await server?.close();
    const leaked = cleanupDir(dataDir);
    s3client?.destroy();
    await s3?.stop();
    await pg?.stop();
    for (const name of Object.keys(process.env)) if (!(name in savedEnv)) delete process.env[name];
    assert.deepEqual(leaked, [], 'no QEMU left');
  });

  const keys = async (prefix: string): Promise<string[]> => {
    const listed = await s3client.send(new ListObjectsV2Command({ Bucket: BUCKET, Prefix: `${PREFIX}/${prefix}` }));
    return (listed.Contents ?? []).map((o) => (o.Key ?? '').slice(PREFIX.length + 1)).sort();
  };
  /** Every file of the local snapshot directory is in S3 under `prefix`, with the index. */
  const assertStored = async (prefix: string, dir: string) => {
    const stored = await keys(`${prefix}/`);
    const expected = [`${prefix}/index.json`, ...fs.readdirSync(dir).map((name) => `${prefix}/files/${name}`)].sort();
    assert.ok(expected.length >= 5, `a whole snapshot in ${dir}`);
    assert.deepEqual(stored, expected, `${dir} is in S3 under ${prefix}`);
  };
  const exec = async (command: string): Promise<string> => {
    const r = await execCall(apiPort(server.apiUrl), key, id, { command });
    assert.equal(r.status, 200, JSON.stringify(r.error));
    assert.equal(r.exit?.exitCode, 0, `${command}: ${r.stderr}`);
    return r.stdout.trim();
  };
  const state = async (): Promise<string> => (await api.get(`/microvms/${id}`)).body.state;
  const generation = async (): Promise<number> => {
    const row = await server.db.get<{ runtime: string }>('SELECT runtime FROM microvms WHERE id = ?', [id]);
    return (JSON.parse(row!.runtime) as { generation: number }).generation;
  };
  /** This host forgets the microVM's generations and the image's snapshot: what another host has. */
  const forgetLocalSnapshots = () => {
    const microvmDir = path.join(dataDir, 'microvms', id);
    for (const entry of fs.readdirSync(microvmDir)) if (entry.startsWith('gen-')) fs.rmSync(path.join(microvmDir, entry), { recursive: true });
    const snapshot = path.join(dataDir, 'images', imageId, 'snapshot');
    fs.chmodSync(snapshot, 0o700);
    fs.rmSync(snapshot, { recursive: true });
  };
  /** The guest's state: a file in a RAM-only tmpfs (memory), a file on its disk, a background process. */
  const guestState = async () => ({
    memory: await exec('cat /mnt/ram/token'),
    disk: await exec('cat /root/on-disk'),
    pids: (await api.get(`/microvms/${id}/processes`)).body.items.map((p: { pid: number }) => p.pid),
    ticks: Number(await exec('cat /mnt/ram/ticks')),
  });

  test('READY image and SUSPENDED generation are in S3; a host without them resumes with memory, files and processes intact', SLOW, async (t) => {
    const upload = await api.uploadBundle(await makeBundle({ Dockerfile: 'FROM busybox\nCMD ["sleep", "infinity"]\n' }));
    assert.equal(upload.status, 201, upload.text);
    const created = await api.post('/images', { name: 's3snap', bundle: upload.body.uri, port: null });
    assert.equal(created.status, 202, created.text);
    const image = await api.waitForState(created.body.id, ['READY', 'FAILED'], 850_000);
    assert.equal(image.state, 'READY', image.error);
    imageId = image.id;
    await assertStored(`snapshots/images/${imageId}`, path.join(dataDir, 'images', imageId, 'snapshot'));

    const vm = await api.post('/microvms', { image: imageId, idlePolicy: { maxIdleDurationSeconds: 3600 } });
    assert.equal(vm.status, 201, vm.text);
    id = vm.body.id;
    for (let i = 0; i < 1200 && (await state()) !== 'RUNNING'; i++) await new Promise((r) => setTimeout(r, 100));
    await exec('mkdir -p /mnt/ram && mount -t tmpfs ram /mnt/ram && cat /proc/sys/kernel/random/uuid > /mnt/ram/token && echo written-to-disk > /root/on-disk && sync');
    const bg = await execCall(apiPort(server.apiUrl), key, id, { command: 'i=0; while true; do i=$((i+1)); echo $i > /mnt/ram/ticks; sleep 0.2; done', background: true });
    assert.equal(bg.status, 201, JSON.stringify(bg.error));
    await new Promise((r) => setTimeout(r, 500));
    const before = await guestState();
    assert.equal(before.pids.length, 1);

    const suspended = await api.post(`/microvms/${id}/suspend`);
    assert.equal(suspended.status, 200, suspended.text);
    assert.equal(suspended.body.state, 'SUSPENDED');
    const gen = await generation();
    await assertStored(`snapshots/microvms/${id}/gen-${gen}`, path.join(dataDir, 'microvms', id, `gen-${gen}`));

    forgetLocalSnapshots();
    const resumed = await api.post(`/microvms/${id}/resume`);
    assert.equal(resumed.status, 200, resumed.text);
    assert.equal(await state(), 'RUNNING');
    assert.ok(fs.existsSync(path.join(dataDir, 'images', imageId, 'snapshot', 'manifest.json')), "the image's snapshot was downloaded into this host's cache");
    const afterResume = await guestState();
    assert.equal(afterResume.memory, before.memory, 'memory (a tmpfs file) intact');
    assert.equal(afterResume.disk, 'written-to-disk', 'the disk intact');
    assert.deepEqual(afterResume.pids, before.pids, 'the same background process');
    await new Promise((r) => setTimeout(r, 500));
    assert.ok(Number(await exec('cat /mnt/ram/ticks')) > before.ticks, 'and it runs on');
    // The lifecycle's notes: how long storing and fetching took (for the report, not asserted).
    const notes = fs.readFileSync(path.join(dataDir, 'microvms', id, 'vm', 'serial.log'), 'utf8').split('\n');
    for (const line of notes.filter((l) => l.includes('object store'))) t.diagnostic(line);
  });

  test('S3 unreachable during a suspend: a clear error, the microVM keeps running with its state, a later suspend succeeds', SLOW, async () => {
    assert.ok(id, 'needs the microVM of the test before');
    const before = await guestState();
    const refused = async (what: string) => {
      const answer = await api.post(`/microvms/${id}/suspend`);
      assert.equal(answer.status, 503, `${what}: ${answer.text}`);
      assert.equal(answer.body.error.code, 'object_store_unavailable', what);
      assert.match(answer.body.error.message, /keeps running/, what);
      assert.equal(await state(), 'RUNNING', `${what}: still RUNNING`);
      const now = await guestState();
      assert.equal(now.memory, before.memory, `${what}: memory intact`);
      assert.deepEqual(now.pids, before.pids, `${what}: the same process`);
    };

    // S3 down before the suspend: the VM is never stopped.
    await s3.pause();
    await refused('S3 down before the suspend');

    // S3 goes down after the local snapshot: the VM is restored from it and runs on.
    await s3.resume();
    cutS3AfterSnapshot = true;
    await refused('S3 down after the snapshot');
    assert.equal(cutS3AfterSnapshot, false, 'the suspend got as far as its snapshot');

    await s3.resume();
    const suspended = await api.post(`/microvms/${id}/suspend`);
    assert.equal(suspended.status, 200, suspended.text);
    assert.equal(suspended.body.state, 'SUSPENDED');
    // What it stands on is all in S3: another host resumes it.
    forgetLocalSnapshots();
    assert.equal((await api.post(`/microvms/${id}/resume`)).status, 200);
    const after = await guestState();
    assert.equal(after.memory, before.memory);
    assert.equal(after.disk, 'written-to-disk');
    assert.deepEqual(after.pids, before.pids);
  });
});
