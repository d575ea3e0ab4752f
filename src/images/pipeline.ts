/**
 * One image build, from bundle to READY:
 *
 *   BUILDING      fetch the bundle (platform store or s3://) → validate and unpack it
 *                 → buildah build → root disk (sparse ext4 with the workload file)
 *   BOOTING       boot the disk with the image's vCPUs and memory → wait for readiness: the app
 *                 port accepts connections inside the guest, or readiness.httpPath answers 2xx
 *   SNAPSHOTTING  snapshot the ready VM (compacted RAM file) into images/<id>/snapshot
 *   READY
 *
 * Each state is persisted (compare-and-set) before its step runs; a lost compare-and-set means
 * the image was deleted or changed meanwhile, and the build stops. Whatever happens, the build's
 * scratch directory, VM and buildah containers are gone when `runImageBuild` returns; a failed
 * build leaves an image FAILED with an error that says why (buildah's last lines for a failing
 * RUN, the console's last lines for an app that never became ready).
 */
import fs from 'node:fs';
import type { Readable } from 'node:stream';
import { unpackBundle, type BundleLimits } from '../builder/bundle.ts';
import { buildRootDisk } from '../builder/root-disk.ts';
import type { CocoonConfig } from '../config/config.ts';
import { CocoonError, errorMessage, isCocoonError } from '../common/errors.ts';
import { log } from '../common/log.ts';
import type { GuestArtifacts } from '../guest/artifacts.ts';
import { parseBundleRef, type BundleRef } from '../objectstore/bundle-ref.ts';
import type { ObjectStore } from '../objectstore/object-store.ts';
import { imageSnapshotPrefix, type SnapshotStore } from '../snapshots/snapshot-store.ts';
import { S3ObjectStore } from '../objectstore/s3.ts';
import { getImage, transitionImage, type Image, type ImageState } from '../store/images.ts';
import type { Db } from '../store/sql.ts';
import { callHttpHook, describeHttpHookOutcome, httpHookPath } from '../guest/http-hooks.ts';
import type { Vm } from '../vmm/driver.ts';
import { defaultVmDriver } from '../vmm/drivers.ts';
import type { Accelerator } from '../vmm/types.ts';
import { BuildLog, FileFollower } from './build-log.ts';
import { cleanupAbandonedBuild } from './cleanup.ts';
import { buildTag, exportContainerName, imageBuildPaths } from './paths.ts';
import { imageTimings, portSource, updateImageBuildInfo, type ImageTimings } from './records.ts';

export const DEFAULT_PORT = 8080;
const IN_FLIGHT: readonly ImageState[] = ['PENDING', 'BUILDING', 'BOOTING', 'SNAPSHOTTING'];

export interface PipelineContext {
  config: CocoonConfig;
  db: Db;
  objects: ObjectStore;
  /** In a cluster: the image's snapshot is published there before the image is READY. */
  snapshots?: SnapshotStore | undefined;
  /** Kernel and initramfs, and the accelerator, resolved once by the service. */
  vmm: () => Promise<{ guest: GuestArtifacts; accel: Accelerator }>;
  bundleLimits: Partial<BundleLimits>;
  /** QEMU's wait for cocoon-init's hello (default 120 s). */
  bootTimeoutMs?: number;
}

/** Resolves an `s3://` bundle's bucket through the platform's S3 client, if there is one. */
export function s3StoreFor(objects: ObjectStore, bucket: string): ObjectStore | undefined {
  return objects instanceof S3ObjectStore ? objects.forBucket(bucket) : undefined;
}

export function s3NotConfigured(uri: string): CocoonError {
  return new CocoonError(
    's3_not_configured',
    `this server has no S3 configured (COCOON_S3_BUCKET…), so it cannot fetch ${uri}; upload the bundle with POST /bundles instead`,
    { status: 400 },
  );
}

async function openBundle(objects: ObjectStore, ref: BundleRef): Promise<Readable> {
  try {
    if (ref.scheme === 'cocoon') return await objects.get(ref.key);
    const store = s3StoreFor(objects, ref.bucket);
    if (!store) throw s3NotConfigured(ref.uri);
    return await store.get(ref.key);
  } catch (error) {
    if (isCocoonError(error, 'object_not_found')) {
      throw new CocoonError('bundle_not_found', `the bundle ${ref.uri} does not exist (or is not readable)`, { status: 404, cause: error });
    }
    throw error;
  }
}

function ms(since: number): number {
  return Math.round(performance.now() - since);
}

function mib(bytes: number): string {
  return `${(bytes / 1048576).toFixed(1)} MiB`;
}

/** Thrown when the image was deleted or moved on under the build: stop quietly. */
class ImageGone extends Error {}

/**
 * Builds one PENDING image to READY or FAILED. Resolves in both cases (rejects only on a bug);
 * `signal` cancels (server stopping, image deleted): the image then ends FAILED with the
 * signal's reason if it still exists.
 */
export async function runImageBuild(ctx: PipelineContext, imageId: string, buildLog: BuildLog, signal: AbortSignal): Promise<ImageState | 'gone'> {
  const { db, config } = ctx;
  const paths = imageBuildPaths(config.dataDir, imageId);
  const started = performance.now();
  let image = await getImage(db, imageId);
  if (!image || image.state !== 'PENDING') return image ? image.state : 'gone';
  const timings: ImageTimings = {
    queuedMs: Math.max(0, Date.now() - Date.parse(image.createdAt)),
  };
  const record = async (patch: { port?: number; bundleSha256?: string; artifacts?: Record<string, string> } = {}): Promise<void> => {
    if (!(await updateImageBuildInfo(db, imageId, { ...patch, artifacts: { ...patch.artifacts, timings: JSON.stringify(timings) } }))) {
      throw new ImageGone();
    }
  };
  const move = async (from: ImageState, to: ImageState, extra: Record<string, string> = {}): Promise<void> => {
    buildLog.say(`state ${from} → ${to}`);
    if (!(await transitionImage(db, imageId, from, to, { artifacts: { ...extra, timings: JSON.stringify(timings) } }))) {
      throw new ImageGone();
    }
  };
  const checkCancel = (): void => {
    if (signal.aborted) throw signal.reason;
  };

  let vm: Vm | undefined;
  let consoleFollower: FileFollower | undefined;
  // Whatever happened: no process, container, mount or scratch file of this build remains, and
  // that is so before the image is seen READY or FAILED.
  let cleaned = false;
  const cleanup = async (): Promise<void> => {
    cleaned = true;
    const left = await cleanupAbandonedBuild(config.dataDir, imageId).catch((e: unknown) => {
      log.warn({ image: imageId, err: errorMessage(e) }, 'could not clean up after a build');
      return undefined;
    });
    if (left && (left.killed.length || left.removedContainer || left.removedImage || left.runcContainers.length)) {
      log.warn({ image: imageId, left }, 'removed leftovers of a build');
    }
  };
  try {
    await fs.promises.rm(paths.build, { recursive: true, force: true });
    await fs.promises.rm(paths.snapshotPartial, { recursive: true, force: true });
    await fs.promises.mkdir(paths.build, { recursive: true, mode: 0o700 });
    await move('PENDING', 'BUILDING');

    // 1. Fetch, validate, unpack.
    let t = performance.now();
    const ref = parseBundleRef(image.bundleUri);
    buildLog.say(`fetching the bundle ${ref.uri}`);
    const source = await openBundle(ctx.objects, ref);
    const onAbort = (): void => {
      source.destroy(signal.reason instanceof Error ? signal.reason : new Error('cancelled'));
    };
    signal.addEventListener('abort', onAbort, { once: true });
    let unpacked;
    try {
      unpacked = await unpackBundle(source, paths.context, {
        limits: ctx.bundleLimits,
        ...(ref.scheme === 'cocoon' ? { expectedSha256: ref.sha256 } : {}),
      });
    } finally {
      signal.removeEventListener('abort', onAbort);
    }
    checkCancel();
    timings.fetchMs = ms(t);
    buildLog.say(
      `bundle ok: ${unpacked.format}, ${mib(unpacked.compressedBytes)}, ${unpacked.fileCount} files (${mib(unpacked.uncompressedBytes)}), ` +
        `sha256 ${unpacked.sha256} (${timings.fetchMs} ms)`,
    );
    await record({ bundleSha256: unpacked.sha256 });

    // 2. Build and root disk.
    const requestedPort = portSource(image) === 'request' ? image.port : undefined;
    const built = await buildRootDisk({
      contextDir: paths.context,
      workDir: paths.disk,
      diskMiB: image.diskMiB,
      ...(requestedPort !== undefined ? { port: requestedPort } : {}),
      // cocoon-init finds the hooks in the workload file; the lifecycle runs them with their timeouts.
      hooks: Object.fromEntries(Object.entries(image.hooks).map(([name, hook]) => [name, hook.command])),
      onLog: (line) => buildLog.line(line),
      signal,
      tag: buildTag(imageId),
      tmpParent: paths.tmp,
      exportContainer: exportContainerName(imageId),
    });
    timings.buildMs = built.timingsMs.seed + built.timingsMs.build;
    timings.diskMs = built.timingsMs.export + built.timingsMs.disk;
    // The unpacked context is not needed any more: free the space before booting.
    await fs.promises.rm(paths.context, { recursive: true, force: true });
    const port = built.port ?? DEFAULT_PORT;
    const source_ = requestedPort !== undefined ? 'request' : built.port !== undefined ? 'expose' : 'default';
    buildLog.say(
      `built in ${timings.buildMs} ms, root disk in ${timings.diskMs} ms; app: ${JSON.stringify(built.config.argv)}` +
        ` as uid ${built.config.uid}, port ${port} (${source_ === 'expose' ? 'from EXPOSE' : source_ === 'request' ? 'from the request' : 'default'})`,
    );
    await record({ port, artifacts: { portSource: source_ } });
    checkCancel();

    // 3. Boot.
    await move('BUILDING', 'BOOTING');
    const { guest, accel } = await ctx.vmm();
    image = (await getImage(db, imageId)) ?? image;
    t = performance.now();
    buildLog.say(`booting: ${image.vcpus} vCPU, ${image.memoryMiB} MiB, ${accel}, app port ${port}`);
    // The console goes to the build log as it comes (kernel, cocoon-init, the app's output).
    const serialPath = `${paths.vm}/serial.log`;
    await fs.promises.mkdir(paths.vm, { recursive: true, mode: 0o700 });
    consoleFollower = new FileFollower(serialPath, (line) => buildLog.line(line, '[console] '));
    vm = await defaultVmDriver().boot({
      id: imageId,
      runDir: paths.vm,
      vcpus: image.vcpus,
      memoryMiB: image.memoryMiB,
      accel,
      guest,
      disk: { path: built.diskPath, format: 'raw' },
      network: { egress: image.networkEgress, forwards: buildForwards(image, port) },
      signal,
      bootTimeoutMs: ctx.bootTimeoutMs ?? 120_000,
    });
    timings.bootMs = ms(t);
    buildLog.say(`guest up in ${timings.bootMs} ms; waiting for the app (${image.hasAppPort ? describeReadiness(image, port) : 'no app port: its workload started'}, up to ${image.readiness.timeoutSeconds} s)`);
    await record();

    // 4. Readiness.
    t = performance.now();
    await waitUntilReady(vm, image, port, signal);
    timings.readyMs = ms(t);
    buildLog.say(`the app is ready (${timings.readyMs} ms)`);

    // 4b. AWS-style HTTP hooks of the build: ready, then validate (each until it answers 200).
    await runBuildHttpHooks(vm, image, buildLog, signal);

    // 5. Snapshot.
    await move('BOOTING', 'SNAPSHOTTING');
    t = performance.now();
    await consoleFollower.stop();
    consoleFollower = undefined;
    const manifest = await vm.snapshot(paths.snapshot, { compact: true });
    await vm.destroy();
    vm = undefined;
    timings.snapshotMs = ms(t);
    await makeReadOnly(paths.snapshot);
    const memBytes = fs.statSync(`${paths.snapshot}/${manifest.files.mem.name}`).blocks * 512;
    await cleanup();
    if (ctx.snapshots) {
      // A cluster: every host may start microVMs of this image, so it is READY only once its
      // snapshot is in the object store (a failed upload fails the build: build it again).
      t = performance.now();
      const index = await ctx.snapshots.publish(imageSnapshotPrefix(imageId), paths.snapshot);
      timings.publishMs = ms(t);
      const stored = index.files.reduce((sum, file) => sum + file.objectBytes, 0);
      buildLog.say(`snapshot stored in the object store (${mib(stored)}) in ${timings.publishMs} ms`);
    }
    timings.totalMs = ms(started);
    buildLog.say(`snapshot taken in ${timings.snapshotMs} ms (memory ${mib(memBytes)} allocated, disk ${mib(manifest.files.disk.sizeBytes)} sparse)`);
    buildLog.say(
      `READY in ${timings.totalMs} ms: fetch ${timings.fetchMs} ms, build ${timings.buildMs} ms, disk ${timings.diskMs} ms, ` +
        `boot ${timings.bootMs} ms, ready ${timings.readyMs} ms, snapshot ${timings.snapshotMs} ms`,
    );
    await move('SNAPSHOTTING', 'READY', { snapshot: paths.snapshot });
    return 'READY';
  } catch (error) {
    if (consoleFollower) await consoleFollower.stop().catch(() => undefined);
    consoleFollower = undefined;
    if (vm) await vm.destroy().catch(() => undefined);
    vm = undefined;
    const current = await getImage(db, imageId).catch(() => undefined);
    if (error instanceof ImageGone || !current || !IN_FLIGHT.includes(current.state)) {
      buildLog.say('the build stopped: the image was deleted or changed meanwhile');
      if (!current) await removeTree(paths.snapshot).catch(() => undefined);
      return current ? current.state : 'gone';
    }
    const reason = signal.aborted ? signal.reason : error;
    const message = failureMessage(reason);
    if (!signal.aborted || !isCocoonError(reason)) log.info({ image: imageId, err: errorMessage(reason) }, 'image build failed');
    buildLog.say(`FAILED: ${message}`);
    await removeTree(paths.snapshot).catch(() => undefined);
    await cleanup();
    timings.totalMs = ms(started);
    await transitionImage(db, imageId, IN_FLIGHT, 'FAILED', { error: message, artifacts: { timings: JSON.stringify(timings) } });
    return 'FAILED';
  } finally {
    if (!cleaned) await cleanup();
    buildLog.close();
  }
}

/** The guest ports a build VM forwards: the app port and the HTTP hooks port (a snapshot keeps them). */
function buildForwards(image: Image, port: number): { guestPort: number }[] {
  const ports = new Set<number>();
  if (image.hasAppPort) ports.add(port);
  if (image.httpHooks) ports.add(image.httpHooks.port);
  return [...ports].map((guestPort) => ({ guestPort }));
}

/**
 * The image's `ready` and `validate` HTTP hooks, in that order, after the app is ready and
 * before the snapshot: each is asked until it answers 200 (a 503 or no listener yet: again,
 * until its timeout); anything else fails the build with `http_hook_failed`.
 */
async function runBuildHttpHooks(vm: Vm, image: Image, buildLog: BuildLog, signal: AbortSignal): Promise<void> {
  const hooks = image.httpHooks;
  if (!hooks) return;
  for (const name of ['ready', 'validate'] as const) {
    const hook = hooks[name];
    if (!hook) continue;
    buildLog.say(`HTTP hook ${name}: POST ${httpHookPath(name)} on port ${hooks.port} (up to ${hook.timeoutSeconds} s)`);
    const outcome = await callHttpHook({
      endpoint: vm.endpoint(hooks.port),
      name,
      timeoutMs: hook.timeoutSeconds * 1000,
      retryUnavailable: true,
      signal,
    });
    if (signal.aborted) throw signal.reason;
    buildLog.say(describeHttpHookOutcome(name, outcome, hook.timeoutSeconds));
    if (!outcome.ok) {
      const what = outcome.reason === 'timeout'
        ? `did not answer 200 within ${hook.timeoutSeconds} s (last: ${outcome.last}; 503 means "not yet", anything else fails at once)`
        : `answered ${outcome.last} (200 = done, 503 = not yet)`;
      throw new CocoonError(
        'http_hook_failed',
        `the ${name} hook (POST ${httpHookPath(name)} on port ${hooks.port} in the guest) ${what}. ` +
          `Last lines of the serial console:\n${vm.serialTail(20) || '(empty)'}`,
        { status: 422, details: { imageId: image.id, hook: name } },
      );
    }
  }
}

function describeReadiness(image: Image, port: number): string {
  return image.readiness.httpPath
    ? `GET ${image.readiness.httpPath} on port ${port} must answer 2xx`
    : `port ${port} must accept connections inside the guest`;
}

/**
 * Waits until the app is ready, the VM stops, the app exits, or readiness.timeoutSeconds pass.
 * Port readiness is checked from inside the guest (user-mode networking accepts host-side
 * connections even when nothing listens in the guest); HTTP readiness needs a complete answer.
 */
async function waitUntilReady(vm: Vm, image: Image, port: number, signal: AbortSignal): Promise<void> {
  const timeoutMs = image.readiness.timeoutSeconds * 1000;
  const deadline = Date.now() + timeoutMs;
  const local = new AbortController();
  const stop = AbortSignal.any([signal, local.signal]);
  let lastHttp = '';
  const exited = new Promise<never>((_, reject) => {
    const onExit = (code: number): void => reject(notReady(vm, image, `the app exited with status ${code} before it was ready`));
    vm.channel.once('exit', onExit);
    void vm.waitForExit().then(() => reject(notReady(vm, image, 'the VM stopped before the app was ready')));
    local.signal.addEventListener('abort', () => vm.channel.off('exit', onExit), { once: true });
  });
  exited.catch(() => undefined);
  const ready = (async (): Promise<void> => {
    if (!image.hasAppPort) {
      // No app port: ready once cocoon-init started the workload (and it has not exited).
      await vm.channel.waitForWorkloadStart(timeoutMs, stop);
      return;
    }
    const portOpen = await vm.channel.waitForPort(port, timeoutMs, stop);
    if (!portOpen) throw notReady(vm, image, `nothing accepted connections on port ${port} inside the guest within ${image.readiness.timeoutSeconds} s`);
    if (!image.readiness.httpPath) return;
    const endpoint = vm.endpoint(port);
    const url = `http://${endpoint.host}:${endpoint.port}${image.readiness.httpPath}`;
    for (;;) {
      const left = deadline - Date.now();
      if (left <= 0) {
        throw notReady(vm, image, `GET ${image.readiness.httpPath} did not answer 2xx within ${image.readiness.timeoutSeconds} s (last: ${lastHttp || 'no answer'})`);
      }
      try {
        const response = await fetch(url, { signal: AbortSignal.any([stop, AbortSignal.timeout(Math.min(5000, left))]), redirect: 'manual' });
        // The guest is not trusted: never read its body, only its status.
        await response.body?.cancel().catch(() => undefined);
        if (response.status >= 200 && response.status < 300) return;
        lastHttp = `HTTP ${response.status}`;
      } catch (error) {
        if (signal.aborted) throw signal.reason;
        lastHttp = errorMessage((error as { cause?: unknown }).cause ?? error);
      }
      await new Promise((r) => setTimeout(r, Math.min(250, Math.max(0, deadline - Date.now()))));
    }
  })();
  try {
    await Promise.race([ready, exited]);
  } finally {
    local.abort();
    ready.catch(() => undefined);
  }
}

function notReady(vm: Vm, image: Image, what: string): CocoonError {
  const tail = vm.serialTail(40);
  return new CocoonError(
    'readiness_failed',
    `the app did not become ready: ${what}. Last lines of the serial console (kernel, cocoon-init and the app's output):\n${tail || '(empty)'}`,
    { status: 422, details: { imageId: image.id } },
  );
}

/** The image's error: a CocoonError's message as is (they say what to do), else a generic line. */
export function failureMessage(error: unknown): string {
  if (error instanceof CocoonError) return `${error.code}: ${error.message}`;
  if (error instanceof Error && (error.name === 'AbortError' || error.name === 'TimeoutError')) return `build_cancelled: ${error.message}`;
  return `internal: the build failed unexpectedly (${errorMessage(error)}); see the server log`;
}

/** The snapshot of a READY image never changes: read-only files in a read-only directory. */
async function makeReadOnly(dir: string): Promise<void> {
  for (const name of await fs.promises.readdir(dir)) await fs.promises.chmod(`${dir}/${name}`, 0o444);
  await fs.promises.chmod(dir, 0o555);
}

/** Removes a directory tree, read-only snapshot directories included. */
export async function removeTree(dir: string): Promise<void> {
  const snapshot = `${dir}/snapshot`;
  for (const d of [dir, snapshot]) await fs.promises.chmod(d, 0o700).catch(() => undefined);
  await fs.promises.rm(dir, { recursive: true, force: true });
}

export { imageTimings };
