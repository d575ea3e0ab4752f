import { CocoonError } from '../common/errors.ts';
import { bucketNameProblem, objectKeyProblem } from './keys.ts';

/**
 * Where an image's bundle comes from. Two forms are accepted:
 *
 * - `cocoon://bundles/<sha256>.tar.gz` and `cocoon://bundles/<sha256>.zip`: a bundle uploaded
 *   with `POST /bundles`, named by the SHA-256 (64 lower-case hex digits) of its bytes and kept
 *   in the platform's own object store (a directory or S3, whichever is configured) under the
 *   key `bundles/<sha256>.<ext>`. The extension records the format found by magic bytes at
 *   upload; the builder checks the magic bytes again and does not trust it.
 * - `s3://<bucket>/<key>`: an object in any bucket the platform's S3 credentials can read.
 *   The key is taken literally (no URL decoding) and must follow the object key rules.
 */
export const BUNDLE_FORMATS = ['tar.gz', 'zip'] as const;
export type BundleFormat = (typeof BUNDLE_FORMATS)[number];

export type BundleRef =
  | { scheme: 'cocoon'; uri: string; sha256: string; format: BundleFormat; key: string }
  | { scheme: 's3'; uri: string; bucket: string; key: string };

const COCOON_PREFIX = 'cocoon://bundles/';
const S3_PREFIX = 's3://';
const MAX_URI_LENGTH = 1100;
const LOCAL_NAME = /^([0-9a-f]{64})\.(tar\.gz|zip)$/;

export function bundleObjectKey(sha256: string, format: BundleFormat): string {
  return `bundles/${sha256}.${format}`;
}

export function bundleUri(sha256: string, format: BundleFormat): string {
  if (!/^[0-9a-f]{64}$/.test(sha256)) throw new Error(`not a lower-case hex sha256: ${sha256}`);
  return `${COCOON_PREFIX}${sha256}.${format}`;
}

/** Parses and validates a bundle reference; throws `invalid_bundle_uri` (400) with the reason. */
export function parseBundleRef(input: unknown): BundleRef {
  if (typeof input !== 'string' || input.length === 0) {
    throw invalid('the bundle must be a URI string such as cocoon://bundles/<sha256>.tar.gz or s3://bucket/key');
  }
  if (input.length > MAX_URI_LENGTH) throw invalid(`the bundle URI is longer than ${MAX_URI_LENGTH} characters`);

  if (input.startsWith(COCOON_PREFIX)) {
    const name = input.slice(COCOON_PREFIX.length);
    const match = LOCAL_NAME.exec(name);
    if (match === null) {
      throw invalid(
        `'${clip(input)}' is not a bundle URI returned by POST /bundles; expected ` +
          'cocoon://bundles/<64 lower-case hex digits>.tar.gz or .zip',
      );
    }
    const sha256 = match[1] as string;
    const format = match[2] as BundleFormat;
    return { scheme: 'cocoon', uri: input, sha256, format, key: bundleObjectKey(sha256, format) };
  }

  if (input.startsWith(S3_PREFIX)) {
    const rest = input.slice(S3_PREFIX.length);
    const slash = rest.indexOf('/');
    if (slash <= 0 || slash === rest.length - 1) {
      throw invalid(`'${clip(input)}' must have the form s3://bucket/key`);
    }
    const bucket = rest.slice(0, slash);
    const key = rest.slice(slash + 1);
    const bucketProblem = bucketNameProblem(bucket);
    if (bucketProblem !== undefined) throw invalid(`bad bucket in '${clip(input)}': ${bucketProblem}`);
    const keyProblem = objectKeyProblem(key);
    if (keyProblem !== undefined) throw invalid(`bad key in '${clip(input)}': ${keyProblem}`);
    return { scheme: 's3', uri: input, bucket, key };
  }

  throw invalid(
    `unsupported bundle URI '${clip(input)}'; use the uri returned by POST /bundles ` +
      '(cocoon://bundles/…) or s3://bucket/key',
  );
}

function invalid(message: string): CocoonError {
  return new CocoonError('invalid_bundle_uri', message, { status: 400 });
}

function clip(text: string): string {
  // eslint-disable-next-line no-control-regex
  const printable = text.replace(/[\u0000-\u001f\u007f]/g, '?');
  return printable.length > 120 ? `${printable.slice(0, 120)}…` : printable;
}
