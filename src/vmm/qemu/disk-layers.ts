/**
 * qcow2 disk layers and their backing files, as `qemu-img` makes them.
 *
 * A layer names its backing file by a path RELATIVE to the layer's own directory (QEMU resolves
 * it from there): a data directory moved to another path, or a snapshot chain copied into
 * another host's cache, still opens. Layers are made where they stay, or in a sibling of that
 * directory (`<dir>.partial`, a run directory beside the generations), so the relative name is
 * right before and after the move; where a layer lands somewhere else, `relinkBacking` writes
 * the name again after the move, before the layer is checksummed.
 */
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { CocoonError, errorMessage } from '../../common/errors.ts';
import type { BackingDisk } from '../driver.ts';
import { writeLayerFromTemplate } from './layer-template.ts';
import { restoreTuning } from './tuning.ts';
import { qemuExitsSettled } from './exits.ts';

const run = promisify(execFile);

/** A qcow2 file starts with these four bytes ("QFI\xfb"). */
const QCOW2_MAGIC = 0x514649fb;

/** The name `layer` should give `backing`: relative to the layer's directory. */
export function relativeBackingName(layer: string, backing: string): string {
  return path.relative(path.dirname(path.resolve(layer)), path.resolve(backing));
}

/** A qcow2 layer over `backing`: the VM writes there, the backing file never changes. */
export async function createDiskLayer(backing: string, backingFormat: 'raw' | 'qcow2', layer: string): Promise<void> {
  // A snapshot's QEMU still exiting keeps a lock on the backing file, but no longer the write
  // lock (its migration inactivated the disk), and `qemu-img create` opens a backing file
  // sharing it (force-share): with `overlapExits` nothing waits (tuning.ts).
  if (!restoreTuning.overlapExits) await qemuExitsSettled();
  const name = relativeBackingName(layer, backing);
  try {
    // The same bytes as qemu-img's, without starting it for every layer (layer-template.ts).
    if (restoreTuning.layerTemplate && (await writeLayerFromTemplate(backing, backingFormat, layer, name))) return;
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', name, '-F', backingFormat, layer]);
  } catch (error) {
    throw new CocoonError('disk_layer_failed', `cannot create a disk layer over ${backing}: ${errorMessage(error)}`, { cause: error });
  }
}

/**
 * Points a qcow2 layer at another backing file (`sameContent`: the header only, else qemu-img's
 * safe rebase, which reads the old backing file). A layer copied from `copiedFrom` into another
 * directory carries a relative name that resolves only from there: it is rewritten first.
 */
export async function rebaseDisk(disk: string, onto: BackingDisk, options: { copiedFrom?: string } = {}): Promise<void> {
  await qemuExitsSettled();
  if (options.copiedFrom && !onto.sameContent) await relinkBacking(disk, { finalDir: path.dirname(disk), formerDir: options.copiedFrom });
  try {
    await run('qemu-img', ['rebase', '-q', ...(onto.sameContent ? ['-u'] : []), '-f', 'qcow2', '-b', relativeBackingName(disk, onto.path), '-F', onto.format, disk]);
  } catch (error) {
    throw new CocoonError('disk_layer_failed', `cannot rebase ${disk} onto ${onto.path}: ${errorMessage(error)}`, { cause: error });
  }
}

/** The backing file name in a qcow2 header as written there; undefined for raw files and layers without one. */
export async function readBackingName(file: string): Promise<string | undefined> {
  const handle = await fs.promises.open(file, 'r');
  try {
    const header = Buffer.alloc(24);
    const { bytesRead } = await handle.read(header, 0, 24, 0);
    if (bytesRead < 24 || header.readUInt32BE(0) !== QCOW2_MAGIC) return undefined;
    const offset = header.readBigUInt64BE(8);
    const size = header.readUInt32BE(16);
    if (offset === 0n || size === 0 || size > 4096) return undefined;
    const name = Buffer.alloc(size);
    await handle.read(name, 0, size, Number(offset));
    return name.toString('utf8');
  } finally {
    await handle.close();
  }
}

/**
 * What the backing name of a layer that now lives in `finalDir` (having been made in
 * `formerDir`) should be, or undefined when it is right already (or there is none). A relative
 * name is resolved where it leads to an existing file: from `finalDir` first (already rewritten
 * or made for it), then from `formerDir`.
 */
export async function wantedBackingName(layer: string, dirs: { finalDir: string; formerDir: string }): Promise<string | undefined> {
  const name = await readBackingName(layer);
  if (name === undefined || name.includes(':')) return undefined; // none, or a protocol (nbd:, …) Cocoon never writes
  let backing: string;
  if (path.isAbsolute(name)) backing = name;
  else {
    const fromFinal = path.resolve(dirs.finalDir, name);
    backing = fs.existsSync(fromFinal) ? fromFinal : path.resolve(dirs.formerDir, name);
  }
  const wanted = path.relative(path.resolve(dirs.finalDir), backing);
  return wanted === name ? undefined : wanted;
}

/**
 * Makes the backing name of `layer` (which no QEMU has open: the header is rewritten by
 * `qemu-img rebase -u`, which takes the image's lock) relative to `finalDir`, where the layer
 * lives from now on. Cheap when it is right already (the header is read, nothing run).
 */
export async function relinkBacking(layer: string, dirs: { finalDir: string; formerDir: string }): Promise<void> {
  const wanted = await wantedBackingName(layer, dirs);
  if (wanted === undefined) return;
  try {
    const { stdout } = await run('qemu-img', ['info', '--output=json', '-U', '-f', 'qcow2', layer]);
    const format = (JSON.parse(stdout) as { 'backing-filename-format'?: string })['backing-filename-format'];
    await run('qemu-img', ['rebase', '-q', '-u', '-f', 'qcow2', '-b', wanted, ...(format ? ['-F', format] : []), layer]);
  } catch (error) {
    throw new CocoonError('disk_layer_failed', `cannot point ${layer} at its backing file by a relative path: ${errorMessage(error)}`, { cause: error });
  }
}
