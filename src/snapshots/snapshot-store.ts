/**
 * Snapshot directories in the object store, for hosts of a cluster (docs/storage.md "Snapshots
 * in the object store"): `publish` uploads a snapshot directory's files under a prefix, the
 * index last (the commit point: a snapshot without its index is not there); `fetch` downloads
 * one into a local directory, through a temporary directory that is renamed into place only
 * once every file matched the index (size, SHA-256 of the object) and the snapshot's own
 * manifest (sizes, the device state's SHA-256, the memory and disk data checksums). A partial or
 * corrupt download is never used.
 *
 * Files travel as sparse objects (sparse-object.ts): a memory file or disk is stored as its data
 * only, so a snapshot that holds only what changed (a diff over its image) stays that small.
 */
import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { Readable } from 'node:stream';
import { CocoonError, errorMessage } from '../common/errors.ts';
import { fsyncDir } from '../common/fs.ts';
import type { ObjectStore } from '../objectstore/object-store.ts';
import { readSnapshotManifest, verifySnapshot, verifySnapshotData } from '../vmm/snapshot.ts';
import { decodeSparseObject, encodeSparseFile, maxSparseObjectBytes } from './sparse-object.ts';

const INDEX = 'index.json';
const MAX_INDEX_BYTES = 64 * 1024;
const MAX_FILES = 16;
/** The largest file a stored snapshot may describe (guest memory and disk are at most 32 GiB each). */
const MAX_FILE_BYTES = 64 * 1024 ** 3;
const FILE_NAME = /^[a-z0-9][a-z0-9._-]{0,63}$/;

export interface StoredFile {
  name: string;
  /** The file's size (holes included). */
  sizeBytes: number;
  /** The stored object's size and SHA-256 (checked on every download). */
  objectBytes: number;
  sha256: string;
}

/** What `<prefix>/index.json` holds: the files stored under `<prefix>/files/`. */
export interface SnapshotIndex {
  formatVersion: 1;
  files: StoredFile[];
}

/** Where the snapshots of images and microVM generations live in the object store. */
export function imageSnapshotPrefix(imageId: string): string {
  return `snapshots/images/${imageId}`;
}

export function generationPrefix(microvmId: string, generation: number): string {
  return `snapshots/microvms/${microvmId}/gen-${generation}`;
}

function unavailable(what: string, error: unknown): CocoonError {
  if (error instanceof CocoonError && (error.code === 'object_store_unavailable' || error.code === 'snapshot_corrupt' || error.code === 'no_space')) return error;
  return new CocoonError('object_store_unavailable', `${what}: ${errorMessage(error)}`, { status: 503, cause: error });
}

export class SnapshotStore {
  readonly objects: ObjectStore;
  /** Prefixes this process published or found published (their content never changes). */
  readonly #published = new Set<string>();
  /** Downloads in flight by target directory: concurrent callers share one. */
  readonly #fetching = new Map<string, Promise<boolean>>();

  constructor(objects: ObjectStore) {
    this.objects = objects;
  }

  /**
   * Uploads `names` (default: every file) of the snapshot in `dir` under `prefix`, the index
   * last. Uploading again replaces what is there: a prefix always names the same content.
   */
  async publish(prefix: string, dir: string, names?: string[]): Promise<SnapshotIndex> {
    const chosen = names ?? (await fs.promises.readdir(dir, { withFileTypes: true })).filter((e) => e.isFile() && FILE_NAME.test(e.name)).map((e) => e.name);
    if (!chosen.includes('manifest.json')) chosen.push('manifest.json');
    const files = await Promise.all(
      chosen.map(async (name): Promise<StoredFile> => {
        const file = path.join(dir, name);
        const sizeBytes = (await fs.promises.stat(file)).size;
        const put = await this.objects.put(`${prefix}/files/${name}`, encodeSparseFile(file), { maxBytes: maxSparseObjectBytes(sizeBytes), contentType: 'application/octet-stream' });
        return { name, sizeBytes, objectBytes: put.sizeBytes, sha256: put.sha256 };
      }),
    );
    const index: SnapshotIndex = { formatVersion: 1, files };
    const body = Buffer.from(JSON.stringify(index));
    await this.objects.put(`${prefix}/${INDEX}`, Readable.from([body]), { maxBytes: MAX_INDEX_BYTES, contentType: 'application/json' });
    this.#published.add(prefix);
    return index;
  }

  /** Whether a complete snapshot is stored under `prefix` (its index is there). */
  async isPublished(prefix: string): Promise<boolean> {
    if (this.#published.has(prefix)) return true;
    const found = await this.objects.exists(`${prefix}/${INDEX}`);
    if (found) this.#published.add(prefix);
    return found;
  }

  /** The stored index, checked; `snapshot_not_found` when there is none. */
  async readIndex(prefix: string): Promise<SnapshotIndex> {
    let text: string;
    try {
      const chunks: Buffer[] = [];
      let size = 0;
      for await (const chunk of await this.objects.get(`${prefix}/${INDEX}`)) {
        size += (chunk as Buffer).length;
        if (size > MAX_INDEX_BYTES) throw corrupt(prefix, 'its index is too large');
        chunks.push(chunk as Buffer);
      }
      text = Buffer.concat(chunks).toString('utf8');
    } catch (error) {
      if (error instanceof CocoonError && error.code === 'object_not_found') {
        throw new CocoonError('snapshot_not_found', `no snapshot is stored at ${this.objects.describe(prefix)}`, { status: 404, cause: error });
      }
      throw unavailable(`cannot read the snapshot index at ${this.objects.describe(prefix)}`, error);
    }
    let index: SnapshotIndex;
    try {
      index = JSON.parse(text) as SnapshotIndex;
    } catch {
      throw corrupt(prefix, 'its index is not JSON');
    }
    const files = index?.files;
    if (index?.formatVersion !== 1 || !Array.isArray(files) || files.length > MAX_FILES) throw corrupt(prefix, 'its index has an unknown shape');
    const seen = new Set<string>();
    for (const file of files) {
      const ok = typeof file?.name === 'string' && FILE_NAME.test(file.name) && !seen.has(file.name) &&
        Number.isSafeInteger(file.sizeBytes) && file.sizeBytes >= 0 && file.sizeBytes <= MAX_FILE_BYTES &&
        Number.isSafeInteger(file.objectBytes) && file.objectBytes <= maxSparseObjectBytes(file.sizeBytes) &&
        typeof file.sha256 === 'string' && /^[0-9a-f]{64}$/.test(file.sha256);
      if (!ok) throw corrupt(prefix, 'its index names a file it cannot hold');
      seen.add(file.name);
    }
    if (!seen.has('manifest.json')) throw corrupt(prefix, 'its index has no manifest.json');
    return index;
  }

  /**
   * Makes the snapshot stored under `prefix` present in `dir`: nothing to do when `dir` has a
   * manifest already (answers false), else downloads `names` (default: all; manifest.json
   * always) and verifies them before `dir` appears (answers true). `readOnly`: files 0444 and
   * the directory 0555 (an image's snapshot never changes).
   */
  fetch(prefix: string, dir: string, options: { names?: string[]; readOnly?: boolean } = {}): Promise<boolean> {
    const key = path.resolve(dir);
    let running = this.#fetching.get(key);
    if (!running) {
      running = this.#fetch(prefix, dir, options).finally(() => this.#fetching.delete(key));
      this.#fetching.set(key, running);
    }
    return running;
  }

  async #fetch(prefix: string, dir: string, options: { names?: string[]; readOnly?: boolean }): Promise<boolean> {
    if (fs.existsSync(path.join(dir, 'manifest.json'))) return false;
    const index = await this.readIndex(prefix);
    const wanted = options.names ? new Set([...options.names, 'manifest.json']) : undefined;
    const files = index.files.filter((file) => !wanted || wanted.has(file.name));
    if (wanted) {
      const missing = [...wanted].filter((name) => !files.some((file) => file.name === name));
      if (missing.length > 0) throw corrupt(prefix, `it lacks ${missing.join(', ')}`);
    }
    await fs.promises.mkdir(path.dirname(dir), { recursive: true, mode: 0o700 });
    await removeLeftovers(dir);
    const temp = `${dir}.download-${randomBytes(6).toString('hex')}`;
    await fs.promises.mkdir(temp, { mode: 0o700 });
    try {
      await Promise.all(files.map((file) => this.#download(prefix, file, path.join(temp, file.name))));
      await verifyDownload(temp, files.map((file) => file.name));
      if (options.readOnly) {
        for (const file of files) await fs.promises.chmod(path.join(temp, file.name), 0o444);
        await fs.promises.chmod(temp, 0o555);
      }
      // Someone else's copy appeared meanwhile (another process on this data directory): keep it.
      if (fs.existsSync(path.join(dir, 'manifest.json'))) {
        await removeTree(temp);
        return false;
      }
      await fs.promises.rm(dir, { recursive: true, force: true });
      await fs.promises.rename(temp, dir);
      await fsyncDir(path.dirname(dir));
      return true;
    } catch (error) {
      await removeTree(temp);
      throw error;
    }
  }

  async #download(prefix: string, file: StoredFile, target: string): Promise<void> {
    const where = `${this.objects.describe(`${prefix}/files/${file.name}`)}`;
    let stream: Readable;
    try {
      stream = await this.objects.get(`${prefix}/files/${file.name}`);
    } catch (error) {
      if (error instanceof CocoonError && error.code === 'object_not_found') throw corrupt(prefix, `${file.name} is missing`);
      throw unavailable(`cannot download ${where}`, error);
    }
    let got: Awaited<ReturnType<typeof decodeSparseObject>>;
    try {
      got = await decodeSparseObject(stream, target, where, file.sizeBytes);
    } catch (error) {
      stream.destroy();
      if (error instanceof CocoonError) throw error;
      if ((error as NodeJS.ErrnoException).code === 'ENOSPC') throw new CocoonError('no_space', `no space left to download ${where}`, { status: 507, cause: error });
      throw unavailable(`cannot download ${where}`, error);
    }
    if (got.sizeBytes !== file.sizeBytes || got.objectBytes !== file.objectBytes || got.sha256 !== file.sha256) {
      throw corrupt(prefix, `${file.name} does not match the index (size or SHA-256)`);
    }
  }

  /** Removes a stored snapshot, the index first (best effort for the files: an orphan file is never read). */
  async remove(prefix: string): Promise<void> {
    let index: SnapshotIndex | undefined;
    try {
      index = await this.readIndex(prefix);
    } catch (error) {
      if (error instanceof CocoonError && error.code === 'snapshot_not_found') return;
      throw error;
    }
    await this.objects.delete(`${prefix}/${INDEX}`);
    this.#published.delete(prefix);
    await Promise.all(index.files.map((file) => this.objects.delete(`${prefix}/files/${file.name}`)));
  }
}

function corrupt(prefix: string, why: string): CocoonError {
  return new CocoonError('snapshot_corrupt', `the snapshot stored at ${prefix} is unusable: ${why}`, { status: 422 });
}

/**
 * The downloaded files against the snapshot's manifest: sizes of all of them (those present),
 * the device state's SHA-256, the memory file's and disk's data checksums.
 */
async function verifyDownload(dir: string, names: string[]): Promise<void> {
  const manifest = await readSnapshotManifest(dir);
  const { state, mem, disk } = manifest.files;
  const has = (name: string) => names.includes(name);
  if (has(state.name) && has(mem.name) && has(disk.name)) {
    await verifySnapshot(dir, manifest); // sizes, and the device state's SHA-256
  } else {
    for (const file of [state, mem, disk].filter((f) => has(f.name))) {
      const size = (await fs.promises.stat(path.join(dir, file.name))).size;
      if (size !== file.sizeBytes) throw corrupt(dir, `${file.name} is ${size} bytes, expected ${file.sizeBytes}`);
    }
    if (has(state.name)) {
      const sha256 = createHash('sha256').update(await fs.promises.readFile(path.join(dir, state.name))).digest('hex');
      if (sha256 !== state.sha256) throw corrupt(dir, `${state.name} does not match its checksum`);
    }
  }
  const data = (['mem', 'disk'] as const).filter((which) => has(manifest.files[which].name));
  if (data.length > 0) await verifySnapshotData(dir, manifest, data);
}

/** Temp directories of downloads into `dir` that a crash left behind. */
async function removeLeftovers(dir: string): Promise<void> {
  const base = path.basename(dir);
  let entries: string[];
  try {
    entries = await fs.promises.readdir(path.dirname(dir));
  } catch {
    return;
  }
  for (const entry of entries) {
    if (entry.startsWith(`${base}.download-`)) await removeTree(path.join(path.dirname(dir), entry));
  }
}

async function removeTree(dir: string): Promise<void> {
  await fs.promises.chmod(dir, 0o700).catch(() => undefined);
  await fs.promises.rm(dir, { recursive: true, force: true });
}
