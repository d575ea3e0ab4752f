/**
 * The image service: accepts image requests (persisted PENDING at once), runs builds from a
 * bounded in-process queue (one at a time by default), streams build logs, deletes images with
 * their files, and at start finishes or fails what a previous process left in flight.
 */
import fs from 'node:fs';
import { CocoonError, errorMessage } from '../common/errors.ts';
import { log } from '../common/log.ts';
import type { CocoonConfig } from '../config/config.ts';
import { loadGuestArtifacts, type GuestArtifacts } from '../guest/artifacts.ts';
import { parseBundleRef } from '../objectstore/bundle-ref.ts';
import type { ObjectStore } from '../objectstore/object-store.ts';
import { imageSnapshotPrefix, type SnapshotStore } from '../snapshots/snapshot-store.ts';
import { findBundle } from '../store/bundles.ts';
import {
  createImage, deleteImage, getImage, listImagesInStates, setImageBuildLogPath, transitionImage,
  type DeleteImageResult, type Image, type ImageState,
  type HookName, type HttpHookName, type HttpHooks, HOOK_NAMES, HTTP_BUILD_HOOK_NAMES,
} from '../store/images.ts';
import type { Db } from '../store/sql.ts';
import { defaultVmDriver } from '../vmm/drivers.ts';
import type { Accelerator } from '../vmm/types.ts';
import type { BundleLimits } from '../builder/bundle.ts';
import { BuildLog, BuildLogEvents, readFrom } from './build-log.ts';
import { uploadsDir } from './bundle-upload.ts';
import { cleanupAbandonedBuild } from './cleanup.ts';
import { imageBaseDisk, imageBuildPaths, imageDir, imagesDir } from './paths.ts';
import { DEFAULT_PORT, removeTree, runImageBuild, s3NotConfigured, s3StoreFor, type PipelineContext } from './pipeline.ts';
import { updateImageBuildInfo } from './records.ts';
import { setting, type Env } from '../common/settings.ts';

export const IN_FLIGHT_STATES: readonly ImageState[] = ['PENDING', 'BUILDING', 'BOOTING', 'SNAPSHOTTING'];
export const DEFAULT_DISK_MIB = 1024;
export const DEFAULT_VCPUS = 1;
export const DEFAULT_MEMORY_MIB = 256;
export const DEFAULT_READINESS_TIMEOUT_SECONDS = 300;
/** The builder's smallest disk (an ext4 filesystem with a journal needs some room). */
export const MIN_DISK_MIB = 16;

export interface ImageServiceOptions {
  /** Builds at a time (`COCOON_IMAGE_BUILDS`, default 1). */
  concurrency: number;
  /** Images waiting for a builder at most (`COCOON_IMAGE_QUEUE_MAX`, default 100); beyond, 429. */
  maxQueued: number;
  /** Bounds on bundles (`COCOON_BUNDLE_MAX_BYTES` sets the archive size bound). */
  bundleLimits: Partial<BundleLimits>;
  /** Wait for cocoon-init's hello when booting a build VM. */
  bootTimeoutMs: number;
}

export function imageServiceOptionsFromEnv(env: Env = process.env): ImageServiceOptions {
  const maxBytes = setting('COCOON_BUNDLE_MAX_BYTES', env);
  return {
    concurrency: setting('COCOON_IMAGE_BUILDS', env),
    maxQueued: setting('COCOON_IMAGE_QUEUE_MAX', env),
    bundleLimits: maxBytes !== undefined ? { maxCompressedBytes: maxBytes } : {},
    bootTimeoutMs: 120_000,
  };
}

export interface CreateImageInput {
  name: string;
  bundle: string;
  /** null: no app port (ready once the workload started; exec-only sandboxes). */
  port?: number | null | undefined;
  vcpus?: number | undefined;
  memoryMiB?: number | undefined;
  diskMiB?: number | undefined;
  readiness?: { httpPath?: string | undefined; timeoutSeconds?: number | undefined } | undefined;
  networkEgress?: boolean | undefined;
  hooks?: Partial<Record<HookName, { command: string; timeoutSeconds?: number | undefined }>> | undefined;
  /** AWS-style HTTP hooks: a present key enables that hook (timeouts default as below). */
  httpHooks?: HttpHooksInput | undefined;
}

/** HTTP hooks as a request gives them: a port and the enabled hooks, each with an optional timeout. */
export type HttpHooksInput = { port: number } & Partial<Record<HttpHookName, { timeoutSeconds?: number | undefined }>>;

/** An HTTP build hook's (ready, validate) timeout when the request names none. */
export const DEFAULT_HTTP_BUILD_HOOK_TIMEOUT_SECONDS = 300;

/** The stored form: every enabled hook with its timeout. */
export function normalizeHttpHooks(input: HttpHooksInput | undefined): HttpHooks | null {
  if (input === undefined) return null;
  const out: HttpHooks = { port: input.port };
  for (const name of [...HTTP_BUILD_HOOK_NAMES, ...HOOK_NAMES]) {
    const hook = input[name];
    if (hook === undefined) continue;
    const fallback = (HTTP_BUILD_HOOK_NAMES as readonly string[]).includes(name) ? DEFAULT_HTTP_BUILD_HOOK_TIMEOUT_SECONDS : DEFAULT_HOOK_TIMEOUT_SECONDS;
    out[name] = { timeoutSeconds: hook?.timeoutSeconds ?? fallback };
  }
  return out;
}

/** A hook's timeout when the request names none. */
const DEFAULT_HOOK_TIMEOUT_SECONDS = 10;

interface RunningBuild {
  controller: AbortController;
  done: Promise<void>;
}

/**
 * What the API routes ask of the images role: they depend on this interface, not on the
 * service's class (its queue, builds and start/stop stay behind it).
 */
export interface ImageOperations {
  /** Validates and records a new image version (PENDING) and queues its build. */
  create(tenantId: string, input: CreateImageInput): Promise<Image>;
  delete(tenantId: string, imageId: string): Promise<DeleteImageResult>;
  /** The build log from its start; with `follow`, also what is appended until the build ends or `signal` aborts. */
  logChunks(imageId: string, follow: boolean, signal: AbortSignal): AsyncIterable<Buffer>;
}

export class ImageService implements ImageOperations {
  readonly options: ImageServiceOptions;
  readonly events = new BuildLogEvents();
  private readonly config: CocoonConfig;
  private readonly db: Db;
  private readonly objects: ObjectStore;
  /** Where READY images' snapshots are published in a cluster (undefined: one host). */
  private readonly snapshots: SnapshotStore | undefined;
  private readonly queue: string[] = [];
  private readonly running = new Map<string, RunningBuild>();
  private vmm: Promise<{ guest: GuestArtifacts; accel: Accelerator }> | undefined;
  private accepting = false;

  constructor(deps: { config: CocoonConfig; db: Db; objects: ObjectStore; snapshots?: SnapshotStore | undefined }, options: Partial<ImageServiceOptions> = {}) {
    this.config = deps.config;
    this.db = deps.db;
    this.objects = deps.objects;
    this.snapshots = deps.snapshots;
    this.options = { ...imageServiceOptionsFromEnv(), ...options };
  }

  get dataDir(): string {
    return this.config.dataDir;
  }

  /** Recovers what a previous process left in flight, then starts building. */
  async start(): Promise<void> {
    await fs.promises.mkdir(imagesDir(this.dataDir), { recursive: true, mode: 0o700 });
    // Uploads that a previous process was receiving when it stopped (none is in flight yet).
    await fs.promises.rm(uploadsDir(this.dataDir), { recursive: true, force: true });
    await this.recover();
    // Find the kernel and choose the accelerator now (the KVM probe takes seconds), not in the
    // first build; a failure here is reported by the build that needs them.
    this.resolveVmm().catch(() => undefined);
    this.accepting = true;
    this.pump();
  }

  /**
   * Stops building: queued images stay PENDING (the next start builds them), builds in flight
   * are cancelled and end FAILED ("the server stopped during the build"), with nothing left.
   */
  async stop(): Promise<void> {
    this.accepting = false;
    this.queue.length = 0;
    const running = [...this.running.values()];
    for (const build of running) {
      build.controller.abort(new CocoonError('server_stopped', 'the server stopped during the build; create the image again', { status: 503 }));
    }
    await Promise.all(running.map((b) => b.done));
  }

  /** Validates a request and persists a PENDING image; its build is queued. */
  async create(tenantId: string, input: CreateImageInput): Promise<Image> {
    const ref = parseBundleRef(input.bundle);
    if (ref.scheme === 'cocoon') {
      if (!(await findBundle(this.db, tenantId, ref.sha256))) {
        throw new CocoonError('bundle_not_found', `no bundle ${ref.uri} was uploaded by this tenant; upload it with POST /bundles`, { status: 404 });
      }
    } else if (!s3StoreFor(this.objects, ref.bucket)) {
      throw s3NotConfigured(ref.uri);
    }
    const diskMiB = input.diskMiB ?? DEFAULT_DISK_MIB;
    if (diskMiB < MIN_DISK_MIB) {
      throw new CocoonError('invalid_request', `diskMiB must be at least ${MIN_DISK_MIB}`, { status: 400 });
    }
    if (!this.accepting) throw new CocoonError('unavailable', 'the image service is not running', { status: 503 });
    if (this.queue.length >= this.options.maxQueued && this.running.size >= this.options.concurrency) {
      throw new CocoonError(
        'build_queue_full',
        `${this.queue.length} images are already waiting for a builder; try again once some are built`,
        { status: 429 },
      );
    }
    const image = await this.db.transaction(async (tx) => {
      const created = await createImage(tx, {
        tenantId,
        region: this.config.region,
        name: input.name,
        bundleUri: ref.uri,
        bundleSha256: ref.scheme === 'cocoon' ? ref.sha256 : null,
        vcpus: input.vcpus ?? DEFAULT_VCPUS,
        memoryMiB: input.memoryMiB ?? DEFAULT_MEMORY_MIB,
        diskMiB,
        port: input.port ?? DEFAULT_PORT,
        hasAppPort: input.port !== null,
        readiness: {
          httpPath: input.readiness?.httpPath ?? null,
          timeoutSeconds: input.readiness?.timeoutSeconds ?? DEFAULT_READINESS_TIMEOUT_SECONDS,
        },
        networkEgress: input.networkEgress ?? false,
        hooks: Object.fromEntries(
          Object.entries(input.hooks ?? {}).map(([name, hook]) => [
            name,
            { command: hook.command, timeoutSeconds: hook.timeoutSeconds ?? DEFAULT_HOOK_TIMEOUT_SECONDS },
          ]),
        ),
        httpHooks: normalizeHttpHooks(input.httpHooks),
      });
      const logPath = imageBuildPaths(this.dataDir, created.id).log;
      await setImageBuildLogPath(tx, created.id, logPath);
      await updateImageBuildInfo(tx, created.id, { artifacts: { portSource: input.port !== undefined && input.port !== null ? 'request' : 'default' } });
      return (await getImage(tx, created.id)) as Image;
    });
    const buildLog = this.openLog(image.id);
    buildLog.say(`image ${image.arn} (${image.id}) created from ${image.bundleUri}; waiting for a builder` +
      (this.queue.length + this.running.size > 0 ? ` (${this.queue.length + this.running.size} ahead)` : ''));
    buildLog.close();
    this.enqueue(image.id);
    return image;
  }

  /** Deletes an image unless microVMs use it; cancels its build; removes its files. */
  async delete(tenantId: string, imageId: string): Promise<DeleteImageResult> {
    const result = await deleteImage(this.db, tenantId, imageId);
    if (result !== 'deleted') return result;
    const index = this.queue.indexOf(imageId);
    if (index >= 0) this.queue.splice(index, 1);
    const running = this.running.get(imageId);
    if (running) {
      running.controller.abort(new CocoonError('image_deleted', 'the image was deleted during its build', { status: 409 }));
      await running.done;
    }
    await removeTree(imageDir(this.dataDir, imageId));
    // Best effort: an orphaned stored snapshot is never read (no image row names it).
    await this.snapshots?.remove(imageSnapshotPrefix(imageId)).catch((error: unknown) =>
      log.warn({ image: imageId, err: errorMessage(error) }, 'could not remove the image snapshot from the object store'));
    this.events.emit('changed', imageId);
    return 'deleted';
  }

  /**
   * The build log as chunks: what is there, or with `follow` everything until the build ended
   * (READY, FAILED, or the image deleted) or `signal` fired.
   */
  async *logChunks(imageId: string, follow: boolean, signal: AbortSignal): AsyncGenerator<Buffer> {
    const file = imageBuildPaths(this.dataDir, imageId).log;
    let offset = 0;
    for (;;) {
      // The state first, then the file: lines are written before the state changes, so when
      // the build is seen ended, reading to the end gets all of them.
      const image = follow ? await getImage(this.db, imageId) : undefined;
      const ended = !follow || !image || !IN_FLIGHT_STATES.includes(image.state);
      for (;;) {
        const chunk = await readFrom(file, offset);
        if (chunk.length === 0) break;
        offset += chunk.length;
        yield chunk;
      }
      if (ended || signal.aborted) return;
      await this.events.waitForChange(imageId, 1000, signal);
    }
  }

  /** Images waiting or building in this process. */
  get busy(): { queued: number; running: number } {
    return { queued: this.queue.length, running: this.running.size };
  }

  /** Resolves once no build is queued or running (tests, benchmarks). */
  async idle(): Promise<void> {
    while (this.queue.length || this.running.size) await Promise.all([...this.running.values()].map((b) => b.done));
  }

  private openLog(imageId: string): BuildLog {
    return new BuildLog(imageBuildPaths(this.dataDir, imageId).log, imageId, { events: this.events });
  }

  private enqueue(imageId: string): void {
    if (!this.queue.includes(imageId) && !this.running.has(imageId)) this.queue.push(imageId);
    this.pump();
  }

  private pump(): void {
    while (this.accepting && this.running.size < this.options.concurrency && this.queue.length) {
      const imageId = this.queue.shift() as string;
      const controller = new AbortController();
      const done = this.build(imageId, controller.signal).finally(() => {
        this.running.delete(imageId);
        this.pump();
      });
      this.running.set(imageId, { controller, done });
    }
  }

  private async build(imageId: string, signal: AbortSignal): Promise<void> {
    let buildLog: BuildLog | undefined;
    try {
      buildLog = this.openLog(imageId);
      const context: PipelineContext = {
        config: this.config,
        db: this.db,
        objects: this.objects,
        snapshots: this.snapshots,
        vmm: () => this.resolveVmm(),
        bundleLimits: this.options.bundleLimits,
        bootTimeoutMs: this.options.bootTimeoutMs,
      };
      const state = await runImageBuild(context, imageId, buildLog, signal);
      log.info({ image: imageId, state }, 'image build ended');
    } catch (error) {
      log.error({ image: imageId, err: errorMessage(error) }, 'image build crashed');
      buildLog?.close();
      await transitionImage(this.db, imageId, IN_FLIGHT_STATES, 'FAILED', {
        error: `internal: the build crashed (${errorMessage(error)}); see the server log`,
      }).catch(() => undefined);
    } finally {
      this.events.emit('changed', imageId);
    }
  }

  private resolveVmm(): Promise<{ guest: GuestArtifacts; accel: Accelerator }> {
    this.vmm ??= (async () => {
      const guest = loadGuestArtifacts();
      const accel = await defaultVmDriver().chooseAccelerator(this.config.accel, guest);
      return { guest, accel };
    })();
    // A failure (kernel not built yet) is not cached: the next build tries again.
    this.vmm.catch(() => {
      this.vmm = undefined;
    });
    return this.vmm;
  }

  /**
   * At start: images a previous process left BUILDING, BOOTING or SNAPSHOTTING had their
   * builder die under them. Their processes, containers and scratch files are removed; a
   * snapshot that was complete makes the image READY, else it is FAILED with the reason.
   * PENDING images are queued again.
   */
  private async recover(): Promise<void> {
    // Checkpoints of microVMs are the lifecycle's to recover (lifecycle/fork.ts), not builds.
    const stale = (await listImagesInStates(this.db, IN_FLIGHT_STATES)).filter((image) => typeof image.artifacts.checkpointOf !== 'string');
    for (const image of stale) {
      const paths = imageBuildPaths(this.dataDir, image.id);
      const buildLog = this.openLog(image.id);
      try {
        const left = await cleanupAbandonedBuild(this.dataDir, image.id);
        const removed = [
          ...left.killed.map((p) => `process ${p.pid} (${p.command.split(' ')[0]})`),
          ...left.runcContainers.map((c) => `runc container ${c}`),
          ...(left.removedContainer ? ['the export container'] : []),
          ...(left.removedImage ? ['the built image'] : []),
        ];
        if (image.state === 'PENDING') {
          buildLog.say('the server restarted before this build began: queued again');
          this.queue.push(image.id);
          continue;
        }
        buildLog.say(`the server restarted while this build was ${image.state}` +
          (removed.length ? `; removed what it left: ${removed.join(', ')}` : ''));
        if (image.state === 'SNAPSHOTTING' && fs.existsSync(`${paths.snapshot}/manifest.json`)) {
          buildLog.say('the snapshot was complete: the image is READY');
          await transitionImage(this.db, image.id, 'SNAPSHOTTING', 'READY', { artifacts: { snapshot: paths.snapshot } });
          continue;
        }
        await removeTree(paths.snapshot);
        await fs.promises.rm(imageBaseDisk(this.dataDir, image.id), { force: true }); // a checkpoint's
        const message = `server_restarted: the server restarted during the build (the image was ${image.state}); ` +
          'nothing of the build was kept. Create the image again.';
        buildLog.say(`FAILED: ${message}`);
        await transitionImage(this.db, image.id, image.state, 'FAILED', { error: message });
      } catch (error) {
        log.error({ image: image.id, err: errorMessage(error) }, 'could not recover an image build');
        await transitionImage(this.db, image.id, IN_FLIGHT_STATES, 'FAILED', {
          error: `server_restarted: the server restarted during the build and its leftovers could not all be removed (${errorMessage(error)})`,
        }).catch(() => undefined);
      } finally {
        buildLog.close();
      }
    }
    if (stale.length) log.warn({ images: stale.map((i) => `${i.id}:${i.state}`) }, 'recovered image builds left by a previous process');
  }
}
