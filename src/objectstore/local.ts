import { randomBytes } from 'node:crypto';
import { constants as fsConstants } from 'node:fs';
import { mkdir, open, readdir, rename, stat, unlink } from 'node:fs/promises';
import { isAbsolute, join, dirname, relative, resolve, sep } from 'node:path';
import type { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { CocoonError } from '../common/errors.ts';
import { validateObjectKey } from './keys.ts';
import { MeasuringStream } from './measure.ts';
import {
  checkMaxBytes, objectNotFound, objectTooLarge,
  type ObjectInfo, type ObjectStore, type PutOptions, type PutResult,
} from './object-store.ts';

/** Temp files live inside the root (same filesystem, so rename is atomic); keys can't start with '.'. */
const TEMP_DIR = '.tmp';

/**
 * Objects as files under one directory (default `$COCOON_DATA_DIR/objects`). A put streams into
 * a temp file, fsyncs it and renames it over the final path, so a crash or a failed upload never
 * leaves a partial object where a reader could find it.
 */
export class LocalObjectStore implements ObjectStore {
  readonly kind = 'local' as const;
  readonly root: string;

  constructor(root: string) {
    if (typeof root !== 'string' || root.length === 0) {
      throw new CocoonError('invalid_config', 'the local object store needs a root directory');
    }
    this.root = resolve(root);
  }

  static inDataDir(dataDir: string): LocalObjectStore {
    return new LocalObjectStore(join(dataDir, 'objects'));
  }

  describe(key: string): string {
    return `object '${key}' in ${this.root}`;
  }

  /** The file behind a key; validates the key and that the path stays under the root. */
  pathOf(key: string): string {
    validateObjectKey(key);
    const path = resolve(this.root, ...key.split('/'));
    const rel = relative(this.root, path);
    // Belt and braces: the key rules already forbid '..' and absolute paths.
    if (rel === '' || rel.startsWith(`..${sep}`) || rel === '..' || isAbsolute(rel)) {
      throw new CocoonError('invalid_object_key', `object key '${key}' leaves the store`, { status: 400 });
    }
    return path;
  }

  async put(key: string, body: Readable, options: PutOptions): Promise<PutResult> {
    const finalPath = this.pathOf(key);
    checkMaxBytes(options.maxBytes);
    const tempDir = join(this.root, TEMP_DIR);
    await mkdir(tempDir, { recursive: true, mode: 0o700 });
    const tempPath = join(tempDir, `${randomBytes(12).toString('hex')}.part`);
    const measure = new MeasuringStream(options.maxBytes, (max) => objectTooLarge(this.describe(key), max));
    let handle;
    try {
      handle = await open(tempPath, fsConstants.O_WRONLY | fsConstants.O_CREAT | fsConstants.O_EXCL, 0o600);
      // `flush: true` fsyncs before the stream closes the file: the bytes are on disk before
      // the rename makes them visible.
      await pipeline(body, measure, handle.createWriteStream({ flush: true }));
      handle = undefined;
      await mkdir(dirname(finalPath), { recursive: true, mode: 0o700 });
      await rename(tempPath, finalPath);
      await syncDirectory(dirname(finalPath));
      return { key, sha256: measure.sha256, sizeBytes: measure.bytes };
    } catch (error) {
      body.destroy();
      await handle?.close().catch(() => {});
      await unlink(tempPath).catch(() => {});
      throw error;
    }
  }

  async get(key: string): Promise<Readable> {
    const path = this.pathOf(key);
    try {
      const handle = await open(path, fsConstants.O_RDONLY | fsConstants.O_NOFOLLOW);
      const info = await handle.stat();
      if (!info.isFile()) {
        await handle.close();
        throw objectNotFound(this.describe(key));
      }
      return handle.createReadStream();
    } catch (error) {
      throw mapMissing(error, () => objectNotFound(this.describe(key)));
    }
  }

  async head(key: string): Promise<ObjectInfo | undefined> {
    const path = this.pathOf(key);
    try {
      const info = await stat(path);
      if (!info.isFile()) return undefined;
      return { key, sizeBytes: info.size, lastModified: info.mtime };
    } catch (error) {
      if (isMissing(error)) return undefined;
      throw error;
    }
  }

  async exists(key: string): Promise<boolean> {
    return (await this.head(key)) !== undefined;
  }

  async delete(key: string): Promise<void> {
    const path = this.pathOf(key);
    try {
      await unlink(path);
    } catch (error) {
      if (!isMissing(error)) throw error;
    }
  }

  /**
   * Removes temp files left by puts that never finished (the process died mid-upload). Call at
   * startup; files younger than `olderThanMs` may belong to a put still running.
   */
  async sweepTemp(olderThanMs = 60 * 60 * 1000, now: number = Date.now()): Promise<number> {
    const tempDir = join(this.root, TEMP_DIR);
    const names = await readdir(tempDir).catch(() => [] as string[]);
    let removed = 0;
    for (const name of names) {
      const path = join(tempDir, name);
      const info = await stat(path).catch(() => undefined);
      if (info?.isFile() && now - info.mtimeMs >= olderThanMs) {
        await unlink(path).catch(() => {});
        removed += 1;
      }
    }
    return removed;
  }

  async move(fromKey: string, toKey: string): Promise<void> {
    const from = this.pathOf(fromKey);
    const to = this.pathOf(toKey);
    if (!(await this.exists(fromKey))) throw objectNotFound(this.describe(fromKey));
    await mkdir(dirname(to), { recursive: true, mode: 0o700 });
    try {
      await rename(from, to);
    } catch (error) {
      throw mapMissing(error, () => objectNotFound(this.describe(fromKey)));
    }
    await syncDirectory(dirname(to));
  }
}

/** Makes a rename durable: the directory entry itself must reach the disk. */
async function syncDirectory(dir: string): Promise<void> {
  const handle = await open(dir, fsConstants.O_RDONLY | fsConstants.O_DIRECTORY);
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}

function isMissing(error: unknown): boolean {
  const code = (error as NodeJS.ErrnoException | undefined)?.code;
  return code === 'ENOENT' || code === 'ENOTDIR' || code === 'ELOOP';
}

function mapMissing(error: unknown, notFound: () => CocoonError): unknown {
  return isMissing(error) ? notFound() : error;
}
