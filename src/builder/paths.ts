import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const REPO_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');

/** The builder's per-machine cache (`$COCOON_CACHE_DIR/builder`, default `<repo>/.cache/builder`). */
export function builderCacheDir(): string {
  return process.env.COCOON_CACHE_DIR ? join(process.env.COCOON_CACHE_DIR, 'builder') : join(REPO_ROOT, '.cache', 'builder');
}
