/** Where Cocoon keeps things. Everything is overridable by environment for tests and deployments. */
import path from 'node:path';
import { fileURLToPath } from 'node:url';

/** The repository (or installed package) root. */
export const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

/** Built and downloaded artifacts that can be rebuilt: kernel, initramfs, base images. */
export function cacheDir(): string {
  return path.resolve(process.env.COCOON_CACHE_DIR ?? path.join(repoRoot, '.cache'));
}

/** All state of a Cocoon server: database, objects, images, microVMs. */
export function dataDir(): string {
  return path.resolve(process.env.COCOON_DATA_DIR ?? path.join(process.cwd(), '.cocoon'));
}
