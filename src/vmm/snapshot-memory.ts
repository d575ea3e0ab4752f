/**
 * A suspend's memory, kept as a diff against its image's inside the snapshot commit (issue 12;
 * docs/vmm.md "Memory diffs"), the same for every VMM whose guest RAM is a file:
 *
 * - before the pause: the base is checked and the diff helper started, held (mem-diff.ts
 *   `prepareMemoryDiff`);
 * - once the vCPUs are stopped (`go`): the helper compares the RAM file with the base and writes
 *   `mem.diff` into the partial snapshot directory and syncs it, while the driver saves the
 *   device state and seals the disk;
 * - before the manifest is written (`finish`): the diff's manifest entry. The whole RAM file is
 *   neither checksummed, synced nor moved: it stays the VM's and goes with it.
 *
 * A diff that cannot be made (the base unusable, the helper failing, no space for the diff) is
 * not fatal: `finish` moves the RAM file into the snapshot and checksums and syncs it, as a
 * snapshot without a base does, so the generation is whole. The commit protocol is unchanged:
 * whatever `finish` answers is named by the manifest, written and synced last.
 */
import fs from 'node:fs';
import path from 'node:path';
import { errorMessage } from '../common/errors.ts';
import { log } from '../common/log.ts';
import { MEMORY_DIFF_NAME, type HeldMemoryDiff, prepareMemoryDiff } from './mem-diff.ts';
import { warmDiffServer } from './native/diff-server.ts';
import { moveFile, sealData } from './snapshot-commit.ts';
import type { SnapshotManifest } from './types.ts';

type MemoryEntry = SnapshotManifest['files']['mem'];

export interface SnapshotMemory {
  /** The vCPUs are stopped: the RAM file does not change any more, the diff may start. */
  go(): void;
  /**
   * The memory's manifest entry once its file is written and synced (`mem.diff`, or, should the
   * diff fail, the whole RAM file moved to `wholePath`; `moved` is told of that move, so that an
   * abandoned snapshot gives the file back).
   */
  finish(wholePath: string, moved: (from: string, to: string) => void): Promise<MemoryEntry>;
  /** The snapshot is abandoned: the helper ends (the partial directory goes with its diff). */
  cancel(): void;
}

/**
 * Starts the memory diff of a snapshot of the VM whose RAM file is `ramPath`, against the memory
 * of `baseDir`, into `partial`. Undefined when the memory cannot be a diff against that base:
 * the snapshot then keeps it whole.
 */
export async function startMemoryDiff(options: {
  vm: string;
  baseDir: string;
  ramPath: string;
  partial: string;
  memoryBytes: number;
  durable: boolean;
  /** The narrower compare; a job of the long-lived helper (mem-diff.ts `prepareMemoryDiff`). */
  narrow?: boolean;
  server?: boolean;
  /** Threads the compare runs on (default 1). */
  threads?: number;
}): Promise<SnapshotMemory | undefined> {
  const outFile = path.join(options.partial, MEMORY_DIFF_NAME);
  let held: HeldMemoryDiff | undefined;
  try {
    held = await prepareMemoryDiff({ baseDir: options.baseDir, memFile: options.ramPath, outFile, memoryBytes: options.memoryBytes, durable: options.durable, narrow: options.narrow ?? false, server: options.server ?? false, threads: options.threads ?? 1 });
  } catch (error) {
    log.warn({ vm: options.vm, error: errorMessage(error) }, 'cannot keep only the changed memory pages; the snapshot keeps whole memory');
  }
  if (!held) return undefined;
  const diff = held;
  let running: ReturnType<HeldMemoryDiff['go']> | undefined;
  return {
    go: () => {
      running = diff.go();
      running.catch(() => undefined); // awaited by finish, or dropped with an abandoned snapshot
    },
    finish: async (wholePath, moved) => {
      try {
        if (!running) throw new Error('the diff was never started');
        const made = await running;
        log.debug({ vm: options.vm, diffPages: made.diffPages, pages: made.pages }, 'memory diff made in the snapshot');
        return made.mem;
      } catch (error) {
        log.warn({ vm: options.vm, error: errorMessage(error) }, 'cannot keep only the changed memory pages; the snapshot keeps whole memory');
      }
      await fs.promises.rm(outFile, { force: true });
      await moveFile(options.ramPath, wholePath);
      moved(options.ramPath, wholePath);
      const handle = await fs.promises.open(wholePath, 'r');
      try {
        const [[checksum]] = await sealData([handle], options.durable);
        return { name: path.basename(wholePath), sizeBytes: options.memoryBytes, checksum };
      } finally {
        await handle.close();
      }
    },
    cancel: () => diff.cancel(),
  };
}

let warming: NodeJS.Timeout | undefined;

/**
 * Starts the long-lived diff helper (native/diff-server.ts) soon, once per process, so that no
 * suspend pays its start: a VM was restored, a suspend of it may follow. Two seconds later, so
 * that the spawn does not take the cores from the restore and its guest's first answer.
 */
export function warmMemoryDiffs(): void {
  warming ??= setTimeout(warmDiffServer, 2000);
  warming.unref();
}
