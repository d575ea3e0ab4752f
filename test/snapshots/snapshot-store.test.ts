/**
 * The snapshot store without a VM: a snapshot directory (manifest with real checksums, a sparse
 * memory file, a sparse disk) goes up as data only and comes back identical, sparse, and
 * verified; a corrupt, truncated or half-uploaded snapshot is refused and leaves nothing; an
 * unreachable S3 (s3rver stopped) is `object_store_unavailable`, and works again once it is back.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { isCocoonError } from '../../src/common/errors.ts';
import { LocalObjectStore } from '../../src/objectstore/local.ts';
import { S3ObjectStore } from '../../src/objectstore/s3.ts';
import { SharedSnapshots } from '../../src/lifecycle/shared-snapshots.ts';
import { generationPrefix, SnapshotStore } from '../../src/snapshots/snapshot-store.ts';
import { writeSnapshotManifest } from '../../src/vmm/snapshot.ts';
import type { SnapshotManifest } from '../../src/vmm/types.ts';
import { startS3rver, type TestS3Server } from '../objectstore/s3rver-server.ts';
import { useTempDir } from '../support/vm.ts';

const MIB = 1024 * 1024;

/** A snapshot directory shaped like a suspend's: 64 MiB memory with 3 MiB of data (and a zero-filled MiB), a sparse disk. */
async function makeSnapshot(dir: string): Promise<void> {
  fs.mkdirSync(dir, { recursive: true });
  const state = Buffer.from('device state '.repeat(100));
  fs.writeFileSync(path.join(dir, 'state'), state);
  const mem = fs.openSync(path.join(dir, 'mem'), 'w');
  fs.ftruncateSync(mem, 64 * MIB);
  fs.writeSync(mem, Buffer.alloc(2 * MIB, 7), 0, 2 * MIB, 0);
  fs.writeSync(mem, Buffer.alloc(MIB), 0, MIB, 10 * MIB); // allocated, but zeros: not uploaded
  const tail = Buffer.alloc(MIB);
  for (let i = 0; i < tail.length; i += 4096) tail[i] = (i / 4096) % 251 + 1;
  fs.writeSync(mem, tail, 0, MIB, 63 * MIB);
  fs.closeSync(mem);
  const disk = fs.openSync(path.join(dir, 'disk.raw'), 'w');
  fs.ftruncateSync(disk, 32 * MIB + 1000); // a size that is not a whole number of pages
  fs.writeSync(disk, Buffer.from('the end'), 0, 7, 32 * MIB + 990);
  fs.closeSync(disk);
  const manifest: SnapshotManifest = {
    formatVersion: 1,
    createdAt: new Date().toISOString(),
    shape: { vcpus: 1, memoryMiB: 64 } as SnapshotManifest['shape'],
    cmdline: 'console=ttyS0',
    files: {
      state: { name: 'state', sizeBytes: state.length, sha256: createHash('sha256').update(state).digest('hex') },
      mem: { name: 'mem', sizeBytes: 64 * MIB },
      disk: { name: 'disk.raw', format: 'raw', sizeBytes: 32 * MIB + 1000 },
    },
    guestPorts: [],
  };
  await writeSnapshotManifest(dir, manifest, false);
}

const digest = (file: string) => createHash('sha256').update(fs.readFileSync(file)).digest('hex');
const allocatedMiB = (file: string) => (fs.statSync(file).blocks * 512) / MIB;

describe('snapshot store (local object store)', () => {
  test('a snapshot goes up as its data only and comes back identical, sparse and verified', async (t) => {
    const root = useTempDir(t, 'cocoon-snapstore-');
    const source = path.join(root, 'source');
    await makeSnapshot(source);
    const store = new SnapshotStore(new LocalObjectStore(path.join(root, 'objects')));
    const prefix = generationPrefix('mvm-01jtestsnapshotstore00000', 1);
    assert.equal(await store.isPublished(prefix), false);
    const index = await store.publish(prefix, source);
    assert.equal(await store.isPublished(prefix), true);
    const mem = index.files.find((file) => file.name === 'mem')!;
    assert.ok(mem.objectBytes > 3 * MIB && mem.objectBytes < 3 * MIB + 64 * 1024, `the memory object holds its 3 MiB of data only (${mem.objectBytes} bytes)`);
    assert.ok(index.files.find((file) => file.name === 'disk.raw')!.objectBytes < 64 * 1024, 'the disk object holds its data only');

    const target = path.join(root, 'cache', 'gen-1');
    assert.equal(await store.fetch(prefix, target), true);
    for (const name of ['state', 'mem', 'disk.raw', 'manifest.json']) {
      assert.equal(digest(path.join(target, name)), digest(path.join(source, name)), `${name} is identical`);
    }
    assert.ok(allocatedMiB(path.join(target, 'mem')) <= 3.1, `the downloaded memory file is sparse (${allocatedMiB(path.join(target, 'mem'))} MiB allocated)`);
    assert.equal(await store.fetch(prefix, target), false, 'present already: nothing to download');
    assert.deepEqual(fs.readdirSync(path.join(root, 'cache')), ['gen-1'], 'no temp directory is left');

    // Only the disk (an older generation of a chain keeps no memory).
    const diskOnly = path.join(root, 'cache', 'disk-only');
    await store.fetch(prefix, diskOnly, { names: ['disk.raw'] });
    assert.deepEqual(fs.readdirSync(diskOnly).sort(), ['disk.raw', 'manifest.json']);

    // Read-only (an image's snapshot).
    const image = path.join(root, 'cache', 'image');
    await store.fetch(prefix, image, { readOnly: true });
    assert.equal(fs.statSync(image).mode & 0o777, 0o555);
    assert.equal(fs.statSync(path.join(image, 'mem')).mode & 0o777, 0o444);
  });

  test('a corrupt, truncated or half-uploaded snapshot is refused and leaves nothing behind', async (t) => {
    const root = useTempDir(t, 'cocoon-snapstore-');
    const source = path.join(root, 'source');
    await makeSnapshot(source);
    const objects = path.join(root, 'objects');
    const store = new SnapshotStore(new LocalObjectStore(objects));
    const prefix = generationPrefix('mvm-01jtestsnapshotstore00001', 2);
    await store.publish(prefix, source);
    const memObject = path.join(objects, prefix, 'files', 'mem');
    const original = fs.readFileSync(memObject);
    const cache = path.join(root, 'cache');
    const refused = async (why: string, code: 'snapshot_corrupt' | 'snapshot_not_found' = 'snapshot_corrupt') => {
      const target = path.join(cache, 'gen-2');
      await assert.rejects(store.fetch(prefix, target), (error: unknown) => isCocoonError(error, code), why);
      assert.equal(fs.existsSync(target), false, `${why}: nothing appears`);
      assert.deepEqual(fs.existsSync(cache) ? fs.readdirSync(cache) : [], [], `${why}: no temp directory is left`);
    };

    const flipped = Buffer.from(original);
    flipped[flipped.length - 100]! ^= 0x01;
    fs.writeFileSync(memObject, flipped);
    await refused('a flipped bit in the memory');
    fs.writeFileSync(memObject, original.subarray(0, original.length - 4096 - 16));
    await refused('a truncated memory object');
    fs.writeFileSync(memObject, original);

    // A bit flipped consistently in the object and the index still fails the manifest's checksum.
    const store2 = new SnapshotStore(new LocalObjectStore(objects));
    const indexFile = path.join(objects, prefix, 'index.json');
    const index = JSON.parse(fs.readFileSync(indexFile, 'utf8')) as { files: Array<{ name: string; sha256: string }> };
    fs.writeFileSync(memObject, flipped);
    index.files.find((file) => file.name === 'mem')!.sha256 = createHash('sha256').update(flipped).digest('hex');
    fs.writeFileSync(indexFile, JSON.stringify(index));
    await assert.rejects(store2.fetch(prefix, path.join(cache, 'gen-2')), (error: unknown) => isCocoonError(error, 'snapshot_corrupt'));
    assert.deepEqual(fs.readdirSync(cache), []);

    // An upload that never got to its index is not a snapshot.
    fs.rmSync(indexFile);
    await refused('no index', 'snapshot_not_found');
  });
});

describe("a microVM's generations (lifecycle/shared-snapshots.ts)", () => {
  test('another host resumes a chain: older generations come as their disk only; a generation another host stored is never overwritten (lease_lost)', async (t) => {
    const root = useTempDir(t, 'cocoon-snapstore-');
    const objects = path.join(root, 'objects');
    const id = 'mvm-01jtestsharedsnapshots000';
    const hostA = path.join(root, 'a');
    const hostB = path.join(root, 'b');
    for (const generation of [1, 2]) await makeSnapshot(path.join(hostA, 'microvms', id, `gen-${generation}`));
    const a = new SharedSnapshots(new SnapshotStore(new LocalObjectStore(objects)), hostA);
    const microvm = { id, imageId: null };
    await a.commit(microvm, { generation: 2, chain: [1, 2] }, { fresh: true });
    assert.equal(await a.isStored(microvm, { generation: 2, chain: [1, 2] }), true);

    const b = new SharedSnapshots(new SnapshotStore(new LocalObjectStore(objects)), hostB);
    await b.ensureLocal(microvm, { generation: 2, chain: [1, 2] });
    assert.deepEqual(fs.readdirSync(path.join(hostB, 'microvms', id, 'gen-1')).sort(), ['disk.raw', 'manifest.json'], 'an older generation: its disk layer');
    assert.deepEqual(fs.readdirSync(path.join(hostB, 'microvms', id, 'gen-2')).sort(), ['disk.raw', 'manifest.json', 'mem', 'state'], 'the current one whole');

    // Host A, cut off, writes its own generation 3 after host B stored one: refused, B's stays.
    await makeSnapshot(path.join(hostB, 'microvms', id, 'gen-3'));
    await b.commit(microvm, { generation: 3, chain: [1, 2, 3] }, { fresh: true });
    const storedIndex = fs.readFileSync(path.join(objects, generationPrefix(id, 3), 'index.json'));
    await makeSnapshot(path.join(hostA, 'microvms', id, 'gen-3'));
    await assert.rejects(a.commit(microvm, { generation: 3, chain: [1, 2, 3] }, { fresh: true }), (error: unknown) => isCocoonError(error, 'lease_lost'));
    assert.deepEqual(fs.readFileSync(path.join(objects, generationPrefix(id, 3), 'index.json')), storedIndex, "host B's generation 3 is untouched");
  });
});

describe('snapshot store (S3, s3rver)', () => {
  const BUCKET = 'cocoon-snapshots';
  let server: TestS3Server;
  let objects: S3ObjectStore;
  before(async () => {
    server = await startS3rver([BUCKET]);
    objects = new S3ObjectStore({ bucket: BUCKET, region: 'us-east-1', endpoint: server.endpoint, forcePathStyle: true, credentials: server.credentials, prefix: 'cluster' });
  });
  after(async () => {
    objects?.destroy();
    await server?.stop();
  });

  test('round trip through S3; unreachable S3 is object_store_unavailable, then works again', async (t) => {
    const root = useTempDir(t, 'cocoon-snapstore-');
    const source = path.join(root, 'source');
    await makeSnapshot(source);
    const store = new SnapshotStore(objects);
    const prefix = generationPrefix('mvm-01jtestsnapshotstore00002', 1);
    await store.publish(prefix, source);
    await store.fetch(prefix, path.join(root, 'a'));
    assert.equal(digest(path.join(root, 'a', 'mem')), digest(path.join(source, 'mem')));

    await server.pause();
    const other = generationPrefix('mvm-01jtestsnapshotstore00002', 2);
    await assert.rejects(store.publish(other, source), (error: unknown) => isCocoonError(error, 'object_store_unavailable'));
    await assert.rejects(store.fetch(prefix, path.join(root, 'b')), (error: unknown) => isCocoonError(error, 'object_store_unavailable'));
    assert.equal(fs.existsSync(path.join(root, 'b')), false);
    await server.resume();
    await store.publish(other, source);
    await store.fetch(other, path.join(root, 'b'));
    assert.equal(digest(path.join(root, 'b', 'disk.raw')), digest(path.join(source, 'disk.raw')));
  });
});
