import { CocoonError } from '../common/errors.ts';

/**
 * Object keys are '/'-separated segments drawn from a small safe set of characters (the ones
 * S3 calls "safe", plus a few harmless ones). The same rules hold for both stores, so a key
 * that works on S3 also works as a relative path under the local store's root:
 * - no empty segments (no leading, trailing or doubled '/'), so no absolute paths;
 * - no segment starting with '.' (so no '.', '..', hidden files, or clashes with the local
 *   store's '.tmp' directory) or with '-' (never mistaken for an option by a tool);
 * - at most 512 bytes in all and 255 per segment (a file name's limit on Linux).
 */
export const MAX_OBJECT_KEY_LENGTH = 512;
const MAX_SEGMENT_LENGTH = 255;
const SEGMENT = /^[A-Za-z0-9_][A-Za-z0-9_.!*'()=+@,~-]*$/;

export function objectKeyProblem(key: unknown): string | undefined {
  if (typeof key !== 'string') return 'it is not a string';
  if (key.length === 0) return 'it is empty';
  if (key.length > MAX_OBJECT_KEY_LENGTH) return `it is longer than ${MAX_OBJECT_KEY_LENGTH} characters`;
  if (key.startsWith('/')) return 'it starts with "/" (keys are relative)';
  for (const segment of key.split('/')) {
    if (segment.length === 0) return 'it has an empty path segment';
    if (segment.length > MAX_SEGMENT_LENGTH) return `a segment is longer than ${MAX_SEGMENT_LENGTH} characters`;
    if (segment.startsWith('.')) return `segment "${segment}" starts with "."`;
    if (!SEGMENT.test(segment)) {
      return 'it may only contain letters, digits, "/" and _ . ! * \' ( ) = + @ , ~ - (not first)';
    }
  }
  return undefined;
}

export function isValidObjectKey(key: unknown): key is string {
  return objectKeyProblem(key) === undefined;
}

/** Throws `invalid_object_key` (400) unless `key` follows the rules above. */
export function validateObjectKey(key: unknown): string {
  const problem = objectKeyProblem(key);
  if (problem !== undefined) {
    throw new CocoonError('invalid_object_key', `invalid object key ${show(key)}: ${problem}`, { status: 400 });
  }
  return key as string;
}

/**
 * S3 bucket naming rules (the strict, DNS-compatible ones): 3–63 characters of lower-case
 * letters, digits, '.' and '-', starting and ending with a letter or digit, no '..', and not
 * shaped like an IP address.
 */
export function bucketNameProblem(bucket: unknown): string | undefined {
  if (typeof bucket !== 'string') return 'it is not a string';
  if (bucket.length < 3 || bucket.length > 63) return 'it must be 3 to 63 characters long';
  if (!/^[a-z0-9][a-z0-9.-]*[a-z0-9]$/.test(bucket)) {
    return 'it may only contain lower-case letters, digits, "." and "-", and must start and end with a letter or digit';
  }
  if (bucket.includes('..')) return 'it contains ".."';
  if (/^\d+\.\d+\.\d+\.\d+$/.test(bucket)) return 'it looks like an IP address';
  return undefined;
}

export function validateBucketName(bucket: unknown): string {
  const problem = bucketNameProblem(bucket);
  if (problem !== undefined) {
    throw new CocoonError('invalid_bucket_name', `invalid S3 bucket name ${show(bucket)}: ${problem}`, { status: 400 });
  }
  return bucket as string;
}

/** A short, printable rendering of untrusted input for error messages. */
function show(value: unknown): string {
  const text = typeof value === 'string' ? value : String(value);
  const clipped = text.length > 100 ? `${text.slice(0, 100)}…` : text;
  return JSON.stringify(clipped);
}
