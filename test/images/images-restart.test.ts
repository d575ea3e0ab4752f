/**
 * A daemon that dies mid-build. A server in a child process is killed with SIGKILL while one
 * image is BUILDING (buildah running a RUN step), one is BOOTING (QEMU up, the app not ready)
 * and one waits PENDING; a new server on the same data directory finds them: the two in flight
 * end FAILED with a clear reason and nothing of them remains (no QEMU, no buildah process or
 * container, no runc container, no scratch), the PENDING one is built to READY. A server closed
 * normally during a build cancels it the same way.
 */
import assert from 'node:assert/strict';
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { promisify } from 'node:util';
import { once } from 'node:events';
import fs from 'node:fs';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { ensureBaseImages } from '../../src/builder/base-images.ts';
import { processesUnder } from '../../src/images/cleanup.ts';
import { tempDir } from '../support/vm.ts';
import {
  assertNoLeftovers, BUSYBOX_APP, client, makeBundle, removeDataDir, runcContainersUnder, startTestServer,
  type Client,
} from './helpers.ts';

const BUILD = { timeout: 900_000 };
const SERVE = path.join(path.dirname(fileURLToPath(import.meta.url)), 'fixtures', 'serve.ts');

async function startChildServer(dataDir: string, concurrency: number): Promise<{ child: ChildProcess; url: string }> {
  const child = spawn(process.execPath, [SERVE, dataDir, String(concurrency)], {
    env: { ...process.env, NODE_ENV: 'test' },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const lines = createInterface({ input: child.stdout! });
  const [line] = (await Promise.race([
    once(lines, 'line'),
    once(child, 'exit').then(([code]) => {
      throw new Error(`the child server exited (${code}) before it was up`);
    }),
  ])) as [string];
  return { child, url: (JSON.parse(line) as { url: string }).url };
}

async function buildahContainerIds(): Promise<string[]> {
  const { stdout } = await promisify(execFile)('buildah', ['containers', '-a', '--json']);
  return ((JSON.parse(stdout || '[]') ?? []) as Array<{ id: string }>).map((c) => c.id);
}

async function waitForLog(api: Client, id: string, text: string, timeoutMs = 300_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await api.get(`/images/${id}/logs`)).text.includes(text)) {
    if (Date.now() > deadline) assert.fail(`the log of ${id} never showed "${text}"`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

describe('a daemon restart mid-build', () => {
  const dataDirs: string[] = [];
  const children: ChildProcess[] = [];

  before(async () => {
    await ensureBaseImages();
  });
  after(async () => {
    for (const child of children) child.kill('SIGKILL');
    for (const dir of dataDirs) await removeDataDir(dir);
  });

  test('killed while BUILDING and BOOTING: FAILED with the reason, nothing left; PENDING is built after the restart', BUILD, async () => {
    const dataDir = tempDir('cocoon-img-');
    dataDirs.push(dataDir);
    const { child, url } = await startChildServer(dataDir, 2);
    children.push(child);
    const key = fs.readFileSync(path.join(dataDir, 'admin-api-key'), 'utf8').trim();
    let api = client(url, key);

    const slowBuild = await api.uploadBundle(await makeBundle({ Dockerfile: 'FROM busybox\nRUN echo slow-step-4721 && sleep 900\nCMD ["sh"]\n' }));
    const neverReady = await api.uploadBundle(await makeBundle({ Dockerfile: 'FROM busybox\nCMD ["sh", "-c", "echo waiting-4722; sleep 3600"]\n' }));
    const busybox = await api.uploadBundle(await makeBundle(BUSYBOX_APP));
    const containersBefore = await buildahContainerIds();
    const building = (await api.post('/images', { name: 'killed-building', bundle: slowBuild.body.uri })).body;
    const booting = (await api.post('/images', { name: 'killed-booting', bundle: neverReady.body.uri, readiness: { timeoutSeconds: 3600 } })).body;
    const pending = (await api.post('/images', { name: 'pending', bundle: busybox.body.uri })).body;

    await waitForLog(api, building.id, 'slow-step-4721');
    assert.equal((await api.waitForState(booting.id, ['BOOTING', 'FAILED', 'READY'])).state, 'BOOTING');
    await waitForLog(api, booting.id, 'waiting for the app');
    assert.equal((await api.get(`/images/${building.id}`)).body.state, 'BUILDING');
    assert.equal((await api.get(`/images/${pending.id}`)).body.state, 'PENDING');

    // buildah's working container of the slow build (it is not named after the image).
    const buildContainers = (await buildahContainerIds()).filter((id) => !containersBefore.includes(id));
    assert.ok(buildContainers.length > 0, 'the build has a working container');

    // The crash: no cleanup of any kind. buildah and QEMU run on (their own process groups).
    child.kill('SIGKILL');
    await once(child, 'exit');
    const orphans = processesUnder(path.join(dataDir, 'images'));
    assert.ok(orphans.some((p) => p.command.includes('qemu-system')), `QEMU outlived the daemon: ${JSON.stringify(orphans)}`);
    assert.ok(orphans.some((p) => /buildah/.test(p.command)), `buildah outlived the daemon: ${JSON.stringify(orphans)}`);
    assert.ok((await runcContainersUnder(path.join(dataDir, 'images', building.id))).length > 0, 'the RUN step\'s container is still there');

    // The restart, on the same data directory.
    const t = await startTestServer({}, dataDir);
    try {
      api = client(t.url, key);
      for (const [image, was] of [[building, 'BUILDING'], [booting, 'BOOTING']] as const) {
        const now = (await api.get(`/images/${image.id}`)).body;
        assert.equal(now.state, 'FAILED', `${image.name}`);
        assert.match(now.error, /^server_restarted: the server restarted during the build/);
        assert.ok(now.error.includes(`was ${was}`), now.error);
        const logs = (await api.get(`/images/${image.id}/logs`)).text;
        assert.match(logs, /the server restarted while this build was/);
        await assertNoLeftovers(dataDir, image.id);
      }
      const remaining = await buildahContainerIds();
      assert.deepEqual(buildContainers.filter((id) => remaining.includes(id)), [], 'the killed build\'s working container is gone');
      const rebuilt = await api.waitForState(pending.id, ['READY', 'FAILED']);
      assert.equal(rebuilt.state, 'READY', rebuilt.error);
      assert.match((await api.get(`/images/${pending.id}/logs`)).text, /queued again/);
      await assertNoLeftovers(dataDir, pending.id);
    } finally {
      await t.close();
    }
  });

  test('closed normally during a build: the build is cancelled, FAILED with the reason, nothing left', BUILD, async () => {
    const dataDir = tempDir('cocoon-img-');
    dataDirs.push(dataDir);
    let t = await startTestServer({ concurrency: 1, maxQueued: 1 }, dataDir);
    let id: string;
    try {
      const api = client(t.url, t.adminKey);
      const upload = await api.uploadBundle(await makeBundle({ Dockerfile: 'FROM busybox\nRUN echo slow-step-4723 && sleep 900\nCMD ["sh"]\n' }));
      id = (await api.post('/images', { name: 'stopped', bundle: upload.body.uri })).body.id;
      await waitForLog(api, id, 'slow-step-4723');
      // The queue is bounded: one building, one waiting, the next is refused.
      const waiting = await api.post('/images', { name: 'waiting', bundle: upload.body.uri });
      assert.equal(waiting.status, 202, waiting.text);
      const refused = await api.post('/images', { name: 'refused', bundle: upload.body.uri });
      assert.equal(refused.status, 429, refused.text);
      assert.equal(refused.body.error.code, 'build_queue_full');
      assert.equal((await api.delete(`/images/${waiting.body.id}`)).status, 204, 'a queued image can be deleted');
      // Someone follows the log: closing the server ends the stream instead of waiting for it.
      const followed = await fetch(`${t.url}/api/v1/images/${id}/logs?follow=1`, { headers: { authorization: `Bearer ${t.adminKey}` } });
      const text = followed.text();
      await t.close();
      assert.match(await text, /slow-step-4723/);
    } finally {
      await t.close();
    }
    await assertNoLeftovers(dataDir, id);
    t = await startTestServer({}, dataDir);
    try {
      const image = (await client(t.url, t.adminKey).get(`/images/${id}`)).body;
      assert.equal(image.state, 'FAILED');
      assert.match(image.error, /^server_stopped: the server stopped during the build/);
    } finally {
      await t.close();
    }
  });
});
