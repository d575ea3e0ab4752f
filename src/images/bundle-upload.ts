/**
 * `POST /bundles`: an upload is validated whole before anything is stored.
 *
 *   request body ──stream──► spool file (size bound, SHA-256 on the way; never all in memory)
 *                ──► unpackBundle into a throwaway directory (format, Dockerfile, paths, links,
 *                    sizes and entry count: the same checks as at build time)
 *                ──► object store `bundles/<sha256>.<ext>` (content-addressed; skipped when the
 *                    same bytes are there) ──► a bundle row for the tenant
 *
 * A bad bundle is a 400 `invalid_bundle` with the reason, and nothing of it remains: the spool
 * file and the directory are removed whatever happens, and the object store only ever sees
 * bundles that passed.
 */
import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { Transform, type Readable, type TransformCallback } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { DEFAULT_BUNDLE_LIMITS, unpackBundle, type BundleLimits } from '../builder/bundle.ts';
import { CocoonError, isCocoonError } from '../common/errors.ts';
import { bundleObjectKey, bundleUri, type BundleFormat } from '../objectstore/bundle-ref.ts';
import type { ObjectStore } from '../objectstore/object-store.ts';
import { recordBundle, type Bundle } from '../store/bundles.ts';
import type { Db } from '../store/sql.ts';

export const BUNDLE_CONTENT_TYPES: Record<BundleFormat, string> = { 'tar.gz': 'application/gzip', zip: 'application/zip' };

export function bundleTooLarge(maxBytes: number): CocoonError {
  return new CocoonError('invalid_bundle', `invalid bundle: it is larger than the limit of ${maxBytes} bytes`, {
    status: 400,
    details: { maxBytes },
  });
}

/** Where uploads are spooled and checked: `$COCOON_DATA_DIR/tmp/uploads`. */
export function uploadsDir(dataDir: string): string {
  return path.join(dataDir, 'tmp', 'uploads');
}

/** Counts, hashes and bounds the bytes that pass. */
class Spooler extends Transform {
  readonly hash = createHash('sha256');
  bytes = 0;
  private readonly maxBytes: number;

  constructor(maxBytes: number) {
    super();
    this.maxBytes = maxBytes;
  }

  override _transform(chunk: Buffer, _encoding: BufferEncoding, callback: TransformCallback): void {
    this.bytes += chunk.length;
    if (this.bytes > this.maxBytes) {
      callback(bundleTooLarge(this.maxBytes));
      return;
    }
    this.hash.update(chunk);
    callback(null, chunk);
  }
}

export interface UploadResult {
  bundle: Bundle;
  /** True when these bytes were already in the store (uploaded before by anyone). */
  deduplicated: boolean;
}

export async function storeUploadedBundle(
  deps: { db: Db; objects: ObjectStore; dataDir: string; limits: Partial<BundleLimits> },
  tenantId: string,
  body: Readable,
): Promise<UploadResult> {
  const limits = { ...DEFAULT_BUNDLE_LIMITS, ...deps.limits };
  const scratch = uploadsDir(deps.dataDir);
  await fs.promises.mkdir(scratch, { recursive: true, mode: 0o700 });
  const id = randomBytes(12).toString('hex');
  const spool = path.join(scratch, `${id}.bundle`);
  const unpackDir = path.join(scratch, `${id}.check`);
  try {
    const spooler = new Spooler(limits.maxCompressedBytes);
    try {
      await pipeline(body, spooler, fs.createWriteStream(spool, { mode: 0o600 }));
    } catch (error) {
      body.resume(); // drain what the client still sends, so that the 400 reaches it
      if (isCocoonError(error)) throw error;
      throw new CocoonError('upload_failed', `the upload did not complete: ${(error as Error).message}`, { status: 400, cause: error });
    }
    const sha256 = spooler.hash.digest('hex');
    const unpacked = await unpackBundle(fs.createReadStream(spool), unpackDir, { limits, expectedSha256: sha256 });
    await fs.promises.rm(unpackDir, { recursive: true, force: true });
    const key = bundleObjectKey(sha256, unpacked.format);
    const existing = await deps.objects.head(key);
    const deduplicated = existing !== undefined && existing.sizeBytes === spooler.bytes;
    if (!deduplicated) {
      await deps.objects.put(key, fs.createReadStream(spool), {
        maxBytes: limits.maxCompressedBytes,
        contentType: BUNDLE_CONTENT_TYPES[unpacked.format],
      });
    }
    const bundle = await recordBundle(deps.db, {
      tenantId,
      sha256,
      format: unpacked.format,
      sizeBytes: spooler.bytes,
      uri: bundleUri(sha256, unpacked.format),
    });
    return { bundle, deduplicated };
  } finally {
    await fs.promises.rm(spool, { force: true });
    await fs.promises.rm(unpackDir, { recursive: true, force: true });
  }
}
