import { join } from 'node:path';
import { LocalObjectStore } from './local.ts';
import type { ObjectStore } from './object-store.ts';
import { S3ObjectStore, s3ConfigFromEnv } from './s3.ts';
import { setting, type Env } from '../common/settings.ts';

/**
 * The platform's object store: S3 when COCOON_S3_BUCKET is set (see `s3ConfigFromEnv`), else
 * the directory `$COCOON_DATA_DIR/objects`.
 */
export function objectStoreFromEnv(env: Env = process.env): ObjectStore {
  const s3 = s3ConfigFromEnv(env);
  if (s3 !== undefined) return new S3ObjectStore(s3);
  return new LocalObjectStore(join(setting('COCOON_DATA_DIR', env), 'objects'));
}
