import { randomBytes } from 'node:crypto';
import { mkdir, rm } from 'node:fs/promises';
import { basename, dirname, join, resolve } from 'node:path';
import type { Readable } from 'node:stream';
import { CocoonError, errorMessage, isCocoonError } from '../common/errors.ts';
import type { BundleFormat } from '../objectstore/bundle-ref.ts';
import { invalidBundle } from './bundle-errors.ts';
import { detectBundleFormat } from './bundle-format.ts';
import { resolveLimits, type BundleLimits } from './bundle-limits.ts';
import { extractTarGz } from './bundle-tar.ts';
import { BundleWriter } from './bundle-writer.ts';
import { extractZip } from './bundle-zip.ts';
import { peekStream } from './peek.ts';

export { DEFAULT_BUNDLE_LIMITS, type BundleLimits } from './bundle-limits.ts';

export interface UnpackOptions {
  /** Overrides of `DEFAULT_BUNDLE_LIMITS`. */
  limits?: Partial<BundleLimits>;
  /** When known (cocoon:// bundles are named by it), the archive's bytes must hash to this. */
  expectedSha256?: string;
}

export interface UnpackedBundle {
  /** The build-context directory, with the Dockerfile at its root. */
  dir: string;
  format: BundleFormat;
  /** SHA-256 and size of the archive as read. */
  sha256: string;
  compressedBytes: number;
  entryCount: number;
  fileCount: number;
  uncompressedBytes: number;
}

/**
 * Validates and unpacks a bundle from a stream into `destDir`, which must not exist yet (its
 * parent must). The format comes from the first bytes: a gzip'd tar or a zip. The archive is
 * never held in memory: a tar.gz streams straight through, a zip is spooled to a temp file
 * beside `destDir` because its index is at the end.
 *
 * A bad bundle raises `invalid_bundle` (400) saying what is wrong; on any failure `destDir`
 * and the spool file are removed and the source is destroyed, so nothing is left behind.
 * To cancel, destroy the source stream.
 */
export async function unpackBundle(source: Readable, destDir: string, options: UnpackOptions = {}): Promise<UnpackedBundle> {
  const limits = resolveLimits(options.limits);
  const dir = resolve(destDir);
  try {
    await mkdir(dir, { mode: 0o755 });
  } catch (error) {
    source.destroy();
    const exists = (error as NodeJS.ErrnoException).code === 'EEXIST';
    throw new CocoonError(
      'bundle_unpack_failed',
      exists ? `the build-context directory ${dir} already exists` : `cannot create the build-context directory ${dir}: ${errorMessage(error)}`,
      { status: 500, cause: error },
    );
  }
  const spoolPath = join(dirname(dir), `.${basename(dir)}.${randomBytes(6).toString('hex')}.zip-spool`);
  try {
    const { head, stream } = await peekStream(source, 4);
    const format = detectBundleFormat(head);
    if (format === undefined) {
      stream.destroy();
      throw invalidBundle(
        head.length === 0
          ? 'the bundle is empty'
          : `it is neither a gzip-compressed tar nor a zip (it starts with bytes ${head.toString('hex').replace(/(..)/g, '$1 ').trim()})`,
      );
    }
    const writer = new BundleWriter(dir, limits);
    const digest = format === 'tar.gz'
      ? await extractTarGz(stream, writer, limits)
      : await extractZip(stream, writer, limits, spoolPath);
    if (options.expectedSha256 !== undefined && digest.sha256 !== options.expectedSha256) {
      throw invalidBundle(`its content does not match its name (sha256 ${digest.sha256}, expected ${options.expectedSha256})`);
    }
    const stats = writer.finish();
    return { dir, format, sha256: digest.sha256, compressedBytes: digest.compressedBytes, ...stats };
  } catch (error) {
    source.destroy();
    await rm(dir, { recursive: true, force: true });
    if (isCocoonError(error)) throw error;
    throw new CocoonError('bundle_unpack_failed', `could not unpack the bundle: ${errorMessage(error)}`, { status: 500, cause: error });
  } finally {
    await rm(spoolPath, { force: true });
  }
}
