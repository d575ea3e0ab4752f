/**
 * Memory diffs without a VM (src/vmm/mem-diff.ts, cocoon-sparse diff/undiff): a snapshot's
 * memory turned into a diff against a base and rebuilt gives the same bytes back; a damaged
 * diff, a damaged base and the wrong base are refused, and nothing is left of a refused rebuild.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { describe, test } from 'node:test';
import { diffSnapshotMemory, MEMORY_DIFF_NAME, prepareMemoryDiff, restoreMemoryDiff } from '../../src/vmm/mem-diff.ts';
import { runSparseHelper } from '../../src/vmm/native/helper.ts';
import { readSnapshotManifest } from '../../src/vmm/snapshot.ts';
import { MEMORY, memFile, PAGE, page, snapshot } from '../support/mem-snapshot.ts';
import { useTempDir } from '../support/vm.ts';

function flip(file: string, at: number): void {
  const fd = fs.openSync(file, 'r+');
  const one = Buffer.alloc(1);
  fs.readSync(fd, one, 0, 1, at);
  one[0]! ^= 0x01;
  fs.writeSync(fd, one, 0, 1, at);
  fs.closeSync(fd);
}

describe('memory diffs', () => {
  test('a diff keeps only the changed pages, and rebuilds the memory byte for byte; damage and the wrong base are refused', async (t) => {
    const dir = useTempDir(t, 'cocoon-memdiff-');
    const base = path.join(dir, 'base');
    const current = path.join(dir, 'current');
    const basePages = new Map<number, Buffer>(Array.from({ length: 600 }, (_, i) => [i * 3, page()]));
    await snapshot(base, basePages);
    // The guest's memory: mostly the base's, some pages changed, one zeroed where the base has
    // data, some written where the base has a hole, the last page too.
    const now = new Map(basePages);
    for (const index of [0, 3, 300, 1200]) now.set(index, page());
    now.set(6, page(0));
    for (const index of [1, 2, 1000, 2047]) now.set(index, page());
    await snapshot(current, now);
    const whole = fs.readFileSync(path.join(current, 'mem'));

    const result = await diffSnapshotMemory(current, base, { durable: true });
    assert.ok(result);
    assert.equal(result.diffPages, 9, 'the changed pages only');
    assert.equal(result.pages, MEMORY / PAGE);
    const manifest = await readSnapshotManifest(current);
    assert.equal(manifest.files.mem.name, MEMORY_DIFF_NAME);
    assert.equal(manifest.files.mem.sizeBytes, fs.statSync(path.join(current, MEMORY_DIFF_NAME)).size);
    assert.equal(manifest.files.mem.sizeBytes, PAGE + PAGE + 9 * PAGE, 'header, bitmap, pages');
    assert.equal(fs.existsSync(path.join(current, 'mem')), false, 'the whole memory file is gone');
    assert.equal(await diffSnapshotMemory(current, base, { durable: true }), undefined, 'a diff is not diffed again');

    const target = path.join(dir, 'rebuilt');
    await restoreMemoryDiff({ dir: current, manifest, baseDir: base, target, verify: true, alsoVerifyDisk: true });
    assert.ok(fs.readFileSync(target).equals(whole), 'the memory, byte for byte');
    fs.rmSync(target);
    await restoreMemoryDiff({ dir: current, manifest, baseDir: base, target, verify: false });
    assert.ok(fs.readFileSync(target).equals(whole), 'unverified (a fork point of this process) too');
    fs.rmSync(target);

    const refused = async (message: RegExp, options: { baseDir?: string } = {}) => {
      await assert.rejects(
        restoreMemoryDiff({ dir: current, manifest, baseDir: options.baseDir ?? base, target, verify: true }),
        (error: { code?: string; message: string }) => error.code === 'snapshot_corrupt' && message.test(error.message),
      );
      assert.equal(fs.existsSync(target), false, 'nothing is left of a refused rebuild');
    };
    await refused(/no image snapshot was given/, { baseDir: '' });

    // Another base (same size, other content) is not the one the diff stands on.
    const other = path.join(dir, 'other');
    await snapshot(other, new Map([[5, page()]]));
    await refused(/diff against another base/, { baseDir: other });

    // A flipped byte in a page of the diff.
    const diffFile = path.join(current, MEMORY_DIFF_NAME);
    flip(diffFile, 2 * PAGE + 100);
    await refused(/mem\.diff does not match its checksum/);
    flip(diffFile, 2 * PAGE + 100);

    // A bitmap that does not match the page count (a bit moved).
    flip(diffFile, PAGE);
    await refused(/not a valid memory diff|does not match its checksum/);
    flip(diffFile, PAGE);

    // A flipped byte in the base, where the diff takes the base's page.
    flip(path.join(base, 'mem'), 9 * PAGE + 7);
    await refused(/mem does not match its checksum/);
    flip(path.join(base, 'mem'), 9 * PAGE + 7);

    await restoreMemoryDiff({ dir: current, manifest, baseDir: base, target, verify: true });
    assert.ok(fs.readFileSync(target).equals(whole), 'the repaired files restore again');
  });

  test('the narrow compare of a suspend finds every page written into a reserved RAM file: dirty, written back, zeros over data', async (t) => {
    const dir = useTempDir(t, 'cocoon-memdiff-');
    const base = path.join(dir, 'base');
    const basePages = new Map<number, Buffer>(Array.from({ length: 600 }, (_, i) => [i * 3, page()]));
    await snapshot(base, basePages);
    // A RAM file as a restore leaves it: the base's pages written, the rest reserved (unwritten
    // extents), synced; then many pages only read (cached zeros over unwritten extents, which
    // SEEK_DATA reports as data and the narrow compare skips).
    const ram = path.join(dir, 'ram');
    memFile(ram, basePages);
    await runSparseHelper(['alloc', ram]);
    const fd = fs.openSync(ram, 'r+');
    t.after(() => fs.closeSync(fd));
    fs.fsyncSync(fd);
    const scratch = Buffer.alloc(PAGE);
    for (let index = 0; index < MEMORY / PAGE; index++) if (!basePages.has(index)) fs.readSync(fd, scratch, 0, PAGE, index * PAGE);
    const write = (index: number, data: Buffer) => fs.writeSync(fd, data, 0, PAGE, index * PAGE);
    // Written and written back (its extent converted to written) ...
    write(1000, page());
    write(301, page());
    fs.fsyncSync(fd);
    // ... and dirty, not written back: over unwritten extents (a page read before, one not),
    // over the base's data, zeros over the base's data, zeros where the base has none (no change).
    for (const index of [1, 2, 2047, 1501]) write(index, page());
    for (const index of [0, 300]) write(index, page());
    write(6, page(0));
    write(1700, page(0));
    const changed = [0, 1, 2, 6, 300, 301, 1000, 1501, 2047];

    const diffs: Buffer[] = [];
    for (const narrow of [false, true]) {
      const outFile = path.join(dir, `mem-${narrow}.diff`);
      const held = await prepareMemoryDiff({ baseDir: base, memFile: ram, outFile, memoryBytes: MEMORY, durable: false, narrow });
      assert.ok(held);
      const made = await held.go();
      assert.equal(made.diffPages, changed.length, `every changed page, no other (narrow: ${narrow})`);
      diffs.push(fs.readFileSync(outFile));
    }
    assert.ok(diffs[0]!.equals(diffs[1]!), 'the narrow compare writes the same diff, byte for byte');
    const bitmap = diffs[1]!.subarray(PAGE, 2 * PAGE);
    for (const index of changed) assert.equal((bitmap[index >> 3]! >> (index & 7)) & 1, 1, `page ${index} is in the diff`);
  });
});
