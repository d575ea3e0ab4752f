/**
 * Snapshot files verified once and remembered against the file's identity, so that restoring an
 * image snapshot again (every launch) does not read and checksum its memory file and disk anew.
 *
 * A file counts as verified when its checksum matched the manifest's and it still has the same
 * identity as when it was read: path, device, inode, size, and modification, change and birth
 * times in nanoseconds. Any write to it moves its mtime and ctime; truncating or extending it
 * changes its size; another file renamed or copied into its place has another inode and a new
 * ctime and birth time; and no program can set a ctime (touch, `cp -a` and utimes set mtime
 * only). A file is remembered only when its times are older than SETTLED_NS when it is read:
 * timestamps come from a clock that ticks every few milliseconds, so a write in the same tick as
 * the read could otherwise leave them as they were. What bypasses the file system (bits rotting
 * on the device, writes to the raw block device) is not seen again until the daemon restarts:
 * the memory is per process, and every process verifies each file in full the first time.
 */
import fs from 'node:fs';
import path from 'node:path';

const SETTLED_NS = 2_000_000_000n;
/** Bound on remembered files (image snapshots have three each); the oldest are forgotten first. */
const MAX_ENTRIES = 4096;

/** A file's identity as of one stat, or undefined when it cannot be remembered (missing, too fresh). */
export type FileIdentity = string;

const remembered = new Map<string, { identity: FileIdentity; checksum: string }>();
let hits = 0;

function identityOf(stat: fs.BigIntStats): FileIdentity {
  return [stat.dev, stat.ino, stat.size, stat.mtimeNs, stat.ctimeNs, stat.birthtimeNs].join(':');
}

async function statOf(file: string): Promise<fs.BigIntStats | undefined> {
  try {
    return await fs.promises.stat(file, { bigint: true });
  } catch {
    return undefined;
  }
}

/**
 * The file's identity before it is read for a verification; undefined when the file was changed
 * too recently to be remembered (or is missing): it is verified in full, and again next time.
 */
export async function identityBeforeReading(file: string): Promise<FileIdentity | undefined> {
  const stat = await statOf(file);
  if (!stat) return undefined;
  const settledBefore = BigInt(Date.now()) * 1_000_000n - SETTLED_NS;
  if (stat.mtimeNs > settledBefore || stat.ctimeNs > settledBefore) return undefined;
  return identityOf(stat);
}

/** Whether `file` was verified against `checksum` and is, by its identity, the same file still. */
export async function isVerified(file: string, checksum: string | undefined): Promise<boolean> {
  if (!checksum) return false;
  const entry = remembered.get(path.resolve(file));
  if (!entry || entry.checksum !== checksum) return false;
  const stat = await statOf(file);
  if (!stat || identityOf(stat) !== entry.identity) {
    remembered.delete(path.resolve(file));
    return false;
  }
  hits++;
  return true;
}

/**
 * Remembers that `file` matched `checksum` when read with identity `before` (from
 * identityBeforeReading), if it still has that identity now: a change while it was read is
 * not remembered.
 */
export async function rememberVerified(file: string, before: FileIdentity | undefined, checksum: string): Promise<void> {
  if (!before) return;
  const stat = await statOf(file);
  if (!stat || identityOf(stat) !== before) return;
  const key = path.resolve(file);
  remembered.delete(key);
  remembered.set(key, { identity: before, checksum });
  while (remembered.size > MAX_ENTRIES) remembered.delete(remembered.keys().next().value as string);
}

/** How many verifications were skipped because the file was remembered (tests, benchmarks). */
export function verifiedFileHits(): number {
  return hits;
}

/** Forgets every remembered file (benchmarks measure the full check with it). */
export function forgetVerifiedFiles(): void {
  remembered.clear();
}
