import type { Readable } from 'node:stream';
import { CocoonError } from '../common/errors.ts';

/**
 * One place for opaque blobs (bundles, root filesystems, snapshots). Keys are '/'-separated
 * paths checked by `validateObjectKey`; both implementations accept the same keys, so callers
 * never care whether the bytes live in a directory or in a bucket.
 */
export interface ObjectStore {
  /** 'local' or 's3', for messages and metrics. */
  readonly kind: 'local' | 's3';

  /**
   * Stores `body` under `key`, replacing any object there. The write is all or nothing: a
   * reader sees the old object or the complete new one, never a part. More than
   * `options.maxBytes` bytes fails with `object_too_large` and stores nothing.
   */
  put(key: string, body: Readable, options: PutOptions): Promise<PutResult>;

  /** The object's bytes as a stream; `object_not_found` when there is none. */
  get(key: string): Promise<Readable>;

  /** Size and modification time, or undefined when there is no such object. */
  head(key: string): Promise<ObjectInfo | undefined>;

  exists(key: string): Promise<boolean>;

  /** Removes the object; removing one that is not there is not an error. */
  delete(key: string): Promise<void>;

  /**
   * Renames `fromKey` to `toKey` (replacing it). Atomic on the local store; on S3 a copy then a
   * delete, which S3 allows in one request only up to 5 GiB.
   */
  move(fromKey: string, toKey: string): Promise<void>;

  /** Where the key lives, for humans and logs (never carries credentials). */
  describe(key: string): string;
}

export interface PutOptions {
  /** Hard bound on the object's size in bytes; the stream is cut off beyond it. */
  maxBytes: number;
  /** Content type recorded where the backend keeps one (S3). */
  contentType?: string;
}

export interface PutResult {
  key: string;
  /** Lower-case hex SHA-256 of the bytes stored, computed while they streamed through. */
  sha256: string;
  sizeBytes: number;
}

export interface ObjectInfo {
  key: string;
  sizeBytes: number;
  lastModified: Date;
}

export function objectNotFound(where: string): CocoonError {
  return new CocoonError('object_not_found', `no object at ${where}`, { status: 404 });
}

export function objectTooLarge(where: string, maxBytes: number): CocoonError {
  return new CocoonError(
    'object_too_large',
    `the object for ${where} is larger than the limit of ${maxBytes} bytes`,
    { status: 413, details: { maxBytes } },
  );
}

export function checkMaxBytes(maxBytes: number): void {
  if (!Number.isSafeInteger(maxBytes) || maxBytes < 0) {
    throw new CocoonError('invalid_config', `maxBytes must be a non-negative integer, got ${maxBytes}`);
  }
}
