import type { BundleFormat } from '../objectstore/bundle-ref.ts';

/**
 * The format of a bundle from its first bytes (never its name): gzip starts with 1f 8b, a zip
 * with "PK\3\4" (a local file header) or "PK\5\6" (an empty archive's end record).
 */
export function detectBundleFormat(head: Uint8Array): BundleFormat | undefined {
  if (head.length >= 2 && head[0] === 0x1f && head[1] === 0x8b) return 'tar.gz';
  if (head.length >= 4 && head[0] === 0x50 && head[1] === 0x4b) {
    if ((head[2] === 0x03 && head[3] === 0x04) || (head[2] === 0x05 && head[3] === 0x06)) return 'zip';
  }
  return undefined;
}

export const BUNDLE_CONTENT_TYPES: Readonly<Record<BundleFormat, string>> = {
  'tar.gz': 'application/gzip',
  zip: 'application/zip',
};
