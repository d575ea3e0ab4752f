import { constants as fs } from 'node:fs';
import { link, mkdir, open, symlink } from 'node:fs/promises';
import { join } from 'node:path';
import { invalidBundle, quoteName } from './bundle-errors.ts';
import type { BundleLimits } from './bundle-limits.ts';
import { checkSymlinksResolveInside, checkSymlinkTarget, normalizeEntryPath } from './bundle-paths.ts';

type Kind = 'directory' | 'file' | 'symlink';

export interface FileMeta {
  /** Size the archive announces; checked against the limits before any byte is written. */
  declaredSize?: number | undefined;
  /** Unix mode from the archive; only "executable or not" survives. */
  mode?: number | undefined;
  mtime?: Date | undefined;
}

export interface WriteStats {
  entryCount: number;
  fileCount: number;
  /** Bytes of file content written. */
  uncompressedBytes: number;
}

/**
 * Writes archive entries into a fresh directory, whatever the archive format, and enforces the
 * rules that keep a hostile bundle inside it:
 * - every name is checked by `normalizeEntryPath` (relative, no '..', bounded);
 * - nothing is ever written through a symlink: an entry below a symlink is refused, files are
 *   created with O_EXCL | O_NOFOLLOW, and the bundle's own record of what it created (not the
 *   filesystem) decides what each path is;
 * - an entry may not replace an earlier one (only a directory may be repeated);
 * - hard links may only point to regular files extracted earlier;
 * - symlinks must resolve inside the bundle, checked on their text at once and by full
 *   resolution at the end;
 * - counts and sizes stay within the limits, checked on announced sizes first and on the bytes
 *   actually written, so a lying header gains nothing;
 * - modes are reduced to 0644/0755: no setuid, setgid, sticky or world-writable files, and
 *   owners are never taken from the archive.
 */
export class BundleWriter {
  readonly #root: string;
  readonly #limits: BundleLimits;
  readonly #kinds = new Map<string, Kind>([['', 'directory']]);
  readonly #links = new Map<string, string>();
  #entries = 0;
  #files = 0;
  #bytes = 0;

  constructor(root: string, limits: BundleLimits) {
    this.#root = root;
    this.#limits = limits;
  }

  /** Counts an entry against the limit; every entry of the archive passes here first. */
  #begin(rawName: string): string {
    if (++this.#entries > this.#limits.maxEntries) {
      throw invalidBundle(`the bundle has more than ${this.#limits.maxEntries} entries`);
    }
    return normalizeEntryPath(rawName, this.#limits);
  }

  /** Makes the parent directories of `path`, refusing to pass through anything but directories. */
  async #parents(path: string, rawName: string): Promise<void> {
    const parts = path.split('/');
    for (let i = 1; i < parts.length; i++) {
      const prefix = parts.slice(0, i).join('/');
      const kind = this.#kinds.get(prefix);
      if (kind === 'directory') continue;
      if (kind === 'symlink') throw invalidBundle(`entry ${quoteName(rawName)} is inside ${quoteName(prefix)}, which is a symlink`);
      if (kind === 'file') throw invalidBundle(`entry ${quoteName(rawName)} is inside ${quoteName(prefix)}, which is a file`);
      await mkdir(join(this.#root, prefix), { mode: 0o755 });
      this.#kinds.set(prefix, 'directory');
    }
  }

  #claim(path: string, rawName: string, kind: Kind): boolean {
    const existing = this.#kinds.get(path);
    if (existing === undefined) {
      this.#kinds.set(path, kind);
      return true;
    }
    if (existing === 'directory' && kind === 'directory') return false;
    throw invalidBundle(`entry ${quoteName(rawName)} appears more than once in the bundle`);
  }

  async directory(rawName: string): Promise<void> {
    const path = this.#begin(rawName);
    if (path === '') return; // the root itself ('./')
    await this.#parents(path, rawName);
    if (this.#claim(path, rawName, 'directory')) await mkdir(join(this.#root, path), { mode: 0o755 });
  }

  async file(rawName: string, meta: FileMeta, data: AsyncIterable<Uint8Array>): Promise<void> {
    const path = this.#begin(rawName);
    if (path === '') throw invalidBundle(`entry ${quoteName(rawName)} is a file without a name`);
    const { maxFileBytes, maxUncompressedBytes } = this.#limits;
    const declared = meta.declaredSize ?? 0;
    if (declared > maxFileBytes) {
      throw invalidBundle(`file ${quoteName(rawName)} is ${declared} bytes; the limit for one file is ${maxFileBytes} bytes`);
    }
    if (this.#bytes + declared > maxUncompressedBytes) throw this.#tooBig();
    await this.#parents(path, rawName);
    this.#claim(path, rawName, 'file');
    this.#files += 1;
    const mode = (meta.mode ?? 0o644) & 0o111 ? 0o755 : 0o644;
    const handle = await open(join(this.#root, path), fs.O_WRONLY | fs.O_CREAT | fs.O_EXCL | fs.O_NOFOLLOW, mode);
    try {
      let size = 0;
      for await (const chunk of data) {
        size += chunk.length;
        this.#bytes += chunk.length;
        if (size > maxFileBytes) {
          throw invalidBundle(`file ${quoteName(rawName)} is larger than the limit for one file (${maxFileBytes} bytes)`);
        }
        if (this.#bytes > maxUncompressedBytes) throw this.#tooBig();
        for (let offset = 0; offset < chunk.length;) {
          const { bytesWritten } = await handle.write(chunk, offset, chunk.length - offset);
          offset += bytesWritten;
        }
      }
      if (meta.mtime !== undefined && !Number.isNaN(meta.mtime.getTime())) await handle.utimes(meta.mtime, meta.mtime);
    } finally {
      await handle.close();
    }
  }

  async symlink(rawName: string, target: string): Promise<void> {
    const path = this.#begin(rawName);
    if (path === '') throw invalidBundle(`entry ${quoteName(rawName)} is a symlink without a name`);
    checkSymlinkTarget(path, target, this.#limits);
    await this.#parents(path, rawName);
    this.#claim(path, rawName, 'symlink');
    this.#links.set(path, target);
    await symlink(target, join(this.#root, path));
  }

  async hardlink(rawName: string, rawTarget: string): Promise<void> {
    const path = this.#begin(rawName);
    if (path === '') throw invalidBundle(`entry ${quoteName(rawName)} is a hard link without a name`);
    const target = normalizeEntryPath(rawTarget, this.#limits, 'hard link target');
    if (this.#kinds.get(target) !== 'file') {
      throw invalidBundle(
        `hard link ${quoteName(rawName)} points to ${quoteName(rawTarget)}, which is not a file earlier in the bundle`,
      );
    }
    await this.#parents(path, rawName);
    this.#claim(path, rawName, 'file');
    await link(join(this.#root, target), join(this.#root, path));
  }

  /** Entries that have no place in a build context. */
  refuse(rawName: string, what: string): never {
    throw invalidBundle(
      `entry ${quoteName(rawName)} is ${what}; bundles may hold only files, directories and links`,
    );
  }

  /** Final checks once every entry is written: links resolve inside, a Dockerfile exists. */
  finish(): WriteStats {
    checkSymlinksResolveInside(this.#links);
    const dockerfile = this.#kinds.get('Dockerfile');
    if (dockerfile !== 'file') {
      if (dockerfile === 'symlink') throw invalidBundle('the Dockerfile at the root is a symlink; make it a regular file');
      if (dockerfile === 'directory') throw invalidBundle('the bundle has a directory named Dockerfile at its root, not a file');
      const nested = [...this.#kinds].find(([path, kind]) => kind === 'file' && /^[^/]+\/Dockerfile$/.test(path));
      throw invalidBundle(
        nested
          ? `the bundle has no Dockerfile at its root (found ${quoteName(nested[0])}; pack the folder's contents, not the folder)`
          : 'the bundle has no Dockerfile at its root',
      );
    }
    return { entryCount: this.#entries, fileCount: this.#files, uncompressedBytes: this.#bytes };
  }

  #tooBig(): Error {
    return invalidBundle(`the bundle unpacks to more than ${this.#limits.maxUncompressedBytes} bytes`);
  }
}
