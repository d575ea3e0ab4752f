/**
 * Where the guest kernel and initramfs are: `scripts/build-guest.sh` builds them into the cache
 * and writes `guest/guest.json` there. A missing or stale manifest is a setup problem with a
 * clear fix, not a crash.
 */
import fs from 'node:fs';
import path from 'node:path';
import { CocoonError } from '../common/errors.ts';
import { cacheDir } from '../config/paths.ts';
import type { GuestKernel } from '../vmm/types.ts';

export interface GuestArtifacts extends GuestKernel {
  kernelRelease: string;
  initHash: string;
}

export function loadGuestArtifacts(dir: string = cacheDir()): GuestArtifacts {
  const manifestPath = path.join(dir, 'guest', 'guest.json');
  let manifest: GuestArtifacts;
  try {
    manifest = JSON.parse(fs.readFileSync(manifestPath, 'utf8')) as GuestArtifacts;
  } catch (error) {
    throw new CocoonError(
      'kernel_missing',
      `the guest kernel is not built (${manifestPath} is missing or unreadable); run \`npm run setup\``,
      { cause: error },
    );
  }
  for (const file of [manifest.kernel, manifest.initramfs]) {
    if (typeof file !== 'string' || !fs.existsSync(file)) {
      throw new CocoonError('kernel_missing', `guest file ${String(file)} is missing; run \`npm run setup\``);
    }
  }
  return manifest;
}
