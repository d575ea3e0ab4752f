/**
 * A suspend's memory diff made inside the snapshot commit, without a VM (src/vmm/snapshot-memory.ts
 * over `cocoon-sparse diff … wait`): the helper is held until the RAM file stops changing, the
 * diff it writes is the one `diffSnapshotMemory` writes and rebuilds the memory byte for byte, the
 * RAM file is left where it is; a diff that cannot be made gives a whole, checksummed memory file
 * instead; a base that cannot carry it gives no diff at all.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { describe, test } from 'node:test';
import { diffSnapshotMemory, MEMORY_DIFF_NAME, restoreMemoryDiff } from '../../src/vmm/mem-diff.ts';
import { startMemoryDiff } from '../../src/vmm/snapshot-memory.ts';
import { dataChecksums, readSnapshotManifest } from '../../src/vmm/snapshot.ts';
import { MEMORY, memFile, PAGE, page, snapshot } from '../support/mem-snapshot.ts';
import { useTempDir } from '../support/vm.ts';

describe('memory diffs made in the snapshot commit', () => {
  test('the held helper diffs the RAM file as it is at go, as diffSnapshotMemory would, and leaves the RAM file in place', async (t) => {
    const dir = useTempDir(t, 'cocoon-snapmem-');
    const base = path.join(dir, 'base');
    const basePages = new Map<number, Buffer>(Array.from({ length: 600 }, (_, i) => [i * 3, page()]));
    await snapshot(base, basePages);
    const ram = path.join(dir, 'run', 'mem');
    fs.mkdirSync(path.dirname(ram));
    const now = new Map(basePages);
    for (const index of [0, 3, 1200]) now.set(index, page());
    memFile(ram, now);
    const partial = path.join(dir, 'gen.partial');
    fs.mkdirSync(partial);

    const memory = await startMemoryDiff({ vm: 'test', baseDir: base, ramPath: ram, partial, memoryBytes: MEMORY, durable: true });
    assert.ok(memory, 'the base can carry the diff');
    // Written after the helper was started and before it is let go (the guest ran on until the
    // pause): the diff holds what the RAM file holds at go.
    now.set(6, page(0));
    now.set(2047, page());
    memFile(ram, now);
    const whole = fs.readFileSync(ram);
    memory.go();
    const entry = await memory.finish(path.join(partial, 'mem'), () => assert.fail('nothing is moved'));
    assert.equal(entry.name, MEMORY_DIFF_NAME);
    assert.ok(entry.base, 'the entry names its base');
    assert.equal(entry.base.sizeBytes, MEMORY);
    assert.deepEqual(entry.base.checksum, (await readSnapshotManifest(base)).files.mem.checksum);
    const diffFile = path.join(partial, MEMORY_DIFF_NAME);
    assert.equal(entry.sizeBytes, fs.statSync(diffFile).size);
    assert.equal(entry.sizeBytes, PAGE + PAGE + 5 * PAGE, 'header, bitmap, the five changed pages');
    assert.deepEqual(entry.checksum, (await dataChecksums([diffFile]))[0]);
    assert.ok(fs.readFileSync(ram).equals(whole), 'the RAM file is untouched and stays');
    assert.equal(fs.existsSync(path.join(partial, 'mem')), false);

    // Byte for byte what the old way (whole memory committed, then diffed) writes.
    const old = path.join(dir, 'old');
    await snapshot(old, now);
    await diffSnapshotMemory(old, base, { durable: false });
    assert.ok(fs.readFileSync(path.join(old, MEMORY_DIFF_NAME)).equals(fs.readFileSync(diffFile)), 'the same diff file');

    // And it rebuilds the memory.
    const manifest = await readSnapshotManifest(old);
    fs.copyFileSync(diffFile, path.join(old, MEMORY_DIFF_NAME));
    const target = path.join(dir, 'rebuilt');
    await restoreMemoryDiff({ dir: old, manifest: { ...manifest, files: { ...manifest.files, mem: entry } }, baseDir: base, target, verify: true });
    assert.ok(fs.readFileSync(target).equals(whole), 'the memory, byte for byte');
  });

  test('a diff that fails keeps the memory whole (moved, checksummed); a base of another size or damaged gives no diff', async (t) => {
    const dir = useTempDir(t, 'cocoon-snapmem-');
    const base = path.join(dir, 'base');
    await snapshot(base, new Map([[1, page()], [1500, page()]]));
    const partial = path.join(dir, 'gen.partial');
    fs.mkdirSync(partial);
    const ram = path.join(dir, 'ram');
    memFile(ram, new Map([[2, page()], [2000, page()]]));
    const memory = await startMemoryDiff({ vm: 'test', baseDir: base, ramPath: ram, partial, memoryBytes: MEMORY, durable: true });
    assert.ok(memory);
    // Cut short after the helper measured it: its reads of the base's data pages there fail (as a
    // read error of the RAM file would).
    fs.truncateSync(ram, MEMORY / 2);
    const [ramSum] = await dataChecksums([ram]);
    memory.go();
    const moved: string[][] = [];
    const whole = path.join(partial, 'mem');
    const entry = await memory.finish(whole, (from, to) => moved.push([from, to]));
    assert.deepEqual(moved, [[ram, whole]], 'the RAM file moved into the snapshot (an abandoned snapshot gives it back)');
    assert.deepEqual(entry, { name: 'mem', sizeBytes: MEMORY, checksum: ramSum });
    assert.equal(fs.existsSync(path.join(partial, MEMORY_DIFF_NAME)), false, 'no diff is left');

    const other = path.join(dir, 'other');
    fs.mkdirSync(other);
    memFile(path.join(other, 'ram'), new Map(), MEMORY);
    assert.equal(await startMemoryDiff({ vm: 'test', baseDir: base, ramPath: path.join(other, 'ram'), partial: other, memoryBytes: MEMORY * 2, durable: false }), undefined, 'another memory size');
    const baseMem = fs.openSync(path.join(base, 'mem'), 'r+');
    fs.writeSync(baseMem, Buffer.from('damage'), 0, 6, PAGE + 10);
    fs.closeSync(baseMem);
    assert.equal(await startMemoryDiff({ vm: 'test', baseDir: base, ramPath: path.join(other, 'ram'), partial: other, memoryBytes: MEMORY, durable: false }), undefined, 'a damaged base');
    assert.equal(fs.existsSync(path.join(other, MEMORY_DIFF_NAME)), false);
  });
});
