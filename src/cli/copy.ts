/**
 * Copying files and folders between this host and a microVM, with `docker cp`'s rules, over
 * the files API only (one request per file, mkdir per folder): images may have no tar and no
 * shell. Both ends are a `Side` (the local filesystem, or a microVM's through the SDK), so one
 * algorithm serves both directions.
 *
 * docker cp's rules, as implemented in `copy()`:
 * - a file onto a missing path: written there (its folder must exist); onto a file: replaced;
 *   onto a folder: written into it under its own name; onto `dir/` that does not exist: error.
 * - a folder onto a missing path: made, with the source's contents; onto a folder: copied into
 *   it under its own name, or — with `src/.` — its contents merged in; onto a file: error.
 * Symbolic links given as the source are followed; those inside a copied folder, and special
 * files, are skipped with a warning (the files API writes regular files and folders only, and a
 * guest's links must not steer writes on this host).
 */
import fs from 'node:fs';
import path from 'node:path';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import type { Cocoon, FileStat } from '../../packages/sdk/src/index.ts';
import { CliError, EXIT, UsageError } from './exit-codes.ts';

export type EntryType = 'file' | 'directory' | 'symlink' | 'other';

export interface Entry {
  name: string;
  type: EntryType;
  size: number;
  /** Permission bits. */
  mode: number;
}

export interface Side {
  /** How to name `p` in messages (`mvm-1:/etc/hosts`, `./out`). */
  describe(p: string): string;
  path: path.PlatformPath;
  /** The entry at `p` (following a symlink when `follow`); undefined when there is none. */
  stat(p: string, follow: boolean): Promise<Entry | undefined>;
  list(p: string): Promise<Entry[]>;
  mkdir(p: string, mode: number): Promise<void>;
  read(p: string): Promise<Blob | ReadableStream<Uint8Array>>;
  /** Writes a file; `nested` for files inside a copied folder (never through a symlink). */
  write(p: string, data: Blob | ReadableStream<Uint8Array>, mode: number, nested: boolean): Promise<void>;
}

export interface CopyReport {
  files: number;
  folders: number;
  bytes: number;
  /** What was left out, and why. */
  skipped: string[];
  /** Where the source landed. */
  target: string;
}

/** A name read from a listing must be one path segment (a hostile guest may send anything). */
function safeName(name: string): boolean {
  return name !== '' && name !== '.' && name !== '..' && !name.includes('/') && !name.includes('\0');
}

/** `a/b/.` → true: copy the folder's contents rather than the folder. */
function wantsContents(p: string): boolean {
  return p === '.' || p.endsWith('/.');
}

function baseName(side: Side, p: string): string {
  return side.path.basename(p.replace(/\/+$/, ''));
}

function notFound(side: Side, p: string): CliError {
  return new CliError('file_not_found', `${side.describe(p)}: no such file or folder`, EXIT.notFound);
}

export async function copy(src: Side, srcPath: string, dst: Side, dstPath: string, warn: (line: string) => void = () => undefined): Promise<CopyReport> {
  const report: CopyReport = { files: 0, folders: 0, bytes: 0, skipped: [], target: dstPath };
  const source = await src.stat(srcPath, true);
  if (!source) throw notFound(src, srcPath);
  const existing = await dst.stat(dstPath, true);
  const dstIsFolderPath = dstPath.endsWith('/') || wantsContents(dstPath);

  if (source.type === 'file') {
    let target = dstPath;
    if (existing?.type === 'directory') target = dst.path.join(dstPath, baseName(src, srcPath));
    else if (dstIsFolderPath) {
      throw new CliError('file_not_found', `${dst.describe(dstPath)}: the destination folder does not exist`, EXIT.notFound);
    } else if (existing && existing.type !== 'file') {
      throw new UsageError(`${dst.describe(dstPath)} is neither a file nor a folder: not replacing it`);
    }
    report.target = target;
    await copyFile(src, srcPath, source, dst, target, false, report);
    return report;
  }
  if (source.type !== 'directory') throw new UsageError(`${src.describe(srcPath)} is neither a file nor a folder`);

  let target: string;
  if (!existing) {
    target = dstPath;
    await dst.mkdir(target, source.mode);
    report.folders += 1;
  } else if (existing.type === 'directory') {
    const name = baseName(src, srcPath);
    if (wantsContents(srcPath) || name === '' || name === '/') target = dstPath;
    else {
      target = dst.path.join(dstPath, name);
      const inner = await dst.stat(target, false);
      if (!inner) {
        await dst.mkdir(target, source.mode);
        report.folders += 1;
      } else if (inner.type !== 'directory') {
        throw new UsageError(`cannot copy the folder ${src.describe(srcPath)} onto the file ${dst.describe(target)}`);
      }
    }
  } else {
    throw new UsageError(`cannot copy the folder ${src.describe(srcPath)} onto the file ${dst.describe(dstPath)}`);
  }
  report.target = target;
  await copyTree(src, srcPath, dst, target, report, warn);
  return report;
}

async function copyFile(src: Side, from: string, entry: Entry, dst: Side, to: string, nested: boolean, report: CopyReport): Promise<void> {
  const data = await src.read(from);
  await dst.write(to, data, entry.mode, nested);
  report.files += 1;
  report.bytes += entry.size;
}

async function copyTree(src: Side, from: string, dst: Side, to: string, report: CopyReport, warn: (line: string) => void): Promise<void> {
  const entries = await src.list(from);
  const seen = new Set<string>();
  for (const entry of entries) {
    if (!safeName(entry.name) || seen.has(entry.name)) {
      report.skipped.push(`${src.describe(from)}: an entry named ${JSON.stringify(entry.name)}`);
      warn(`cocoon: skipped ${src.describe(from)}: an entry named ${JSON.stringify(entry.name)}`);
      continue;
    }
    seen.add(entry.name);
    const childFrom = src.path.join(from, entry.name);
    const childTo = dst.path.join(to, entry.name);
    if (entry.type === 'file') {
      await copyFile(src, childFrom, entry, dst, childTo, true, report);
    } else if (entry.type === 'directory') {
      const there = await dst.stat(childTo, false);
      if (!there) {
        await dst.mkdir(childTo, entry.mode);
        report.folders += 1;
      } else if (there.type !== 'directory') {
        throw new UsageError(`cannot copy the folder ${src.describe(childFrom)} onto ${dst.describe(childTo)}, which is not a folder`);
      }
      await copyTree(src, childFrom, dst, childTo, report, warn);
    } else {
      const what = entry.type === 'symlink' ? 'a symbolic link' : 'a special file';
      report.skipped.push(`${src.describe(childFrom)} (${what})`);
      warn(`cocoon: skipped ${src.describe(childFrom)}: ${what}`);
    }
  }
}

// ------------------------------------------------------------------ the two sides

function typeOf(stat: fs.Stats): EntryType {
  if (stat.isFile()) return 'file';
  if (stat.isDirectory()) return 'directory';
  if (stat.isSymbolicLink()) return 'symlink';
  return 'other';
}

/** This host's filesystem. */
export function localSide(): Side {
  return {
    path,
    describe: (p) => p,
    async stat(p, follow) {
      try {
        const stat = follow ? await fs.promises.stat(p) : await fs.promises.lstat(p);
        return { name: path.basename(p), type: typeOf(stat), size: stat.size, mode: stat.mode & 0o7777 };
      } catch (error) {
        const code = (error as NodeJS.ErrnoException).code;
        if (code === 'ENOENT' || code === 'ENOTDIR') return undefined;
        throw new CliError('local_io', `cannot read ${p}: ${code ?? String(error)}`, EXIT.failure);
      }
    },
    async list(p) {
      const names = (await fs.promises.readdir(p)).sort();
      const out: Entry[] = [];
      for (const name of names) {
        const stat = await fs.promises.lstat(path.join(p, name));
        out.push({ name, type: typeOf(stat), size: stat.size, mode: stat.mode & 0o7777 });
      }
      return out;
    },
    async mkdir(p, mode) {
      // Owner rwx at least, so that the copy can fill it.
      await fs.promises.mkdir(p, { mode: (mode & 0o777) | 0o700 });
    },
    async read(p) {
      return fs.openAsBlob(p);
    },
    async write(p, data, mode, nested) {
      const flags = fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_TRUNC | (nested ? fs.constants.O_NOFOLLOW : 0);
      const stream = data instanceof Blob ? data.stream() : data;
      const handle = await fs.promises.open(p, flags, mode & 0o777);
      try {
        // An existing file keeps its mode through O_CREAT: set the source's.
        await handle.chmod(mode & 0o777);
      } catch (error) {
        await handle.close();
        throw error;
      }
      // The write stream owns the handle from here and closes it, also on errors.
      await pipeline(Readable.fromWeb(stream as import('node:stream/web').ReadableStream<Uint8Array>), handle.createWriteStream());
    },
  };
}

function fromStat(stat: FileStat): Entry {
  const mode = parseInt(stat.mode, 8);
  return { name: stat.name, type: stat.type, size: Number(stat.size) || 0, mode: Number.isInteger(mode) ? mode & 0o7777 : 0o644 };
}

/** A microVM's filesystem through the files API. */
export function remoteSide(client: Cocoon, microvm: string): Side {
  return {
    path: path.posix,
    describe: (p) => `${microvm}:${p}`,
    async stat(p) {
      try {
        return fromStat(await client.files.stat(microvm, p));
      } catch (error) {
        const code = (error as { code?: string; kind?: string }).code;
        if ((error as { kind?: string }).kind === 'not_found' && code !== 'microvm_not_found' && code !== 'not_found') return undefined;
        throw error;
      }
    },
    async list(p) {
      return (await client.files.list(microvm, p)).map(fromStat);
    },
    async mkdir(p, mode) {
      await client.files.mkdir(microvm, p, { mode: mode & 0o7777 });
    },
    async read(p) {
      return client.files.read(microvm, p, { format: 'stream' });
    },
    async write(p, data, mode) {
      await client.files.write(microvm, p, data, { mode: mode & 0o7777 });
    },
  };
}
