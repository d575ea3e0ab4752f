import { CocoonError } from '../common/errors.ts';

/** Bounds applied while a bundle is validated and unpacked. */
export interface BundleLimits {
  /** Size of the archive as uploaded or stored. */
  maxCompressedBytes: number;
  /** Sum of all file sizes once unpacked (a compression bomb stops here). */
  maxUncompressedBytes: number;
  /** Entries in the archive: files, directories and links. */
  maxEntries: number;
  /** One file's size. */
  maxFileBytes: number;
  /** Directory levels of an entry's path (`a/b/c` is 3). */
  maxPathDepth: number;
  /** Bytes of an entry's path (UTF-8) or a symlink's target. */
  maxPathLength: number;
}

const MIB = 1024 * 1024;

/** Generous for a build context, small enough that one upload cannot fill a host. */
export const DEFAULT_BUNDLE_LIMITS: Readonly<BundleLimits> = Object.freeze({
  maxCompressedBytes: 512 * MIB,
  maxUncompressedBytes: 2048 * MIB,
  maxEntries: 50_000,
  maxFileBytes: 1024 * MIB,
  maxPathDepth: 64,
  maxPathLength: 1024,
});

export function resolveLimits(overrides: Partial<BundleLimits> = {}): BundleLimits {
  const limits = { ...DEFAULT_BUNDLE_LIMITS, ...overrides };
  for (const [name, value] of Object.entries(limits)) {
    if (!Number.isSafeInteger(value) || value < 1) {
      throw new CocoonError('invalid_config', `bundle limit ${name} must be a positive integer, got ${String(value)}`);
    }
  }
  return limits;
}
