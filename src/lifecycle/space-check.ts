/**
 * Launches and resumes refused up front when the data directory's disk cannot hold what they
 * could need: the microVM's memory whole (the space ledger's rule, src/vmm/space-ledger.ts: a
 * big guest's RAM file is sparse and may grow to its full size while it runs). Refused here,
 * nothing is written and the microVM keeps its state (a launch creates no microVM; a SUSPENDED
 * one stays SUSPENDED). The RAM file's own admission at the restore remains the guarantee (two
 * starts at once); this check makes the refusal a clean `no_space` answer before any state moves.
 */
import fs from 'node:fs';
import { readSnapshotManifest } from '../vmm/snapshot.ts';
import { assertRoomForRam } from '../vmm/space-ledger.ts';
import { microvmsRoot } from './paths.ts';

const MiB = 1024 * 1024;

/** Where the microVMs' files go (the data directory until the first one made its folder). */
function filesystemOf(dataDir: string): string {
  const root = microvmsRoot(dataDir);
  return fs.existsSync(root) ? root : dataDir;
}

/** A new microVM of `memoryMiB` from an image: `no_space` unless its memory fits. */
export async function assertRoomToLaunch(dataDir: string, memoryMiB: number, what: string): Promise<void> {
  await assertRoomForRam(filesystemOf(dataDir), memoryMiB * MiB, what);
}

/** A SUSPENDED microVM woken from the snapshot in `snapshotDir`: `no_space` unless its memory fits. */
export async function assertRoomToResume(dataDir: string, snapshotDir: string, what: string): Promise<void> {
  const manifest = await readSnapshotManifest(snapshotDir).catch(() => undefined);
  if (!manifest) return; // the restore itself says what is wrong with the snapshot
  await assertRoomForRam(filesystemOf(dataDir), manifest.shape.memoryMiB * MiB, what);
}
