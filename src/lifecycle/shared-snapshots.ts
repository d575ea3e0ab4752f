/**
 * A microVM's snapshots in the object store, in a cluster (src/snapshots/mode.ts): what the
 * lifecycle calls so that any host can resume a SUSPENDED microVM.
 *
 * - `commit` (a suspend, before SUSPENDED is recorded): every generation of the microVM's chain
 *   that the object store lacks is uploaded, the new one included. A chain's older generations
 *   keep only their disk layer, which is all a resume reads of them.
 * - `ready` (before a suspend touches the VM): the object store answers and holds the image's
 *   snapshot and the chain so far; when S3 is down, the suspend fails at once and the VM never
 *   stops (the failure after the snapshot is handled by the engine: it restores the VM).
 * - `ensureLocal` (before a launch or resume): downloads into this host's data directory what a
 *   restore of the generation reads and the host lacks: the image's snapshot (cached once per
 *   host), the chain's disk layers, the current generation whole.
 */
import fs from 'node:fs';
import path from 'node:path';
import { CocoonError, errorMessage } from '../common/errors.ts';
import { generationPrefix, imageSnapshotPrefix, type SnapshotStore } from '../snapshots/snapshot-store.ts';
import { generationDir, imageSnapshotDir } from './paths.ts';

/**
 * Files of an older generation that a resume never reads (collectGarbage removes them too): its
 * memory (whole, or a diff against the image's: docs/vmm.md "Memory diffs") and device state.
 */
const CURRENT_ONLY = ['mem', 'mem.diff', 'state'];

interface Owner {
  id: string;
  imageId: string | null;
}

interface Chain {
  generation: number;
  chain: number[];
}

export class SharedSnapshots {
  readonly store: SnapshotStore;
  readonly dataDir: string;

  constructor(store: SnapshotStore, dataDir: string) {
    this.store = store;
    this.dataDir = dataDir;
  }

  /** The image's snapshot on this host, downloaded (read-only, like a build's) when missing. */
  async ensureImage(imageId: string): Promise<void> {
    await this.store.fetch(imageSnapshotPrefix(imageId), imageSnapshotDir(this.dataDir, imageId), { readOnly: true });
  }

  /** Everything a restore of `runtime.generation` reads, on this host. */
  async ensureLocal(microvm: Owner, runtime: Chain): Promise<void> {
    if (microvm.imageId !== null) await this.ensureImage(microvm.imageId);
    for (const generation of runtime.chain) {
      const dir = generationDir(this.dataDir, microvm.id, generation);
      if (generation === runtime.generation) {
        await this.store.fetch(generationPrefix(microvm.id, generation), dir);
      } else if (!fs.existsSync(path.join(dir, 'manifest.json'))) {
        const index = await this.store.readIndex(generationPrefix(microvm.id, generation));
        const names = index.files.map((file) => file.name).filter((name) => name !== 'manifest.json' && !CURRENT_ONLY.includes(name));
        await this.store.fetch(generationPrefix(microvm.id, generation), dir, { names });
      }
    }
  }

  /**
   * Before a suspend: fails with `object_store_unavailable` unless the object store answers;
   * uploads what the next generation will stand on and the store lacks.
   */
  async ready(microvm: Owner, runtime: Chain): Promise<void> {
    try {
      // One request that always reaches S3 (published prefixes are remembered, so `commit`
      // alone might not ask anything).
      await this.store.objects.exists(`${generationPrefix(microvm.id, runtime.generation)}/index.json`);
      await this.commit(microvm, runtime);
    } catch (error) {
      throw notStored(microvm.id, error);
    }
  }

  /**
   * Uploads every generation of the chain (and the image's snapshot) that the object store
   * lacks. `fresh`: `runtime.generation` was just written here, so finding it stored already
   * means another host wrote it (this one lost the microVM meanwhile: a partition, a slow
   * host): `lease_lost`, and nothing of the other host's is overwritten.
   */
  async commit(microvm: Owner, runtime: Chain, options: { fresh?: boolean } = {}): Promise<void> {
    if (options.fresh) {
      const prefix = generationPrefix(microvm.id, runtime.generation);
      let taken: boolean;
      try {
        taken = await this.store.objects.exists(`${prefix}/index.json`);
      } catch (error) {
        throw notStored(microvm.id, error);
      }
      if (taken) {
        throw new CocoonError('lease_lost', `generation ${runtime.generation} of microVM ${microvm.id} is in the object store already: another host wrote it, so this host no longer holds the microVM; its snapshot here is not stored`, { status: 409 });
      }
    }
    try {
      if (microvm.imageId !== null) {
        const prefix = imageSnapshotPrefix(microvm.imageId);
        const local = imageSnapshotDir(this.dataDir, microvm.imageId);
        // An image READY before the host joined a cluster: published on first use.
        if (!(await this.store.isPublished(prefix)) && fs.existsSync(path.join(local, 'manifest.json'))) await this.store.publish(prefix, local);
      }
      for (const generation of runtime.chain) {
        const prefix = generationPrefix(microvm.id, generation);
        if (await this.store.isPublished(prefix)) continue;
        await this.store.publish(prefix, generationDir(this.dataDir, microvm.id, generation));
      }
    } catch (error) {
      throw notStored(microvm.id, error);
    }
  }

  /** Whether the object store holds the generation's snapshot (or the image's, at generation 0). */
  async isStored(microvm: Owner, runtime: Chain): Promise<boolean> {
    if (runtime.generation > 0) return this.store.isPublished(generationPrefix(microvm.id, runtime.generation));
    return microvm.imageId !== null && this.store.isPublished(imageSnapshotPrefix(microvm.imageId));
  }

  /** Removes generations from the object store (best effort: an unreferenced one is never read). */
  async forget(microvmId: string, generations: number[]): Promise<void> {
    for (const generation of generations) {
      await this.store.remove(generationPrefix(microvmId, generation)).catch(() => undefined);
    }
  }
}

/** The suspend's error when its snapshot cannot be stored: the microVM runs on, try again later. */
function notStored(microvmId: string, error: unknown): CocoonError {
  const code = error instanceof CocoonError && error.code === 'object_store_error' ? 'object_store_error' : 'object_store_unavailable';
  return new CocoonError(
    code,
    `microVM ${microvmId} was not suspended: its snapshot could not be stored in the object store (${errorMessage(error)}); it keeps running, suspend it again once the object store is reachable`,
    { status: code === 'object_store_error' ? 502 : 503, cause: error },
  );
}
