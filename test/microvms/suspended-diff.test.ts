/**
 * Diff-only suspended storage (issue 12): a microVM suspended and resumed 20 times, with writes
 * to its memory and its disk between, keeps both byte for byte; while suspended it holds on disk
 * only what it changed relative to its image (its generation's memory is a diff against the
 * image's: docs/vmm.md "Memory diffs"), bounded in allocated blocks; and its image cannot be
 * deleted under it.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { imageSnapshotDir, microvmDir } from '../../src/lifecycle/paths.ts';
import { getMicrovm } from '../../src/store/microvms.ts';
import { imagesModule } from '../../src/wiring/images.ts';
import type { Image } from '../../src/store/images.ts';
import { readSnapshotManifest } from '../../src/vmm/snapshot.ts';
import { download, upload } from '../exec/helpers.ts';
import { createTestImage, TESTAPP_PORT } from '../support/image.ts';
import { gatewayRequest, startTestServer, stopTestServer, type TestServer } from '../support/server.ts';
import { tempDir } from '../support/vm.ts';

const CYCLES = 20;
/** Bytes the guest's in-memory buffer grows by per cycle (random: no page of it is the image's). */
const GROW = 64 * 1024;
/** Bytes of the file written to the guest's disk per cycle. */
const FILE = 16 * 1024;
const MiB = 1024 * 1024;
/**
 * The bound on blocks a suspended microVM holds beyond its image after `cycle` cycles: a fixed
 * part (the pages a guest changes by running at all, the device state, the disk layers' qcow2
 * metadata: ~2.5 MiB measured after one cycle) and three times what it was given (the data, the
 * guest's page cache of the files, the kernel's own pages around them: ~2.4× measured). Whole
 * memory files, as kept before, held ~63 MiB after one cycle.
 */
const suspendedBound = (cycle: number) => 8 * MiB + 3 * cycle * (GROW + FILE);

/** xorshift32 from `seed`, each state as 4 little-endian bytes (what the test app's /grow writes). */
function pattern(bytes: number, seed: number): Buffer {
  const out = Buffer.alloc(bytes);
  let x = seed >>> 0;
  for (let i = 0; i < bytes; i += 4) {
    x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
    out.writeUInt32LE(x, i);
  }
  return out;
}

/** Allocated bytes (st_blocks) of every file under `dir`, in all and per file. */
function allocatedUnder(dir: string): { total: number; files: string } {
  let total = 0;
  const files: string[] = [];
  for (const entry of fs.readdirSync(dir, { withFileTypes: true, recursive: true })) {
    if (!entry.isFile()) continue;
    const file = path.join(entry.parentPath, entry.name);
    const bytes = fs.statSync(file).blocks * 512;
    total += bytes;
    files.push(`${path.relative(dir, file)} ${(bytes / 1024).toFixed(0)} KiB`);
  }
  return { total, files: files.join(', ') };
}

/** A GET through the gateway, body as bytes. */
function gatewayBytes(gatewayPort: number, id: string, token: string, route: string): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const req = http.request(
      {
        host: '127.0.0.1', port: gatewayPort, path: route, agent: false,
        headers: { host: `${id}.vm.localhost:${gatewayPort}`, 'x-cocoon-token': token, 'x-cocoon-port': String(TESTAPP_PORT) },
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (chunk: Buffer) => chunks.push(chunk));
        res.on('end', () => (res.statusCode === 200 ? resolve(Buffer.concat(chunks)) : reject(new Error(`GET ${route}: ${res.statusCode}`))));
        res.on('error', reject);
      },
    );
    req.on('error', reject);
    req.end();
  });
}

async function readAll(stream: NodeJS.ReadableStream): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const chunk of stream) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks);
}

describe('diff-only suspended storage', () => {
  const dataDir = tempDir('cocoon-diff-');
  let s: TestServer;
  let image: Image;

  before(async () => {
    s = await startTestServer({ dataDir, modules: [imagesModule()] });
    image = await createTestImage({ db: s.server.db, dataDir, tenantId: s.adminTenantId });
  });
  after(async () => {
    const leaked = await stopTestServer(s, dataDir);
    assert.deepEqual(leaked, [], 'a test left QEMU processes running');
  });

  test(`${CYCLES} suspends and resumes with writes between: memory and files byte for byte, suspended disk bounded, the image kept`, { timeout: 900_000 }, async () => {
    const apiPort = Number(new URL(s.server.apiUrl).port);
    const started = await s.api('POST', '/microvms', { image: image.id, idlePolicy: { maxIdleDurationSeconds: 600 } });
    const { id, token } = started.body as { id: string; token: string };
    const grow = async (cycle: number) => {
      const answer = await gatewayRequest(s.gatewayPort, id, token, `/grow?bytes=${GROW}&seed=${cycle}`, { method: 'POST', port: TESTAPP_PORT });
      assert.equal(answer.status, 200, answer.body);
      assert.equal(answer.body.trim(), String(cycle * GROW));
    };
    const bufferHash = () => s.get(id, token, '/buffer/hash', { port: TESTAPP_PORT });
    const suspendedBytes: number[] = [];
    const diffPages: number[] = [];
    for (let cycle = 1; cycle <= CYCLES; cycle++) {
      await grow(cycle);
      const written = await upload(apiPort, s.adminKey, id, `/data/file-${cycle}`, pattern(FILE, 1000 + cycle));
      assert.equal(written.status, 201, JSON.stringify(written.body));
      const hash = await bufferHash();
      assert.equal((await s.api('POST', `/microvms/${id}/suspend`)).body.state, 'SUSPENDED');

      // What the suspended microVM holds: its generation's memory is a diff against the image's.
      const { generation } = (await getMicrovm(s.server.db, id))!.runtime as { generation: number };
      const manifest = await readSnapshotManifest(path.join(microvmDir(dataDir, id), `gen-${generation}`));
      assert.equal(manifest.files.mem.name, 'mem.diff', `generation ${generation} keeps a memory diff`);
      assert.ok(manifest.files.mem.base, 'the diff names its base');
      assert.equal(fs.existsSync(path.join(microvmDir(dataDir, id), `gen-${generation}`, 'mem')), false, 'no whole memory file is kept');
      diffPages.push(Math.ceil(manifest.files.mem.sizeBytes / 4096));
      const { total: held, files } = allocatedUnder(microvmDir(dataDir, id));
      suspendedBytes.push(held);
      const bound = suspendedBound(cycle);
      assert.ok(held <= bound, `cycle ${cycle}: the suspended microVM holds ${(held / MiB).toFixed(1)} MiB beyond its image (bound ${(bound / MiB).toFixed(1)} MiB): ${files}`);

      if (cycle === 1 || cycle === CYCLES) {
        // The image it stands on cannot be deleted while the microVM needs it.
        const refused = await s.api('DELETE', `/images/${image.id}`);
        assert.equal(refused.status, 409);
        assert.equal(refused.body.error.code, 'image_in_use');
        assert.ok(fs.existsSync(path.join(imageSnapshotDir(dataDir, image.id), 'mem')), "the image's memory is kept");
      }

      assert.equal((await s.api('POST', `/microvms/${id}/resume`)).body.state, 'RUNNING');
      assert.equal(await bufferHash(), hash, `cycle ${cycle}: the buffer survived the suspend`);
    }
    // The memory diff grows with what the guest changed, not with the memory size.
    assert.ok((diffPages.at(-1) ?? 0) < 65536 / 4, `the last diff holds ${diffPages.at(-1)} pages of 65536`);

    // After the last resume: every byte the guest was given, in memory and on disk.
    const expected = Buffer.concat(Array.from({ length: CYCLES }, (_, i) => pattern(GROW, i + 1)));
    const buffer = await gatewayBytes(s.gatewayPort, id, token, '/buffer');
    assert.equal(buffer.length, expected.length);
    assert.ok(buffer.equals(expected), 'the in-memory buffer is byte for byte what was written');
    for (let cycle = 1; cycle <= CYCLES; cycle++) {
      const file = await readAll(await download(apiPort, s.adminKey, id, `/data/file-${cycle}`));
      assert.ok(file.equals(pattern(FILE, 1000 + cycle)), `/data/file-${cycle} is byte for byte what was written`);
    }
    // While RUNNING the image is needed too; once the microVM is gone it can be deleted.
    assert.equal((await s.api('DELETE', `/images/${image.id}`)).body.error.code, 'image_in_use');
    assert.equal((await s.api('DELETE', `/microvms/${id}`)).status, 204);
    assert.equal((await s.api('DELETE', `/images/${image.id}`)).status, 204);
    console.log(`suspended microVM on disk beyond its image, per cycle (MiB): ${suspendedBytes.map((b) => (b / MiB).toFixed(1)).join(' ')}`);
  });
});
