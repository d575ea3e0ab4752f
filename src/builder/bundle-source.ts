import { randomUUID } from 'node:crypto';
import type { Readable } from 'node:stream';
import { CocoonError, isCocoonError } from '../common/errors.ts';
import { bundleObjectKey, bundleUri, type BundleFormat, type BundleRef } from '../objectstore/bundle-ref.ts';
import type { ObjectStore } from '../objectstore/object-store.ts';
import { invalidBundle } from './bundle-errors.ts';
import { BUNDLE_CONTENT_TYPES, detectBundleFormat } from './bundle-format.ts';
import { DEFAULT_BUNDLE_LIMITS } from './bundle-limits.ts';
import { peekStream } from './peek.ts';

export interface StoredBundle {
  /** `cocoon://bundles/<sha256>.<tar.gz|zip>`, what `POST /bundles` answers. */
  uri: string;
  sha256: string;
  sizeBytes: number;
  format: BundleFormat;
  /** Object key in the platform's store. */
  key: string;
}

/**
 * Stores an uploaded bundle (the body of `POST /bundles`) content-addressed: streamed to a
 * temporary key while hashed, then renamed to `bundles/<sha256>.<ext>`. The same bytes
 * uploaded twice are stored once. Only the format is checked here (magic bytes); the content
 * is validated when an image is built from it. Over `maxBytes` → `bundle_too_large` (413).
 */
export async function storeBundle(
  store: ObjectStore,
  body: Readable,
  options: { maxBytes?: number } = {},
): Promise<StoredBundle> {
  const maxBytes = options.maxBytes ?? DEFAULT_BUNDLE_LIMITS.maxCompressedBytes;
  const { head, stream } = await peekStream(body, 4);
  const format = detectBundleFormat(head);
  if (format === undefined) {
    stream.destroy();
    throw invalidBundle(head.length === 0 ? 'the upload is empty' : 'the upload is neither a .tar.gz nor a .zip');
  }
  const uploadKey = `uploads/${randomUUID()}`;
  let stored;
  try {
    stored = await store.put(uploadKey, stream, { maxBytes, contentType: BUNDLE_CONTENT_TYPES[format] });
  } catch (error) {
    stream.destroy();
    if (isCocoonError(error, 'object_too_large')) {
      throw new CocoonError('bundle_too_large', `the bundle is larger than the limit of ${maxBytes} bytes`, {
        status: 413, details: { maxBytes },
      });
    }
    throw error;
  }
  const key = bundleObjectKey(stored.sha256, format);
  try {
    if (await store.exists(key)) await store.delete(uploadKey);
    else await store.move(uploadKey, key);
  } catch (error) {
    await store.delete(uploadKey).catch(() => {});
    throw error;
  }
  return { uri: bundleUri(stored.sha256, format), sha256: stored.sha256, sizeBytes: stored.sizeBytes, format, key };
}

/**
 * Opens a bundle for the builder. `cocoon://` bundles come from the platform's store and must
 * hash to their name (pass `expectedSha256` on to `unpackBundle`); `s3://` bundles come from
 * the bucket they name, through `s3ForBucket` (absent when the server has no S3 configured).
 */
export async function openBundle(
  ref: BundleRef,
  stores: { objects: ObjectStore; s3ForBucket?: ((bucket: string) => ObjectStore) | undefined },
): Promise<{ stream: Readable; expectedSha256?: string }> {
  try {
    if (ref.scheme === 'cocoon') return { stream: await stores.objects.get(ref.key), expectedSha256: ref.sha256 };
    if (stores.s3ForBucket === undefined) {
      throw new CocoonError(
        's3_not_configured',
        `this server has no S3 configured, so it cannot fetch ${ref.uri}; upload the bundle with POST /bundles instead`,
        { status: 400 },
      );
    }
    return { stream: await stores.s3ForBucket(ref.bucket).get(ref.key) };
  } catch (error) {
    if (isCocoonError(error, 'object_not_found')) {
      throw new CocoonError('bundle_not_found', `bundle ${ref.uri} does not exist`, { status: 404, cause: error });
    }
    throw error;
  }
}
