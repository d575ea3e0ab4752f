/**
 * A microVM's files over many suspends: each suspend commits a generation, older generations
 * keep only the disk layers the current one stands on, and a long chain is folded into one
 * layer over the image's disk, with memory, processes and files intact; every layer names its
 * backing file by a relative path, so a data directory moved elsewhere still resumes. And a VM
 * that dies on its own is FAILED, not silently restarted.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { readSnapshotManifest } from '../../src/vmm/snapshot.ts';
import { microvmDir } from '../../src/lifecycle/paths.ts';
import { getMicrovm } from '../../src/store/microvms.ts';
import type { Image } from '../../src/store/images.ts';
import { createTestImage, TESTAPP_PORT } from '../support/image.ts';
import { gatewayRequest, startTestServer, stopTestServer, type TestServer } from '../support/server.ts';
import { qemuProcessesMentioning, tempDir } from '../support/vm.ts';

describe("a microVM's files over many suspends", () => {
  let dataDir = tempDir('cocoon-mvm-');
  const options = { lifecycle: { maxDiskChain: 2 } };
  let s: TestServer;
  let image: Image;

  before(async () => {
    s = await startTestServer({ dataDir, options });
    image = await createTestImage({ db: s.server.db, dataDir, tenantId: s.adminTenantId });
  });
  after(async () => {
    const leaked = await stopTestServer(s, dataDir);
    assert.deepEqual(leaked, [], 'a test left QEMU processes running');
  });

  const generations = (id: string) =>
    fs.readdirSync(microvmDir(dataDir, id)).filter((entry) => entry.startsWith('gen-')).sort();

  test('suspend after suspend: older generations keep only their disk layer, a long chain is folded, nothing is lost', async () => {
    const started = await s.api('POST', '/microvms', { image: image.id, idlePolicy: { maxIdleDurationSeconds: 600 } });
    const { id, token } = started.body as { id: string; token: string };
    const runtimes: Array<{ generation: number; chain: number[] }> = [];
    for (let cycle = 1; cycle <= 4; cycle++) {
      assert.equal(await s.get(id, token, '/count', { port: TESTAPP_PORT }), String(cycle));
      assert.equal(await s.get(id, token, `/cgi-bin/write?cycle-${cycle}`), 'written');
      assert.equal((await s.api('POST', `/microvms/${id}/suspend`)).body.state, 'SUSPENDED');
      const runtime = (await getMicrovm(s.server.db, id))!.runtime as { generation: number; chain: number[] };
      runtimes.push({ generation: runtime.generation, chain: runtime.chain });
      const current = path.join(microvmDir(dataDir, id), `gen-${runtime.generation}`);
      const memory = (await readSnapshotManifest(current)).files.mem.name; // mem.diff: docs/vmm.md "Memory diffs"
      for (const file of ['manifest.json', 'state', memory, 'disk.qcow2']) assert.ok(fs.existsSync(path.join(current, file)), `${file} of the current generation`);
      for (const generation of runtime.chain.filter((g) => g !== runtime.generation)) {
        const dir = path.join(microvmDir(dataDir, id), `gen-${generation}`);
        assert.ok(fs.existsSync(path.join(dir, 'disk.qcow2')), 'a layer the current disk stands on is kept');
        for (const file of ['mem', 'mem.diff']) assert.equal(fs.existsSync(path.join(dir, file)), false, "an old generation's memory is removed");
      }
      assert.deepEqual(generations(id), runtime.chain.map((g) => `gen-${g}`).sort(), 'nothing outside the chain');
      // The current disk's backing chain: its own layers, then the image's disk.
      const info = JSON.parse(execFileSync('qemu-img', ['info', '--output=json', '--backing-chain', '-U', path.join(current, 'disk.qcow2')], { encoding: 'utf8' })) as Array<{ filename: string; 'backing-filename'?: string }>;
      assert.equal(info.length, runtime.chain.length + 1, `chain ${JSON.stringify(runtime.chain)} over the image's disk`);
      // Every layer names its backing file relative to its own directory.
      for (const layer of info.slice(0, -1)) {
        assert.ok(layer['backing-filename'] && !path.isAbsolute(layer['backing-filename']), `${layer.filename} names ${layer['backing-filename']}`);
      }
    }
    // Generations 1, 2, then 3 folded into 4 ([4]), then 5 over it.
    assert.deepEqual(runtimes.map((r) => r.chain), [[1], [1, 2], [4], [4, 5]]);
    assert.equal(await s.get(id, token, '/count', { port: TESTAPP_PORT }), '5', 'memory intact through folds');
    assert.equal(await s.get(id, token, '/cgi-bin/file'), 'cycle-4', 'disk intact through folds');
    assert.equal((await s.api('DELETE', `/microvms/${id}`)).status, 204);
  });

  test('a data directory moved to another path (server stopped, renamed, started there) resumes a SUSPENDED microVM with its files', async () => {
    const started = await s.api('POST', '/microvms', { image: image.id, idlePolicy: { maxIdleDurationSeconds: 600 } });
    const { id, token } = started.body as { id: string; token: string };
    // Two suspends: the disk is a layer over a layer over the image's disk.
    for (const cycle of [1, 2]) {
      assert.equal(await s.get(id, token, '/count', { port: TESTAPP_PORT }), String(cycle));
      assert.equal(await s.get(id, token, `/cgi-bin/write?moved-${cycle}`), 'written');
      assert.equal((await s.api('POST', `/microvms/${id}/suspend`)).body.state, 'SUSPENDED');
    }
    assert.deepEqual(((await getMicrovm(s.server.db, id))!.runtime as { chain: number[] }).chain, [1, 2]);
    await s.close();
    const moved = `${dataDir}-moved`;
    fs.renameSync(dataDir, moved);
    dataDir = moved;
    s = await startTestServer({ dataDir, options });
    assert.equal((await s.api('GET', `/microvms/${id}`)).body.state, 'SUSPENDED');
    assert.equal((await s.api('POST', `/microvms/${id}/resume`)).body.state, 'RUNNING');
    assert.equal(await s.get(id, token, '/cgi-bin/file'), 'moved-2', 'the disk, through both layers and the image');
    assert.equal(await s.get(id, token, '/count', { port: TESTAPP_PORT }), '3', 'the memory');
    assert.equal((await s.api('DELETE', `/microvms/${id}`)).status, 204);
  });

  test('a VM that dies on its own is FAILED with a reason; the gateway answers 502', async () => {
    const started = await s.api('POST', '/microvms', { image: image.id, idlePolicy: { maxIdleDurationSeconds: 600 } });
    const { id, token } = started.body as { id: string; token: string };
    assert.equal(await s.get(id, token, '/'), 'hello from cocoon');
    const [pid] = qemuProcessesMentioning(microvmDir(dataDir, id));
    assert.ok(pid);
    process.kill(pid, 'SIGKILL');
    const deadline = Date.now() + 30_000;
    let microvm = await s.api('GET', `/microvms/${id}`);
    while (microvm.body.state !== 'FAILED') {
      assert.ok(Date.now() < deadline, `still ${microvm.body.state}`);
      await new Promise((resolve) => setTimeout(resolve, 50));
      microvm = await s.api('GET', `/microvms/${id}`);
    }
    assert.match(microvm.body.error, /stopped unexpectedly/);
    const answer = await gatewayRequest(s.gatewayPort, id, token, '/');
    assert.equal(answer.status, 502);
    assert.equal(JSON.parse(answer.body).error.code, 'microvm_failed');
    assert.equal((await s.api('POST', `/microvms/${id}/resume`)).status, 409);
    assert.equal((await s.api('DELETE', `/microvms/${id}`)).status, 204, 'a FAILED microVM can still be deleted');
    assert.equal(fs.existsSync(microvmDir(dataDir, id)), false, 'its files are removed');
    assert.equal((await s.api('GET', `/microvms/${id}`)).body.state, 'FAILED', 'FAILED stays FAILED');
  });
});
