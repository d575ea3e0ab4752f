/**
 * qcow2 disk layers written from a template instead of a `qemu-img create` each: starting
 * qemu-img costs a restore 30-70 ms on the 2-core host (issue 12, `vm.restore_phase_disk_layer_ms`),
 * and once QEMU starts while the memory is copied, the layer is on the restore's critical path.
 *
 * A fresh layer is the same bytes for every backing file of one format and virtual size, but
 * for the backing file's name in its first cluster (checked: `qemu-img create -u -b x` with
 * the name written in afterwards is byte for byte what `qemu-img create -b NAME` writes). So
 * qemu-img makes one template per (format, size), this process remembers it, and each layer is
 * that template with its own name. Anything unexpected in a template (another version, a name
 * that would not fit its cluster, data after the name) answers false: the caller runs qemu-img.
 */
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import { promisify } from 'node:util';

const run = promisify(execFile);

const QCOW2_MAGIC = 0x514649fb;
const PLACEHOLDER = 'x';
/** QEMU refuses longer backing file names. */
const MAX_NAME_BYTES = 1023;
/** Templates kept (one per backing format and size in use). */
const MAX_TEMPLATES = 32;

interface Template {
  bytes: Buffer;
  nameOffset: number;
  clusterBytes: number;
}

const templates = new Map<string, Promise<Template | undefined>>();

/** The virtual size a layer over `backing` gets (a raw file's size; a qcow2 file's header). */
async function virtualSize(backing: string, format: 'raw' | 'qcow2'): Promise<bigint | undefined> {
  if (format === 'raw') return BigInt((await fs.promises.stat(backing)).size);
  const handle = await fs.promises.open(backing, 'r');
  try {
    const header = Buffer.alloc(32);
    const { bytesRead } = await handle.read(header, 0, 32, 0);
    if (bytesRead < 32 || header.readUInt32BE(0) !== QCOW2_MAGIC) return undefined;
    return header.readBigUInt64BE(24);
  } finally {
    await handle.close();
  }
}

/** A layer made by qemu-img with the placeholder name, checked; undefined when it is not as expected. */
async function makeTemplate(format: 'raw' | 'qcow2', size: bigint, scratch: string): Promise<Template | undefined> {
  try {
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-u', '-b', PLACEHOLDER, '-F', format, scratch, String(size)]);
    const bytes = await fs.promises.readFile(scratch);
    if (bytes.length < 112 || bytes.readUInt32BE(0) !== QCOW2_MAGIC || bytes.readUInt32BE(4) !== 3) return undefined;
    const nameOffset = Number(bytes.readBigUInt64BE(8));
    const nameBytes = bytes.readUInt32BE(16);
    const clusterBytes = 2 ** bytes.readUInt32BE(20);
    if (bytes.readBigUInt64BE(24) !== size || nameBytes !== PLACEHOLDER.length || clusterBytes > bytes.length) return undefined;
    if (bytes.toString('latin1', nameOffset, nameOffset + nameBytes) !== PLACEHOLDER) return undefined;
    // Nothing may follow the name in its cluster: a longer name then overwrites only zeros.
    if (bytes.subarray(nameOffset + nameBytes, clusterBytes).some((b) => b !== 0)) return undefined;
    return { bytes, nameOffset, clusterBytes };
  } catch {
    return undefined;
  } finally {
    await fs.promises.rm(scratch, { force: true });
  }
}

/**
 * Writes a new qcow2 layer at `layer` over `backing`, naming it `backingName` (as qemu-img's
 * `-b` would); answers false, having written nothing, when a template does not serve.
 */
export async function writeLayerFromTemplate(backing: string, format: 'raw' | 'qcow2', layer: string, backingName: string): Promise<boolean> {
  const name = Buffer.from(backingName, 'utf8');
  if (name.length === 0 || name.length > MAX_NAME_BYTES || name.includes(0)) return false;
  const size = await virtualSize(backing, format).catch(() => undefined);
  if (size === undefined) return false;
  const key = `${format}:${size}`;
  let made = templates.get(key);
  if (!made) {
    if (templates.size >= MAX_TEMPLATES) templates.delete(templates.keys().next().value!);
    made = makeTemplate(format, size, `${layer}.template`);
    templates.set(key, made);
  }
  const template = await made;
  if (!template || template.nameOffset + name.length > template.clusterBytes) return false;
  const bytes = Buffer.from(template.bytes);
  bytes.fill(0, template.nameOffset, template.nameOffset + PLACEHOLDER.length);
  name.copy(bytes, template.nameOffset);
  bytes.writeUInt32BE(name.length, 16);
  try {
    await fs.promises.writeFile(layer, bytes, { flag: 'wx', mode: 0o644 });
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== 'EEXIST') await fs.promises.rm(layer, { force: true });
    throw error;
  }
  return true;
}

/** For tests: forget the templates. */
export function forgetLayerTemplates(): void {
  templates.clear();
}
