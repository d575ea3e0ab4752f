/**
 * Fork and checkpoint: new microVMs, or a new image, that continue from a microVM's state at one
 * instant (docs/microvms.md, "Fork and checkpoint").
 *
 * Both take a *fork point* of the source as one operation of its queue: of a RUNNING source,
 * a snapshot taken while it runs on after a brief pause (`Vm.forkPoint`, src/vmm/driver.ts); of a SUSPENDED one,
 * its latest generation, without waking it. The fork point must not depend on the source's own
 * generations (the source may be suspended, folded or terminated later), so its disk layer is
 * rebased onto the image's disk when the source's chain has layers in between; memory, device
 * state and disk files are immutable once sealed and are shared between forks by hard links
 * (the filesystem counts the references).
 *
 * - A fork is a microVM whose generation 1 is the fork point (`microvms/<fork>/gen-1/`): the
 *   lifecycle launches it from there like a resume (fresh clock and RNG seed, own RAM file and
 *   disk layer, the image's resume hook), with its own session, idle policy and tokens.
 * - A checkpoint is an image whose snapshot is the fork point, its disk rebased onto a hard link
 *   of the bottom raw disk (`images/<image>/base.raw`), so that deleting the source image later
 *   takes nothing from it.
 *
 * Crash safety (persisted before side effects, as everywhere in the lifecycle):
 * - fork: the fork point and its links are made under ids no store row names yet; the rows are
 *   created (all or none) only once every fork's generation 1 is complete, PENDING: a restart
 *   before that removes the directories (nobody owns them), after it launches the forks. The
 *   source is only paused; a QEMU left paused is continued when it is adopted.
 * - checkpoint: the image row is created SNAPSHOTTING before anything is written; its snapshot
 *   appears whole (one rename) before it is READY. A restart in between ends it FAILED with
 *   nothing kept (the image service's recovery of interrupted builds).
 */
import fs from 'node:fs';
import path from 'node:path';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { CocoonError, errorMessage } from '../common/errors.ts';
import { log as rootLog, type Logger } from '../common/log.ts';
import { imageBaseDisk, imageBuildLogPath, imageDir } from '../images/paths.ts';
import { createImage, getImage, listImagesInStates, setImageBuildLogPath, transitionImage, type Image } from '../store/images.ts';
import { newId } from '../store/ids.ts';
import { createForks, type IdlePolicy, type Microvm } from '../store/microvms.ts';
import type { Db } from '../store/sql.ts';
import { fsyncDir } from '../common/fs.ts';
import { completeForkPoint } from '../vmm/fork-point.ts';
import { sealSnapshotFiles } from '../vmm/snapshot-safety.ts';
import { dataChecksums, readSnapshotManifest, writeSnapshotManifest } from '../vmm/snapshot.ts';
import type { BackingDisk, VmDriver } from '../vmm/driver.ts';
import type { DiskSpec } from '../vmm/types.ts';
import type { LifecycleEngine, OperationSource } from './engine.ts';
import { generationDir, imageSnapshotDir, microvmDir, runDir } from './paths.ts';
import { appendLog, runtimeRecord } from './storage.ts';

const run = promisify(execFile);

export const MAX_FORKS = 16;
/** How long a fork request waits for its forks to run before answering with their state so far. */
const FORK_WAIT_MS = 60_000;

export interface ForkInput {
  count: number;
  idlePolicy?: IdlePolicy;
  maximumDurationSeconds?: number;
  /**
   * Leave the forks SUSPENDED (no VM started): their generation 1 is committed (checksummed,
   * fsynced when durable) before the rows say SUSPENDED, and each wakes on its first request or
   * resume. Cheap: of a SUSPENDED source, hard links and a few fsyncs per fork.
   */
  suspended?: boolean;
}

export interface ForkResult {
  forks: Microvm[];
  /** How long the source's vCPUs were stopped (0 when it was SUSPENDED). */
  pausedMs: number;
}

const log = rootLog.child({ component: 'fork' });

/** The disk a fork point of this source can stand on: the image's own disk, never the source's generations. */
async function imageDisk(dataDir: string, imageId: string | null): Promise<DiskSpec> {
  if (imageId === null) throw new CocoonError('image_not_found', 'the microVM\'s image was deleted; it cannot be forked or checkpointed', { status: 409 });
  const dir = imageSnapshotDir(dataDir, imageId);
  const { files } = await readSnapshotManifest(dir);
  return { path: path.join(dir, files.disk.name), format: files.disk.format };
}

/**
 * The bottom raw disk of an image: its snapshot's disk (a built image), or the base its
 * checkpoint layer stands on (`base.raw`, a checkpoint image).
 */
async function imageRawDisk(dataDir: string, imageId: string): Promise<string> {
  const disk = await imageDisk(dataDir, imageId);
  return disk.format === 'raw' ? disk.path : imageBaseDisk(dataDir, imageId);
}

/**
 * A snapshot at `target` made from the committed snapshot `from`: memory and device state
 * hard-linked; the disk hard-linked too, or copied and rebased onto `rebaseOnto` (then it gets
 * its own checksum). Appears whole or not at all.
 */
async function snapshotFrom(
  from: string,
  target: string,
  options: { driver: Pick<VmDriver, 'rebaseDisk'>; rebaseOnto?: BackingDisk; durable: boolean; runDir: string },
): Promise<void> {
  const partial = `${target}.partial`;
  await fs.promises.rm(partial, { recursive: true, force: true });
  await fs.promises.mkdir(partial, { recursive: true, mode: 0o700 });
  try {
    const manifest = await readSnapshotManifest(from);
    const { files } = manifest;
    await fs.promises.link(path.join(from, files.mem.name), path.join(partial, files.mem.name));
    await fs.promises.link(path.join(from, files.state.name), path.join(partial, files.state.name));
    const disk = path.join(partial, files.disk.name);
    if (!options.rebaseOnto) {
      await fs.promises.link(path.join(from, files.disk.name), disk);
      await fs.promises.link(path.join(from, 'manifest.json'), path.join(partial, 'manifest.json'));
      // The links' own entries, before the rename publishes them (the files are durable already).
      if (options.durable) await fsyncDir(partial);
    } else {
      await run('cp', ['--sparse=always', '--', path.join(from, files.disk.name), disk]);
      await options.driver.rebaseDisk(disk, options.rebaseOnto, { copiedFrom: from });
      if (options.durable) {
        const handle = await fs.promises.open(disk, 'r+');
        try {
          await handle.datasync();
        } finally {
          await handle.close();
        }
      }
      const [checksum] = await dataChecksums([disk]);
      await sealSnapshotFiles(options.runDir, { mem: path.join(partial, files.mem.name), disk });
      const size = (await fs.promises.stat(disk)).size;
      await writeSnapshotManifest(partial, { ...manifest, files: { ...files, disk: { ...files.disk, sizeBytes: size, checksum } } }, options.durable);
    }
    await fs.promises.rename(partial, target);
    if (options.durable) await fsyncDir(path.dirname(target));
  } catch (error) {
    await fs.promises.rm(partial, { recursive: true, force: true });
    throw error;
  }
}

/**
 * Takes the source's fork point into `target`: RUNNING → a live fork point (brief pause);
 * SUSPENDED → from its latest generation. Answers how long the source was paused.
 */
async function takeSourcePoint(
  engine: LifecycleEngine,
  source: OperationSource,
  target: string,
  rebaseOnto: (BackingDisk) | undefined,
  pausePoint: 'fork:paused' | 'checkpoint:paused',
  durable: boolean,
  deferChecksums = false,
): Promise<number> {
  if (source.state === 'RUNNING' && source.vm) {
    const point = await source.vm.forkPoint(target, {
      durable,
      deferChecksums,
      ...(rebaseOnto ? { rebaseOnto } : {}),
      onPaused: () => engine.pausePoint(pausePoint, source.id),
    });
    log.info({ microvm: source.id, pausedMs: Math.round(point.pausedMs * 10) / 10, steps: point.steps }, 'fork point taken');
    return point.pausedMs;
  }
  if (source.state === 'SUSPENDED' && source.runtime.generation > 0) {
    // A cluster: the source may have been suspended on another host (its state is in the object store).
    await engine.shared?.ensureLocal(source, source.runtime);
    await snapshotFrom(generationDir(engine.dataDir, source.id, source.runtime.generation), target, {
      driver: engine.driver,
      durable,
      runDir: runDir(engine.dataDir, source.id),
      ...(rebaseOnto ? { rebaseOnto } : {}),
    });
    return 0;
  }
  throw new CocoonError('microvm_not_forkable', `microVM ${source.id} is ${source.state}: only a RUNNING or SUSPENDED microVM can be forked or checkpointed`, {
    status: 409,
  });
}

/** Layers of the source's disk chain that a snapshot of it stands on, below its own top layer. */
function layersBelow(source: OperationSource): number {
  // RUNNING: the live layer stands on every generation of the chain; SUSPENDED: the current
  // generation's layer is the top one, the rest of the chain is below it.
  return source.state === 'RUNNING' ? source.runtime.chain.length : Math.max(0, source.runtime.chain.length - 1);
}

/**
 * Forks a microVM `count` times. Resolves with the forks once each is RUNNING (or failed, or
 * after a minute with the state so far).
 */
export async function forkMicrovm(engine: LifecycleEngine, db: Db, region: string, source: Microvm, input: ForkInput): Promise<ForkResult> {
  if (!Number.isInteger(input.count) || input.count < 1 || input.count > MAX_FORKS) {
    throw new CocoonError('invalid_request', `count must be an integer from 1 to ${MAX_FORKS}`, { status: 400 });
  }
  const dataDir = engine.dataDir;
  const suspended = input.suspended === true;
  const ids = Array.from({ length: input.count }, () => newId('microvm'));
  const started = performance.now();
  const { forks, pausedMs, live } = await engine.exclusive(source.id, 'fork', async (current) => {
    const first = generationDir(dataDir, ids[0] as string, 1);
    try {
      await Promise.all(ids.map((id) => fs.promises.mkdir(microvmDir(dataDir, id), { recursive: true, mode: 0o700 })));
      const rebaseOnto = layersBelow(current) > 0 ? await imageDisk(dataDir, current.imageId) : undefined;
      // Neither checksummed nor fsynced on the way (the forks start from the page cache at once,
      // unverified: this process made the files moments ago): completed below, in the
      // background, before anything depends on it for long (a RUNNING microVM whose host
      // crashed is FAILED anyway; its first suspend comes later).
      const live = current.state === 'RUNNING';
      // Suspended forks are committed before their rows say SUSPENDED (checksums, fsyncs).
      const durable = suspended && engine.durable;
      const pausedMs = await takeSourcePoint(engine, current, first, rebaseOnto, 'fork:paused', durable, live && !suspended);
      await Promise.all(ids.slice(1).map((id) => snapshotFrom(first, generationDir(dataDir, id, 1), { driver: engine.driver, durable, runDir: runDir(dataDir, source.id) })));
      if (durable) await fsyncDir(path.dirname(microvmDir(dataDir, ids[0] as string)));
      const runtime = { generation: 1, chain: [1] };
      // A cluster: any host may wake a suspended fork, so its generation 1 goes to the object store first.
      if (suspended && engine.shared) for (const id of ids) await engine.shared.commit({ id, imageId: current.imageId }, runtime);
      await engine.pausePoint('fork:linked', source.id);
      const forks = await createForks(db, {
        source,
        region,
        ids,
        runtime: runtimeRecord(runtime),
        ...(input.idlePolicy ? { idlePolicy: input.idlePolicy } : {}),
        ...(input.maximumDurationSeconds ? { maximumDurationSeconds: input.maximumDurationSeconds } : {}),
        ...(suspended ? { suspendedOn: { hostId: engine.hostId } } : {}),
      });
      return { forks, pausedMs, live };
    } catch (error) {
      await Promise.all(ids.map((id) => fs.promises.rm(microvmDir(dataDir, id), { recursive: true, force: true })));
      throw error;
    }
  });
  await appendLog(dataDir, source.id, `forked ${ids.length}× (${ids.join(', ')})${suspended ? ', suspended' : ''}; paused ${pausedMs.toFixed(1)} ms`);
  if (suspended) {
    // Managed here from now on like a microVM this host suspended (its timers armed); nothing runs.
    for (const fork of forks) await engine.adoptLoaded(fork, undefined);
    log.info({ microvm: source.id, forks: ids, pausedMs: Math.round(pausedMs * 10) / 10, forkMs: Math.round(performance.now() - started) }, 'microVM forked, suspended');
    return { forks, pausedMs };
  }
  const forked = performance.now();
  for (const fork of forks) await engine.launch(fork, { verifyData: live ? false : 'if-present' });
  void completeForkPoint(
    ids.map((id) => generationDir(dataDir, id, 1)),
    engine.durable,
  ).catch((error: unknown) => log.warn({ forks: ids, err: errorMessage(error) }, 'cannot complete the fork point (checksums, write-back)'));
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<void>((resolve) => {
    timer = setTimeout(resolve, FORK_WAIT_MS);
  });
  await Promise.race([Promise.all(forks.map((fork) => engine.settled(fork.id))), late]);
  clearTimeout(timer);
  log.info(
    { microvm: source.id, forks: ids, pausedMs: Math.round(pausedMs * 10) / 10, forkMs: Math.round(forked - started), launchMs: Math.round(performance.now() - forked) },
    'microVM forked',
  );
  return { forks, pausedMs };
}

export interface CheckpointResult {
  image: Image;
  /** Resolves once the image is READY or FAILED (the API answers before). */
  done: Promise<void>;
}

/**
 * Saves a microVM's state as a new image version (SNAPSHOTTING at once, READY once its snapshot
 * is committed). `name` defaults to the source image's name.
 */
export async function checkpointMicrovm(engine: LifecycleEngine, db: Db, region: string, source: Microvm, name?: string): Promise<CheckpointResult> {
  const dataDir = engine.dataDir;
  const parent = source.imageId === null ? undefined : await getImage(db, source.imageId);
  if (!parent) throw new CocoonError('image_not_found', `the image of microVM ${source.id} was deleted; it cannot be checkpointed`, { status: 409 });
  if (!['RUNNING', 'SUSPENDED', 'PENDING', 'RESUMING', 'SUSPENDING'].includes(source.state)) {
    throw new CocoonError('microvm_not_forkable', `microVM ${source.id} is ${source.state}: only a RUNNING or SUSPENDED microVM can be checkpointed`, { status: 409 });
  }
  const image = await db.transaction(async (tx) => {
    const created = await createImage(tx, {
      tenantId: source.tenantId,
      region,
      name: name ?? parent.name,
      bundleUri: parent.bundleUri,
      bundleSha256: parent.bundleSha256,
      vcpus: parent.vcpus,
      memoryMiB: parent.memoryMiB,
      diskMiB: parent.diskMiB,
      port: parent.port,
      readiness: parent.readiness,
      networkEgress: source.networkEgress,
      hooks: parent.hooks,
    });
    await setImageBuildLogPath(tx, created.id, imageBuildLogPath(dataDir, created.id));
    // Never PENDING: a restart would take a PENDING image for a build to run.
    await transitionImage(tx, created.id, 'PENDING', 'SNAPSHOTTING', { artifacts: { checkpointOf: source.id, parentImage: parent.id } });
    return (await getImage(tx, created.id)) as Image;
  });
  const say = (line: string) =>
    fs.promises.appendFile(imageBuildLogPath(dataDir, image.id), `[cocoon ${new Date().toISOString()}] ${line}\n`, { mode: 0o600 }).catch(() => undefined);
  await fs.promises.mkdir(imageDir(dataDir, image.id), { recursive: true, mode: 0o700 });
  await say(`image ${image.arn} (${image.id}): checkpoint of microVM ${source.id} (image ${parent.arn})`);
  const done = (async () => {
    const snapshot = imageSnapshotDir(dataDir, image.id);
    const base = imageBaseDisk(dataDir, image.id);
    const started = performance.now();
    try {
      const pausedMs = await engine.exclusive(source.id, 'checkpoint', async (current) => {
        // The checkpoint's disk stands on its own hard link of the bottom raw disk: the parent
        // image may be deleted later. A source whose live layer lies right on a raw image disk
        // needs only its header changed; anything in between is folded into the layer.
        const parentDisk = await imageDisk(dataDir, parent.id);
        await fs.promises.rm(base, { force: true });
        await fs.promises.link(await imageRawDisk(dataDir, parent.id), base);
        const sameContent = layersBelow(current) === 0 && parentDisk.format === 'raw';
        return takeSourcePoint(engine, current, snapshot, { path: base, format: 'raw', sameContent }, 'checkpoint:paused', engine.durable);
      });
      if (!(await transitionImage(db, image.id, 'SNAPSHOTTING', 'READY', { artifacts: { snapshot } }))) {
        throw new CocoonError('image_deleted', 'the image was deleted during the checkpoint', { status: 409 });
      }
      await say(`READY: snapshot committed in ${(performance.now() - started).toFixed(0)} ms (the microVM was paused ${pausedMs.toFixed(1)} ms)`);
      await appendLog(dataDir, source.id, `checkpoint ${image.arn} taken; paused ${pausedMs.toFixed(1)} ms`);
    } catch (error) {
      await fs.promises.rm(snapshot, { recursive: true, force: true }).catch(() => undefined);
      await fs.promises.rm(base, { force: true }).catch(() => undefined);
      const message = `checkpoint_failed: ${errorMessage(error)}`;
      await say(`FAILED: ${message}`);
      await transitionImage(db, image.id, 'SNAPSHOTTING', 'FAILED', { error: message }).catch(() => undefined);
      log.warn({ microvm: source.id, image: image.id, err: errorMessage(error) }, 'checkpoint failed');
    }
  })();
  return { image, done };
}

/**
 * At start: checkpoint images a previous process left SNAPSHOTTING. A committed snapshot makes
 * the image READY; anything else is removed and the image FAILED (create the checkpoint again).
 */
export async function recoverCheckpoints(db: Db, dataDir: string, logger: Logger): Promise<{ checkpointsCompleted: string[]; checkpointsFailed: string[] }> {
  const checkpointsCompleted: string[] = [];
  const checkpointsFailed: string[] = [];
  for (const image of await listImagesInStates(db, ['SNAPSHOTTING'])) {
    if (!isCheckpoint(image)) continue;
    const snapshot = imageSnapshotDir(dataDir, image.id);
    const say = (line: string) => fs.promises.appendFile(imageBuildLogPath(dataDir, image.id), `[cocoon ${new Date().toISOString()}] ${line}\n`).catch(() => undefined);
    if (fs.existsSync(path.join(snapshot, 'manifest.json'))) {
      if (await transitionImage(db, image.id, 'SNAPSHOTTING', 'READY', { artifacts: { snapshot } })) checkpointsCompleted.push(image.id);
      await say('the server restarted after the checkpoint was committed: READY');
      continue;
    }
    await fs.promises.rm(`${snapshot}.partial`, { recursive: true, force: true });
    await fs.promises.rm(snapshot, { recursive: true, force: true });
    await fs.promises.rm(imageBaseDisk(dataDir, image.id), { force: true });
    const message = 'server_restarted: the server restarted during the checkpoint; nothing of it was kept. Create the checkpoint again.';
    if (await transitionImage(db, image.id, 'SNAPSHOTTING', 'FAILED', { error: message })) checkpointsFailed.push(image.id);
    await say(`FAILED: ${message}`);
  }
  if (checkpointsCompleted.length + checkpointsFailed.length > 0) logger.warn({ checkpointsCompleted, checkpointsFailed }, 'recovered checkpoints');
  return { checkpointsCompleted, checkpointsFailed };
}

/** Whether an image is a checkpoint of a microVM (its artifacts say so). */
export function isCheckpoint(image: Pick<Image, 'artifacts'>): boolean {
  return typeof image.artifacts.checkpointOf === 'string';
}
