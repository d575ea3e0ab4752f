/**
 * The space ledger (src/vmm/space-ledger.ts) on the real filesystem of the temp directory: a RAM
 * file is admitted only where free space, less what live RAM files may still claim, holds it
 * whole. No VM: sparse files stand for RAM files.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, test } from 'node:test';
import { isCocoonError } from '../../src/common/errors.ts';
import { admitRam, assertRoomForRam, promisedBytes, releaseRam } from '../../src/vmm/space-ledger.ts';
import { cleanupDir, tempDir } from '../support/vm.ts';

const dir = tempDir('cocoon-ledger-');
after(() => cleanupDir(dir));

const free = () => {
  const stats = fs.statfsSync(dir);
  return stats.bavail * stats.bsize;
};
const noSpace = (error: unknown) => {
  assert.ok(isCocoonError(error, 'no_space'), String(error));
  assert.equal(error.status, 507);
  assert.match(error.message, /no space left on the data directory's disk/);
  return true;
};

test('a RAM file bigger than the free space is refused; one that fits is admitted and promised until released', async () => {
  await assert.rejects(admitRam(path.join(dir, 'too-big'), free() + 1024 ** 3, 'a test VM'), noSpace);
  assert.equal(promisedBytes(dir), 0, 'a refused file promises nothing');

  // A sparse file admitted at 60 % of the free space: all of it is promised (nothing written yet).
  const size = Math.floor((free() * 0.6) / 4096) * 4096;
  const first = path.join(dir, 'first');
  await admitRam(first, size, 'a test VM');
  fs.writeFileSync(first, '');
  fs.truncateSync(first, size);
  assert.ok(promisedBytes(dir) >= size - 4096, 'the sparse file may still claim its size');
  // A second one of the same size would fit the free space, not the promise.
  await assert.rejects(admitRam(path.join(dir, 'second'), size, 'a test VM'), noSpace);
  await assert.rejects(assertRoomForRam(dir, size, 'a test VM'), noSpace);

  // Written blocks are no longer a promise: they are used.
  fs.writeFileSync(first, Buffer.alloc(1024 * 1024, 1), { flag: 'r+' });
  const fd = fs.openSync(first, 'r');
  fs.fdatasyncSync(fd);
  fs.closeSync(fd);
  assert.ok(promisedBytes(dir) <= size - 1024 * 1024 + 4096);

  releaseRam(first);
  assert.equal(promisedBytes(dir), 0);
  await assertRoomForRam(dir, size, 'a test VM');
  fs.rmSync(first);
});

test('a RAM file moved away (into a snapshot) grows no more', async () => {
  const file = path.join(dir, 'moved');
  await admitRam(file, 64 * 1024 * 1024, 'a test VM');
  fs.writeFileSync(file, '');
  fs.truncateSync(file, 64 * 1024 * 1024);
  assert.equal(promisedBytes(dir), 64 * 1024 * 1024);
  fs.renameSync(file, `${file}-snapshot`);
  assert.equal(promisedBytes(dir), 0);
  releaseRam(file);
});
