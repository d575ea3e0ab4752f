/**
 * Where a microVM's files live under the data directory:
 *
 *   microvms/<id>/vm/         the run directory: QEMU's sockets, launch record, the running VM's
 *                             RAM file (`mem`) and disk layer (`disk.qcow2`), and the microVM's
 *                             log (`serial.log`: console, hook output, lifecycle notes)
 *   microvms/<id>/gen-<n>/    committed snapshot n (written by a suspend): `manifest.json`,
 *                             `state`, `mem`, `disk.qcow2` — memory and disk as one pair
 *
 * Generation 0 is the image's own snapshot (`images/<imageId>/snapshot`), never copied. A
 * microVM resumed from generation n writes to a new layer in `vm/` over n's disk; its next
 * suspend commits memory and that layer together as generation n+1.
 */
import path from 'node:path';
import { imageSnapshotDir } from '../images/paths.ts';

export function microvmsRoot(dataDir: string): string {
  return path.join(dataDir, 'microvms');
}

export function microvmDir(dataDir: string, id: string): string {
  return path.join(microvmsRoot(dataDir), id);
}

/** Where the VM driver keeps the processes it starts ahead for restores (src/vmm/driver.ts `openPool`). */
export function vmPoolDir(dataDir: string): string {
  return path.join(dataDir, 'vm-pool');
}

export function runDir(dataDir: string, id: string): string {
  return path.join(microvmDir(dataDir, id), 'vm');
}

export function generationDir(dataDir: string, id: string, generation: number): string {
  return path.join(microvmDir(dataDir, id), `gen-${generation}`);
}

/** A READY image's snapshot (written by the image pipeline: src/images/paths.ts). */
export { imageSnapshotDir };

/** The snapshot a microVM's state is in at `generation`. */
export function snapshotDirFor(dataDir: string, microvm: { id: string; imageId: string | null }, generation: number): string {
  if (generation > 0) return generationDir(dataDir, microvm.id, generation);
  if (microvm.imageId === null) throw new Error(`microVM ${microvm.id} has no image to start from`);
  return imageSnapshotDir(dataDir, microvm.imageId);
}

/** The microVM's log: its console (with hook output) and the lifecycle's notes. */
export function logPath(dataDir: string, id: string): string {
  return path.join(runDir(dataDir, id), 'serial.log');
}

export const GENERATION_DIR = /^gen-(\d+)$/;
