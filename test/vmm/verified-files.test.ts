/**
 * Verifications remembered against a file's identity (src/vmm/verified-files.ts): what must
 * still be caught once a file was verified. No VM: plain files (the restore path is covered in
 * test/reliability/snapshot-integrity.test.ts).
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { identityBeforeReading, isVerified, rememberVerified } from '../../src/vmm/verified-files.ts';
import { useTempDir } from '../support/vm.ts';

const SUM = 'xxh64-pages:0123456789abcdef';

/** Like a write that puts the file's times back afterwards (what touch -d or cp -a can do). */
function withTimesKept(file: string, change: () => void): void {
  const { atime, mtime } = fs.statSync(file);
  change();
  fs.utimesSync(file, atime, mtime);
}

test('a remembered file stays verified only while it is the same file, unchanged', async (t) => {
  const dir = useTempDir(t, 'cocoon-verified-');
  const names = ['same', 'content', 'longer', 'shorter', 'replaced', 'removed', 'fresh'];
  for (const name of names) fs.writeFileSync(path.join(dir, name), Buffer.alloc(8192, 7));
  // Changed in the last 2 s: not remembered (coarse timestamps); wait until all are settled.
  await new Promise((resolve) => setTimeout(resolve, 2100));
  fs.writeFileSync(path.join(dir, 'fresh'), Buffer.alloc(8192, 7));
  const file = (name: string) => path.join(dir, name);
  for (const name of names) await rememberVerified(file(name), await identityBeforeReading(file(name)), SUM);

  assert.equal(await isVerified(file('same'), SUM), true, 'unchanged: taken as verified');
  assert.equal(await isVerified(file('same'), 'xxh64-pages:fedcba9876543210'), false, 'not against another checksum');
  assert.equal(await isVerified(file('fresh'), SUM), false, 'a file changed moments before it was read is not remembered');

  withTimesKept(file('content'), () => {
    const fd = fs.openSync(file('content'), 'r+');
    fs.writeSync(fd, Buffer.from([8]), 0, 1, 100);
    fs.closeSync(fd);
  });
  assert.equal(await isVerified(file('content'), SUM), false, 'a byte changed, times put back');

  withTimesKept(file('longer'), () => fs.truncateSync(file('longer'), 12288));
  assert.equal(await isVerified(file('longer'), SUM), false, 'extended');
  withTimesKept(file('shorter'), () => fs.truncateSync(file('shorter'), 4096));
  assert.equal(await isVerified(file('shorter'), SUM), false, 'truncated');

  const other = path.join(dir, 'other');
  fs.writeFileSync(other, Buffer.alloc(8192, 7)); // the same content even
  const { atime, mtime } = fs.statSync(file('replaced'));
  fs.utimesSync(other, atime, mtime);
  fs.renameSync(other, file('replaced'));
  assert.equal(await isVerified(file('replaced'), SUM), false, 'replaced by another file with the same size and times');

  fs.rmSync(file('removed'));
  assert.equal(await isVerified(file('removed'), SUM), false, 'gone');
  fs.writeFileSync(file('removed'), Buffer.alloc(8192, 7));
  assert.equal(await isVerified(file('removed'), SUM), false, 'made again under the same name');
});

test('a file changed while it was being read is not remembered', async (t) => {
  const dir = useTempDir(t, 'cocoon-verified-');
  const file = path.join(dir, 'f');
  fs.writeFileSync(file, Buffer.alloc(4096, 1));
  await new Promise((resolve) => setTimeout(resolve, 2100));
  const before = await identityBeforeReading(file);
  assert.ok(before);
  fs.appendFileSync(file, 'x'); // during the (imagined) read
  await rememberVerified(file, before, SUM);
  assert.equal(await isVerified(file, SUM), false);
});
