/**
 * A microVM's files between runs: which snapshot generations it needs (its runtime record),
 * removing what it does not, folding a long chain of disk layers into one, and its log.
 */
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { CocoonError, errorMessage } from '../common/errors.ts';
import { fsyncDir } from '../common/fs.ts';
import type { VmDriver } from '../vmm/driver.ts';
import { MEMORY_DIFF_NAME, type MemoryDiffResult, diffSnapshotMemory } from '../vmm/mem-diff.ts';
import { sealSnapshotFiles } from '../vmm/snapshot-safety.ts';
import { dataChecksums, readSnapshotManifest, writeSnapshotManifest } from '../vmm/snapshot.ts';
import { GENERATION_DIR, generationDir, logPath, microvmDir, runDir } from './paths.ts';

const run = promisify(execFile);

/**
 * What the lifecycle keeps in a microVM's `runtime` column.
 * - generation: the committed snapshot its state is in (0: the image's); a RUNNING microVM was
 *   restored from it and writes to a layer over its disk.
 * - chain: the generations whose disk layers that disk stands on, oldest first, the current
 *   one included (empty at generation 0). Only the last keeps its memory and device state.
 */
export interface Runtime {
  generation: number;
  chain: number[];
  /** While RUNNING: the VM process's pid and guest port → host port (informational; adoption reads the run directory). */
  pid?: number;
  ports?: Record<string, number>;
}

export function parseRuntime(value: Record<string, unknown>): Runtime {
  const generation = Number.isInteger(value.generation) ? (value.generation as number) : 0;
  const chain = Array.isArray(value.chain) ? value.chain.filter((g): g is number => Number.isInteger(g) && g > 0) : [];
  return { generation, chain: generation > 0 && !chain.includes(generation) ? [...chain, generation] : chain };
}

export function runtimeRecord(runtime: Runtime): Record<string, unknown> {
  return { ...runtime };
}

/**
 * Removes what the microVM no longer needs: generations outside its chain, memory and device
 * state of all but the current generation, and leftovers of interrupted snapshots. Only call it
 * while no operation of that microVM is in flight.
 */
export async function collectGarbage(dataDir: string, id: string, runtime: Runtime): Promise<void> {
  let entries: string[];
  try {
    entries = await fs.promises.readdir(microvmDir(dataDir, id));
  } catch {
    return;
  }
  for (const entry of entries) {
    const full = path.join(microvmDir(dataDir, id), entry);
    if (entry === 'vm') continue;
    const match = GENERATION_DIR.exec(entry);
    const generation = match ? Number(match[1]) : undefined;
    if (generation === undefined || !runtime.chain.includes(generation)) {
      await fs.promises.rm(full, { recursive: true, force: true });
    } else if (generation !== runtime.generation) {
      await Promise.all(['mem', MEMORY_DIFF_NAME, 'state'].map((name) => fs.promises.rm(path.join(full, name), { force: true })));
    } else {
      await removeUnreferencedMemory(full);
    }
  }
}

/**
 * The memory file the current generation's manifest does not name: the whole `mem` left by a
 * daemon that died between a diff's commit and the file's removal, or a diff that was never
 * committed. Both are unreferenced: a restore reads only what the manifest names.
 */
async function removeUnreferencedMemory(dir: string): Promise<void> {
  let name: string;
  try {
    name = (await readSnapshotManifest(dir)).files.mem.name;
  } catch {
    return; // no manifest: nothing to compare with (the generation is not this code's to judge)
  }
  await Promise.all(['mem', MEMORY_DIFF_NAME].filter((other) => other !== name).map((other) => fs.promises.rm(path.join(dir, other), { force: true })));
}

/**
 * Makes a just committed generation keep only the memory pages that differ from its image's
 * (docs/vmm.md "Memory diffs"): crash-safe, the generation valid throughout. Answers what was
 * done, or undefined when the generation cannot stand on that image's memory (it stays whole).
 */
export async function diffGeneration(dataDir: string, id: string, generation: number, imageSnapshot: string, durable: boolean): Promise<MemoryDiffResult | undefined> {
  return diffSnapshotMemory(generationDir(dataDir, id, generation), imageSnapshot, { durable });
}

/** Removes a dead VM's files from the run directory (its memory and disk layer), keeping the log. */
export async function clearRunFiles(driver: Pick<VmDriver, 'clearRunFiles'>, dataDir: string, id: string): Promise<void> {
  await driver.clearRunFiles(runDir(dataDir, id));
}

/**
 * Folds the disk chain of `runtime.generation` into one layer over the image's disk, as a new
 * generation (memory and device state hard-linked, the disk copied and rebased: only clusters
 * above the image's disk are read). Answers the new runtime; the caller records it and then
 * collects the old generations. Nothing it leaves behind on failure is referenced.
 */
export async function compactGeneration(
  driver: Pick<VmDriver, 'rebaseDisk'>,
  dataDir: string,
  id: string,
  imageSnapshot: string,
  runtime: Runtime,
  durable: boolean,
): Promise<Runtime> {
  const from = generationDir(dataDir, id, runtime.generation);
  const next = runtime.generation + 1;
  const target = generationDir(dataDir, id, next);
  const partial = `${target}.partial`;
  await fs.promises.rm(target, { recursive: true, force: true });
  await fs.promises.rm(partial, { recursive: true, force: true });
  await fs.promises.mkdir(partial, { recursive: true, mode: 0o700 });
  try {
    const manifest = await readSnapshotManifest(from);
    const base = await readSnapshotManifest(imageSnapshot);
    const { files } = manifest;
    await fs.promises.link(path.join(from, files.mem.name), path.join(partial, files.mem.name));
    await fs.promises.link(path.join(from, files.state.name), path.join(partial, files.state.name));
    const disk = path.join(partial, files.disk.name);
    await run('cp', ['--sparse=always', '--', path.join(from, files.disk.name), disk]);
    await driver.rebaseDisk(disk, { path: path.resolve(imageSnapshot, base.files.disk.name), format: base.files.disk.format }, { copiedFrom: from });
    if (durable) {
      const handle = await fs.promises.open(disk, 'r+');
      try {
        await handle.datasync();
      } finally {
        await handle.close();
      }
    }
    const size = (await fs.promises.stat(disk)).size;
    // The rebase rewrote the disk's file: it gets its own checksum, and is sealed (root's,
    // readable by QEMU's group) like every snapshot disk.
    const [checksum] = await dataChecksums([disk]);
    await sealSnapshotFiles(partial, { mem: path.join(partial, files.mem.name), disk });
    await writeSnapshotManifest(partial, { ...manifest, files: { ...files, disk: { ...files.disk, sizeBytes: size, checksum } } }, durable);
    await fs.promises.rename(partial, target);
    if (durable) await fsyncDir(path.dirname(target));
    return { generation: next, chain: [next] };
  } catch (error) {
    await fs.promises.rm(partial, { recursive: true, force: true });
    throw new CocoonError('compaction_failed', `cannot fold the disk layers of ${id}: ${errorMessage(error)}`, { cause: error });
  }
}

/** Appends a lifecycle note to the microVM's log (best effort: a full disk must not stop a transition). */
export async function appendLog(dataDir: string, id: string, line: string): Promise<void> {
  try {
    await fs.promises.mkdir(runDir(dataDir, id), { recursive: true, mode: 0o700 });
    await fs.promises.appendFile(logPath(dataDir, id), `[cocoon ${new Date().toISOString()}] ${line}\n`, { mode: 0o600 });
  } catch {
    // best effort
  }
}

/** The last `maxBytes` of the microVM's log (its rotated half included). */
export async function readLogTail(dataDir: string, id: string, maxBytes = 256 * 1024): Promise<string> {
  const file = logPath(dataDir, id);
  const read = async (name: string) => {
    try {
      return await fs.promises.readFile(name);
    } catch {
      return Buffer.alloc(0);
    }
  };
  const all = Buffer.concat([await read(`${file}.1`), await read(file)]);
  return all.subarray(Math.max(0, all.length - maxBytes)).toString('utf8');
}
