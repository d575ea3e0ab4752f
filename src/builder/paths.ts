import { join } from 'node:path';
import { setting } from '../common/settings.ts';

/** The builder's per-machine cache (`$COCOON_CACHE_DIR/builder`, default `<repo>/.cache/builder`). */
export function builderCacheDir(): string {
  return join(setting('COCOON_CACHE_DIR'), 'builder');
}
