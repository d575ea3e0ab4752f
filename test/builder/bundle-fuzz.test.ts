import assert from 'node:assert/strict';
import { readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { test } from 'node:test';
import fc from 'fast-check';
import { isCocoonError } from '../../src/common/errors.ts';
import { unpackBundle } from '../../src/builder/bundle.ts';
import { DOCKERFILE, tarGz, workDir, ZIP_DOCKERFILE, zipArchive } from './bundle-fixtures.ts';

const tarSample = tarGz([
  DOCKERFILE,
  { path: 'dir/', type: 'Directory' },
  { path: 'dir/a.txt', data: 'a'.repeat(3000) },
  { path: 'dir/link', type: 'SymbolicLink', linkpath: 'a.txt' },
  { path: 'b.bin', data: Buffer.from(Array.from({ length: 20_000 }, (_, i) => (i * 31) % 251)) },
]);
const zipSample = zipArchive([
  ZIP_DOCKERFILE,
  { name: 'dir/' },
  { name: 'dir/a.txt', data: 'a'.repeat(3000) },
  { name: 'b.bin', data: Buffer.from(Array.from({ length: 20_000 }, (_, i) => (i * 31) % 251)), method: 'store' },
]);

/**
 * Truncated and bit-flipped archives, fed in random chunk sizes: every run must end (no hang),
 * with either a complete directory or a CocoonError and nothing left behind.
 */
for (const [format, sample] of [['tar.gz', tarSample], ['zip', zipSample]] as const) {
  test(`property: damaged ${format} bundles fail cleanly or unpack, never hang or leave debris`, async (t) => {
    const { parent } = await workDir(t);
    let run = 0;
    await fc.assert(
      fc.asyncProperty(
        fc.integer({ min: 0, max: sample.length }),
        fc.array(fc.tuple(fc.nat(), fc.integer({ min: 1, max: 255 })), { maxLength: 3 }),
        fc.integer({ min: 1, max: 5000 }),
        async (cut, flips, chunkSize) => {
          const damaged = Buffer.from(sample.subarray(0, cut));
          for (const [at, mask] of flips) {
            if (damaged.length > 0) damaged[at % damaged.length] = (damaged[at % damaged.length] as number) ^ mask;
          }
          const dest = join(parent, `ctx-${run++}`);
          const source = Readable.from((function* () {
            for (let i = 0; i < damaged.length; i += chunkSize) yield damaged.subarray(i, i + chunkSize);
          })());
          let timer: NodeJS.Timeout | undefined;
          const timeout = new Promise<never>((_, reject) => { timer = setTimeout(() => reject(new Error('hung')), 5000); });
          try {
            await Promise.race([unpackBundle(source, dest), timeout]);
            assert.ok((await readdir(dest)).includes('Dockerfile'));
          } catch (error) {
            assert.ok(isCocoonError(error), `not a CocoonError: ${String(error)}`);
            assert.ok(!(await readdir(parent)).includes(`ctx-${run - 1}`), 'the failed directory is gone');
          } finally {
            clearTimeout(timer);
          }
          assert.ok((await readdir(parent)).every((name) => !name.includes('spool')), 'no spool file left');
        },
      ),
      { numRuns: Number(process.env.COCOON_FUZZ_RUNS ?? 150) },
    );
  });
}
