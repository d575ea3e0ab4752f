import {
  CopyObjectCommand, DeleteObjectCommand, GetObjectCommand, HeadObjectCommand, S3Client,
} from '@aws-sdk/client-s3';
import { Upload } from '@aws-sdk/lib-storage';
import { Readable } from 'node:stream';
import { CocoonError, errorMessage } from '../common/errors.ts';
import { validateBucketName, validateObjectKey } from './keys.ts';
import { MeasuringStream } from './measure.ts';
import {
  checkMaxBytes, objectNotFound, objectTooLarge,
  type ObjectInfo, type ObjectStore, type PutOptions, type PutResult,
} from './object-store.ts';
import { setting, type Env } from '../common/settings.ts';

export interface S3Credentials {
  accessKeyId: string;
  secretAccessKey: string;
  sessionToken?: string;
}

export interface S3ObjectStoreConfig {
  bucket: string;
  /** Required unless a client is passed to the constructor. */
  region: string;
  /** e.g. `http://127.0.0.1:9000` for an S3-compatible server; AWS when absent. */
  endpoint?: string;
  /** Path-style URLs (`endpoint/bucket/key`), which most S3-compatible servers need. */
  forcePathStyle?: boolean;
  /** Static credentials; without them the SDK's default chain (AWS_* environment, profiles, roles). */
  credentials?: S3Credentials;
  /** Optional key prefix inside the bucket (no leading or trailing '/'). */
  prefix?: string;
  /** Multipart part size (≥ 5 MiB, S3's minimum); memory use is about partSize × queueSize. */
  partSizeBytes?: number;
  queueSize?: number;
}

const MIB = 1024 * 1024;

/**
 * Objects in an S3 bucket through the official AWS SDK v3. Uploads stream through
 * `@aws-sdk/lib-storage`'s `Upload` (multipart beyond one part), so memory stays at about
 * partSize × queueSize whatever the object's size; the SHA-256 is computed on the way through.
 * S3 makes an object visible only once its upload completed, so puts are all or nothing.
 */
export class S3ObjectStore implements ObjectStore {
  readonly kind = 's3' as const;
  readonly bucket: string;
  readonly #client: S3Client;
  readonly #ownsClient: boolean;
  readonly #prefix: string;
  readonly #partSize: number;
  readonly #queueSize: number;

  constructor(config: S3ObjectStoreConfig, client?: S3Client) {
    this.bucket = validateBucketName(config.bucket);
    if (client === undefined && (typeof config.region !== 'string' || config.region.length === 0)) {
      throw new CocoonError('invalid_config', 'the S3 object store needs a region');
    }
    if (config.prefix !== undefined && config.prefix !== '') validateObjectKey(config.prefix);
    this.#prefix = config.prefix ? `${config.prefix}/` : '';
    this.#partSize = Math.max(5 * MIB, config.partSizeBytes ?? 8 * MIB);
    this.#queueSize = Math.max(1, Math.min(16, config.queueSize ?? 4));
    this.#ownsClient = client === undefined;
    this.#client = client ?? new S3Client({
      region: config.region,
      ...(config.endpoint !== undefined ? { endpoint: config.endpoint } : {}),
      forcePathStyle: config.forcePathStyle ?? false,
      ...(config.credentials !== undefined ? { credentials: config.credentials } : {}),
      // S3-compatible servers (MinIO, Ceph, s3rver…) often reject the newer default
      // checksums; send and check them only where an operation requires them.
      requestChecksumCalculation: 'WHEN_REQUIRED',
      responseChecksumValidation: 'WHEN_REQUIRED',
      maxAttempts: 3,
    });
  }

  /** A store over another bucket that shares this one's client (for `s3://bucket/key` bundles). */
  forBucket(bucket: string): S3ObjectStore {
    return new S3ObjectStore(
      { bucket, region: '', partSizeBytes: this.#partSize, queueSize: this.#queueSize },
      this.#client,
    );
  }

  /** Closes the HTTP connections (only when this store created the client). */
  destroy(): void {
    if (this.#ownsClient) this.#client.destroy();
  }

  describe(key: string): string {
    return `s3://${this.bucket}/${this.#prefix}${key}`;
  }

  #key(key: string): string {
    return this.#prefix + validateObjectKey(key);
  }

  async put(key: string, body: Readable, options: PutOptions): Promise<PutResult> {
    const Key = this.#key(key);
    checkMaxBytes(options.maxBytes);
    const measure = new MeasuringStream(options.maxBytes, (max) => objectTooLarge(this.describe(key), max));
    // The first failure on our side (source error, size bound) is the one to report: the
    // upload's own error, or a failing abort of the multipart upload, would only hide it.
    let streamError: unknown;
    measure.on('error', (error) => { streamError ??= error; });
    body.on('error', (error) => { streamError ??= error; measure.destroy(error); });
    body.pipe(measure);
    const upload = new Upload({
      client: this.#client,
      params: {
        Bucket: this.bucket,
        Key,
        Body: measure,
        ...(options.contentType !== undefined ? { ContentType: options.contentType } : {}),
      },
      partSize: this.#partSize,
      queueSize: this.#queueSize,
      leavePartsOnError: false, // failed multipart uploads are aborted, not left to cost storage
    });
    try {
      await upload.done();
    } catch (error) {
      body.destroy();
      measure.destroy();
      throw this.#mapError(streamError ?? error, key);
    }
    return { key, sha256: measure.sha256, sizeBytes: measure.bytes };
  }

  async get(key: string): Promise<Readable> {
    const Key = this.#key(key);
    try {
      const response = await this.#client.send(new GetObjectCommand({ Bucket: this.bucket, Key }));
      if (!(response.Body instanceof Readable)) {
        throw new CocoonError('object_store_error', `S3 returned no stream for ${this.describe(key)}`, { status: 502 });
      }
      return response.Body;
    } catch (error) {
      throw this.#mapError(error, key);
    }
  }

  async head(key: string): Promise<ObjectInfo | undefined> {
    const Key = this.#key(key);
    try {
      const response = await this.#client.send(new HeadObjectCommand({ Bucket: this.bucket, Key }));
      return { key, sizeBytes: response.ContentLength ?? 0, lastModified: response.LastModified ?? new Date(0) };
    } catch (error) {
      const mapped = this.#mapError(error, key);
      if (mapped instanceof CocoonError && mapped.code === 'object_not_found') return undefined;
      throw mapped;
    }
  }

  async exists(key: string): Promise<boolean> {
    return (await this.head(key)) !== undefined;
  }

  async delete(key: string): Promise<void> {
    const Key = this.#key(key);
    try {
      await this.#client.send(new DeleteObjectCommand({ Bucket: this.bucket, Key }));
    } catch (error) {
      const mapped = this.#mapError(error, key);
      if (mapped instanceof CocoonError && mapped.code === 'object_not_found') return;
      throw mapped;
    }
  }

  async move(fromKey: string, toKey: string): Promise<void> {
    const from = this.#key(fromKey);
    const to = this.#key(toKey);
    try {
      await this.#client.send(new CopyObjectCommand({
        Bucket: this.bucket,
        Key: to,
        // CopySource is "bucket/key", URL-encoded per segment.
        CopySource: `${this.bucket}/${from.split('/').map(encodeURIComponent).join('/')}`,
      }));
    } catch (error) {
      throw this.#mapError(error, fromKey);
    }
    await this.delete(fromKey);
  }

  /** SDK errors → CocoonError with a stable code; messages name the object, never credentials. */
  #mapError(error: unknown, key: string): unknown {
    if (error instanceof CocoonError) return error;
    const where = this.describe(key);
    const name = (error as { name?: string } | undefined)?.name ?? '';
    const status = (error as { $metadata?: { httpStatusCode?: number } } | undefined)?.$metadata?.httpStatusCode;
    if (name === 'NoSuchKey' || name === 'NotFound' || (status === 404 && name !== 'NoSuchBucket')) {
      return objectNotFound(where);
    }
    if (name === 'NoSuchBucket') {
      return new CocoonError('object_store_error', `S3 bucket '${this.bucket}' does not exist`, { status: 502, cause: error });
    }
    if (status === 403 || name === 'AccessDenied' || name === 'InvalidAccessKeyId' || name === 'SignatureDoesNotMatch') {
      return new CocoonError(
        'object_store_error',
        `access to ${where} was denied (${name || status}); check the S3 credentials and bucket policy`,
        { status: 502, cause: error },
      );
    }
    if (status === undefined) {
      return new CocoonError(
        'object_store_unavailable',
        `could not reach the S3 endpoint for ${where}: ${errorMessage(error)}`,
        { status: 503, cause: error },
      );
    }
    return new CocoonError('object_store_error', `S3 failed on ${where}: ${name || status}: ${errorMessage(error)}`, {
      status: 502, cause: error,
    });
  }
}

/**
 * S3 settings from the environment, or undefined when no bucket is configured (then the
 * local store is used): COCOON_S3_BUCKET, COCOON_S3_REGION (default us-east-1),
 * COCOON_S3_ENDPOINT, COCOON_S3_FORCE_PATH_STYLE (default true when an endpoint is set),
 * COCOON_S3_PREFIX, COCOON_S3_ACCESS_KEY_ID + COCOON_S3_SECRET_ACCESS_KEY (else the SDK chain).
 */
export function s3ConfigFromEnv(env: Env = process.env): S3ObjectStoreConfig | undefined {
  const bucket = setting('COCOON_S3_BUCKET', env);
  if (bucket === undefined) return undefined;
  const endpoint = setting('COCOON_S3_ENDPOINT', env);
  const pathStyle = setting('COCOON_S3_FORCE_PATH_STYLE', env);
  const accessKeyId = setting('COCOON_S3_ACCESS_KEY_ID', env);
  const secretAccessKey = setting('COCOON_S3_SECRET_ACCESS_KEY', env);
  const prefix = setting('COCOON_S3_PREFIX', env);
  const sessionToken = setting('COCOON_S3_SESSION_TOKEN', env);
  if ((accessKeyId === undefined) !== (secretAccessKey === undefined)) {
    throw new CocoonError(
      'invalid_config',
      'set both COCOON_S3_ACCESS_KEY_ID and COCOON_S3_SECRET_ACCESS_KEY, or neither',
    );
  }
  return {
    bucket,
    region: setting('COCOON_S3_REGION', env),
    ...(endpoint !== undefined ? { endpoint } : {}),
    forcePathStyle: pathStyle ?? endpoint !== undefined,
    ...(prefix !== undefined ? { prefix } : {}),
    ...(accessKeyId !== undefined && secretAccessKey !== undefined
      ? { credentials: { accessKeyId, secretAccessKey, ...(sessionToken !== undefined ? { sessionToken } : {}) } }
      : {}),
  };
}
