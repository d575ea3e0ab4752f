/**
 * Memory diffs (docs/vmm.md "Memory diffs"): a suspended microVM's snapshot keeps only the
 * memory pages that differ from its image's, as `mem.diff` next to a manifest that names the
 * base's checksum; a restore rebuilds the RAM file from the base and the diff. The format and
 * the page comparison are in the native helper (`cocoon-sparse diff` / `undiff`).
 *
 * A suspend makes the diff inside its snapshot's commit (`prepareMemoryDiff`, called by the
 * driver's `snapshot` when given `memoryBase`): the diff is compared straight from the paused
 * VM's RAM file while the device state is saved, and only the diff is written and synced; the
 * whole memory file never enters the snapshot. `diffSnapshotMemory` turns a committed snapshot
 * with whole memory into its diff form afterwards (the old way, and the fallback).
 *
 * Guarantees kept from whole-memory snapshots:
 * - crash safety: the diff is written and synced beside the committed memory file, the manifest
 *   that names it is written aside, synced and renamed over the old one, and only then is the
 *   whole memory file removed: the snapshot is valid (whole or diff) at every moment;
 * - nothing restored unverified: the diff is checksummed as it is read for the restore, and the
 *   base is checked against its own manifest's checksum (once per file identity:
 *   verified-files.ts), and must be the base the diff was made against.
 */
import fs from 'node:fs';
import path from 'node:path';
import { CocoonError, errorMessage, isCocoonError } from '../common/errors.ts';
import { fsyncDir } from '../common/fs.ts';
import { log } from '../common/log.ts';
import { startHeldDiff } from './native/diff-server.ts';
import { runSparseHelper, startHeldHelper } from './native/helper.ts';
import { reservesRam } from './ram-file.ts';
import { checkDataChecksum, dataChecksumKey, parseChecksumLine, readSnapshotManifest, verifySnapshotData } from './snapshot.ts';
import { admitRam } from './space-ledger.ts';
import type { SnapshotManifest } from './types.ts';
import { type FileIdentity, identityBeforeReading, isVerified, rememberVerified } from './verified-files.ts';

export const MEMORY_DIFF_NAME = 'mem.diff';

export interface MemoryDiffResult {
  /** Pages in the diff, and in the whole memory. */
  diffPages: number;
  pages: number;
  /** The diff file's size. */
  diffBytes: number;
  /** How long the comparison and writing the diff took (the helper's run), ms. */
  compareMs: number;
}

function corrupt(dir: string, why: string): CocoonError {
  return new CocoonError('snapshot_corrupt', `snapshot ${dir} is unusable: ${why}`, { status: 422 });
}

/** Whether a snapshot's memory is a diff (then a restore needs its base). */
export function isMemoryDiff(manifest: SnapshotManifest): boolean {
  return manifest.files.mem.base !== undefined;
}

/**
 * Turns the committed snapshot in `dir` into its diff form against the memory of the snapshot
 * in `baseDir` (an image's). Answers undefined, changing nothing, when the snapshot is a diff
 * already or cannot stand on that base (another memory size, no checksums). The base is
 * verified first: a diff against damaged base pages would be restored onto the intact ones.
 */
export async function diffSnapshotMemory(dir: string, baseDir: string, options: { durable: boolean }): Promise<MemoryDiffResult | undefined> {
  const manifest = await readSnapshotManifest(dir);
  const base = await readSnapshotManifest(baseDir);
  const { mem } = manifest.files;
  if (mem.base || base.files.mem.base || !mem.checksum || !base.files.mem.checksum) return undefined;
  if (base.shape.memoryMiB !== manifest.shape.memoryMiB) return undefined;
  await verifySnapshotData(baseDir, base, ['mem']);
  const memFile = path.join(dir, mem.name);
  const diffFile = path.join(dir, MEMORY_DIFF_NAME);
  await fs.promises.rm(diffFile, { force: true }); // a leftover of an interrupted diff
  const started = performance.now();
  const out = await runSparseHelper(['diff', path.join(baseDir, base.files.mem.name), memFile, diffFile, ...(options.durable ? ['sync'] : [])]);
  const compareMs = performance.now() - started;
  const [sumLine = '', countLine = ''] = out.trim().split('\n');
  const checksum = parseChecksumLine(sumLine);
  const [diffPages, pages] = countLine.split(' ').map(Number) as [number, number];
  const diffBytes = (await fs.promises.stat(diffFile)).size;
  const next: SnapshotManifest = {
    ...manifest,
    files: {
      ...manifest.files,
      mem: {
        name: MEMORY_DIFF_NAME,
        sizeBytes: diffBytes,
        checksum,
        base: { checksum: base.files.mem.checksum, sizeBytes: manifest.shape.memoryMiB * 1024 * 1024 },
        memoryChecksum: mem.checksum,
      },
    },
  };
  await replaceManifest(dir, next, options.durable);
  await fs.promises.rm(memFile, { force: true });
  return { diffPages, pages, diffBytes, compareMs };
}

/** A memory diff prepared for a snapshot's commit: the helper started, held until the VM is paused. */
export interface HeldMemoryDiff {
  /**
   * Lets the helper compare the RAM file (which must not change any more: the vCPUs are
   * stopped) with the base and write the diff (synced when durable). Answers the manifest's
   * `files.mem` for it, and the page counts.
   */
  go(): Promise<{ mem: SnapshotManifest['files']['mem']; diffPages: number; pages: number }>;
  /** Ends the helper; the caller removes what it wrote. */
  cancel(): void;
}

/**
 * Prepares the memory diff of a snapshot being taken: `memFile` (a VM's RAM file, `memoryBytes`
 * long) against the memory of the snapshot in `baseDir` (an image's), into `outFile`. Answers
 * undefined when the memory cannot stand on that base (another size, a diff itself, no
 * checksum). The base is verified first (once per file identity, verified-files.ts): a diff
 * against damaged base pages would be restored onto the intact ones. Everything that does not
 * need the paused VM (the base checked, the helper started, the files opened) happens here.
 */
export async function prepareMemoryDiff(options: { baseDir: string; memFile: string; outFile: string; memoryBytes: number; durable: boolean; narrow?: boolean; server?: boolean; threads?: number }): Promise<HeldMemoryDiff | undefined> {
  const base = await readSnapshotManifest(options.baseDir);
  const baseMem = base.files.mem;
  if (baseMem.base || !baseMem.checksum || base.shape.memoryMiB * 1024 * 1024 !== options.memoryBytes) return undefined;
  await verifySnapshotData(options.baseDir, base, ['mem']);
  await fs.promises.rm(options.outFile, { force: true });
  // `narrow`: only the RAM file's pages written since it was reserved are compared, and where
  // the base holds zeros the base is not read (cocoon-sparse.c `mark_written`; issue 12).
  const args = ['diff', path.join(options.baseDir, baseMem.name), options.memFile, options.outFile, ...(options.durable ? ['sync'] : []), ...(options.narrow ? ['narrow'] : []), ...(options.threads && options.threads > 1 ? [`threads=${options.threads}`] : [])];
  // `server`: a job of this process's long-lived helper (diff-server.ts), not a helper started
  // for this diff; should the server fail it, a helper of its own (a real failure fails again).
  let held: Awaited<ReturnType<typeof startHeldHelper>> | undefined;
  if (options.server) {
    held = await startHeldDiff(args).catch(async (error: unknown) => {
      log.debug({ error: errorMessage(error) }, 'the memory diff server could not take a diff; starting a helper for it');
      await fs.promises.rm(options.outFile, { force: true });
      return undefined;
    });
  }
  held ??= await startHeldHelper([...args, 'wait']);
  const baseChecksum = baseMem.checksum;
  return {
    go: async () => {
      const [sumLine = '', countLine = ''] = (await held.go()).trim().split('\n');
      const [diffPages, pages] = countLine.split(' ').map(Number) as [number, number];
      return {
        mem: { name: MEMORY_DIFF_NAME, sizeBytes: Number(sumLine.trim().split(' ')[2]), checksum: parseChecksumLine(sumLine), base: { checksum: baseChecksum, sizeBytes: options.memoryBytes } },
        diffPages,
        pages,
      };
    },
    cancel: held.cancel,
  };
}

/** Writes `manifest.json` aside, syncs it and renames it over the old one (one atomic step). */
async function replaceManifest(dir: string, manifest: SnapshotManifest, durable: boolean): Promise<void> {
  const file = path.join(dir, 'manifest.json');
  const temp = `${file}.next`;
  await fs.promises.rm(temp, { force: true });
  const handle = await fs.promises.open(temp, 'wx', 0o600);
  try {
    await handle.writeFile(JSON.stringify(manifest, null, 2));
    if (durable) await handle.sync();
  } finally {
    await handle.close();
  }
  await fs.promises.rename(temp, file);
  if (durable) await fsyncDir(dir);
}

/**
 * Builds the RAM file `target` of the diff-form snapshot in `dir` on the memory of `baseDir`.
 * With `verify`, the diff (and `alsoVerifyDisk`, the snapshot's disk, in the same helper run)
 * are checksummed as they are read, and the base is checked against its manifest unless it was
 * verified before and is unchanged since (then its identity is checked again once the file is
 * built, so a change meanwhile is caught). Every failure removes `target`.
 */
export async function restoreMemoryDiff(options: {
  dir: string;
  manifest: SnapshotManifest;
  baseDir: string | undefined;
  target: string;
  verify: boolean;
  alsoVerifyDisk?: boolean;
  /** `target` exists already (mapped by a QEMU waiting for its device state: qemu/pool.ts) and is emptied first. */
  into?: boolean;
  /**
   * `target` (with `into`) holds the base's memory already, copied ahead (qemu/pool.ts) from the
   * base file when it had this identity (verified-files.ts). Used only while the base is still
   * that file and remembered as verified in that identity: then only the diff's pages are
   * written. Otherwise the base is copied as without it.
   */
  onBase?: FileIdentity;
}): Promise<'on_base' | undefined> {
  const { dir, manifest, target } = options;
  const { mem, disk } = manifest.files;
  if (!mem.base) throw new Error(`snapshot ${dir} holds whole memory, not a diff`);
  if (!options.baseDir) throw corrupt(dir, 'its memory is a diff against its image\'s, and no image snapshot was given');
  const base = await readSnapshotManifest(options.baseDir);
  if (base.files.mem.base || base.files.mem.checksum?.value !== mem.base.checksum.value || base.shape.memoryMiB * 1024 * 1024 !== mem.base.sizeBytes) {
    throw corrupt(dir, `its memory is a diff against another base than ${options.baseDir}`);
  }
  const baseFile = path.join(options.baseDir, base.files.mem.name);
  const diffFile = path.join(dir, mem.name);
  const diskFile = path.join(dir, disk.name);
  // The RAM file is admitted by the space ledger first and reserved only when small (ram-file.ts).
  await admitRam(target, mem.base.sizeBytes, `a VM from ${dir}`);
  const reserve = reservesRam(mem.base.sizeBytes) ? ['reserve'] : [];
  let onBase = false;
  const run = async (args: string[]): Promise<string> => {
    try {
      return await runSparseHelper(['undiff', baseFile, diffFile, target, ...reserve, ...(options.into ? ['into'] : []), ...(onBase ? ['onbase'] : []), ...args]);
    } catch (error) {
      await fs.promises.rm(target, { force: true });
      if (isCocoonError(error, 'no_space') || isCocoonError(error, 'helper_missing')) throw error;
      throw corrupt(dir, `its memory cannot be rebuilt from the diff: ${(error as Error).message}`);
    }
  };
  const baseKey = dataChecksumKey(base.files.mem.checksum)!;
  // The base copied ahead counts only while the base file is what was copied and (when this
  // restore verifies) what was verified: the same identity all three times.
  const copiedAhead = async (): Promise<boolean> =>
    options.into === true && options.onBase !== undefined && (await identityBeforeReading(baseFile)) === options.onBase && (!options.verify || (await isVerified(baseFile, baseKey)));
  onBase = await copiedAhead();
  if (!options.verify) {
    await run([]);
    return onBase ? 'on_base' : undefined;
  }
  const withDisk = options.alsoVerifyDisk === true;
  const check = async (withBase: boolean): Promise<void> => {
    const files = [diffFile, ...(withDisk ? [diskFile] : []), ...(withBase ? [baseFile] : [])];
    const before = await Promise.all(files.map((file) => identityBeforeReading(file)));
    const lines = (await run([...(withBase ? ['sumbase'] : []), 'sum', ...(withDisk ? ['--', diskFile] : [])])).trim().split('\n');
    try {
      const sums = lines.map(parseChecksumLine);
      if (withBase) {
        const baseSum = sums.shift();
        if (baseSum?.value !== base.files.mem.checksum?.value) throw corrupt(options.baseDir!, `${base.files.mem.name} does not match its checksum`);
      }
      checkDataChecksum(dir, manifest, 'mem', sums[0]);
      if (withDisk) checkDataChecksum(dir, manifest, 'disk', sums[1]);
    } catch (error) {
      await fs.promises.rm(target, { force: true });
      throw error;
    }
    const keys = [dataChecksumKey(mem.checksum)!, ...(withDisk ? [dataChecksumKey(disk.checksum)!] : []), ...(withBase ? [baseKey] : [])];
    await Promise.all(files.map((file, index) => rememberVerified(file, before[index], keys[index]!)));
  };
  if (await isVerified(baseFile, baseKey)) {
    await check(false);
    if (await isVerified(baseFile, baseKey) && (!onBase || (await copiedAhead()))) return onBase ? 'on_base' : undefined;
    await fs.promises.rm(target, { force: true });
  }
  onBase = false;
  await check(true);
  return undefined;
}
