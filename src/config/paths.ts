/** Where Cocoon keeps things (COCOON_CACHE_DIR, COCOON_DATA_DIR: docs/configuration.md). */
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { setting } from '../common/settings.ts';

/** The repository (or installed package) root. */
export const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

/** Built and downloaded artifacts that can be rebuilt: kernel, initramfs, base images. */
export function cacheDir(): string {
  return setting('COCOON_CACHE_DIR');
}

/** All state of a Cocoon server: database, objects, images, microVMs. */
export function dataDir(): string {
  return setting('COCOON_DATA_DIR');
}
