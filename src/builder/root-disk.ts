/**
 * Build context → bootable root disk: the one entry point the image pipeline calls.
 *
 *   seed base images (if missing) → buildah bud → mount the image → write /.cocoon/workload
 *   → mkfs.ext4 -d into a sparse disk → remove the working container and the image
 */
import { mkdir, readFile, rm, stat } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { CocoonError, errorMessage } from '../common/errors.ts';
import { log } from '../common/log.ts';
import { ensureBaseImages, type BaseImageName } from './base-images.ts';
import { buildImage, mountImage, removeImage, type BuildNetwork, type MountedImage } from './buildah.ts';
import { abortReason } from './exec.ts';
import { makeExt4Disk, MAX_DISK_MIB, MIN_DISK_MIB, prepareRootfs } from './rootfs.ts';

export interface BuildRootDiskOptions {
  /** Unpacked, validated build context with a Dockerfile at its root. */
  contextDir: string;
  /** Where the disk is written (`<workDir>/rootfs.ext4`); created if missing. */
  workDir: string;
  /** Size of the disk; the filesystem inside is sparse, so only the content takes space. */
  diskMiB: number;
  buildArgs?: Record<string, string>;
  /** The app port the request names; when absent, the image's first exposed TCP port. */
  port?: number;
  /** Hook commands for the workload file. */
  hooks?: Record<string, string>;
  /** Network of RUN steps (default `private`: egress, but not the host's loopback; see BuildOptions). */
  network?: BuildNetwork;
  /** Each line of the build log, as it comes (a live build log). */
  onLog?: (line: string) => void;
  /** Cancels the build; then nothing of it remains (process, container, image, disk). */
  signal?: AbortSignal;
  /** Name of the built (temporary) image; default a unique `localhost/cocoon-build/<random>:latest`. */
  tag?: string;
  /** Parent of the build's private TMPDIR (see BuildOptions.tmpParent). */
  tmpParent?: string;
  /** Name of the throwaway container the image is mounted through (default `cocoon-export-<random>`). */
  exportContainer?: string;
}

export interface RootDiskConfig {
  argv: string[];
  env: string[];
  cwd: string;
  uid: number;
  gid: number;
  groups: number[];
  /** USER as written in the image (empty: root). */
  user: string;
  /** As in the image: `8080/tcp`. */
  exposedPorts: string[];
  stopSignal: string | undefined;
}

export interface RootDiskResult {
  diskPath: string;
  diskMiB: number;
  config: RootDiskConfig;
  /** The request's port, else the lowest exposed TCP port, else undefined (caller's default). */
  port: number | undefined;
  /** What the image's files take on the disk. */
  contentBytes: number;
  /** The whole build log. */
  log: string[];
  timingsMs: { seed: number; build: number; export: number; disk: number; total: number };
}

/** Builds the Dockerfile in `contextDir` and writes the root disk of a microVM. */
export async function buildRootDisk(options: BuildRootDiskOptions): Promise<RootDiskResult> {
  const t0 = performance.now();
  const { signal } = options;
  const say = (line: string): void => {
    try {
      options.onLog?.(line);
    } catch (e) {
      log.warn({ err: errorMessage(e) }, 'build log callback threw');
    }
  };
  if (!Number.isInteger(options.diskMiB) || options.diskMiB < MIN_DISK_MIB || options.diskMiB > MAX_DISK_MIB) {
    throw new CocoonError('invalid_disk_size', `diskMiB must be a whole number from ${MIN_DISK_MIB} to ${MAX_DISK_MIB}; got ${options.diskMiB}.`, { status: 400 });
  }
  if (options.port !== undefined && (!Number.isInteger(options.port) || options.port < 1 || options.port > 65535)) {
    throw new CocoonError('invalid_port', `port must be a whole number from 1 to 65535; got ${options.port}.`, { status: 400 });
  }
  const contextDir = resolve(options.contextDir);
  const dockerfileText = await readFile(join(contextDir, 'Dockerfile'), 'utf8').catch(() => {
    throw new CocoonError('missing_dockerfile', 'The bundle has no Dockerfile at its root: add one (the bundle root is the build context).', { status: 400 });
  });
  const checkCancel = (): void => {
    if (signal?.aborted) {
      const reason = abortReason(signal);
      throw reason instanceof Error && reason.name === 'TimeoutError'
        ? new CocoonError('build_timeout', 'The image build took too long and was stopped.', { status: 408, cause: reason })
        : new CocoonError('build_cancelled', 'The image build was cancelled.', { status: 409, cause: reason });
    }
  };

  // 1. Base images, offline (quick when there; a fresh machine's first debootstrap takes ~30 s).
  const needed = baseImagesNeeded(dockerfileText);
  if (needed.length) {
    await ensureBaseImages({ only: needed, signal, onLog: (l) => say(`[cocoon] ${l}`) });
  }
  const tSeed = performance.now();
  checkCancel();

  // 2. Build.
  say('[cocoon] building the Dockerfile');
  const built = await buildImage({
    contextDir, buildArgs: options.buildArgs, network: options.network, onLog: say, signal,
    ...(options.tag ? { tag: options.tag } : {}),
    ...(options.tmpParent ? { tmpParent: options.tmpParent } : {}),
  });
  const tBuild = performance.now();

  const diskPath = join(resolve(options.workDir), 'rootfs.ext4');
  let mounted: MountedImage | undefined;
  let ok = false;
  try {
    checkCancel();
    // 3. "Export": mount the image through a throwaway container (zero copy) and ready it.
    mounted = await mountImage(built.imageId, options.exportContainer);
    const prepared = await prepareRootfs(mounted.dir, built.config, { hooks: options.hooks });
    const tExport = performance.now();
    checkCancel();

    // 4. Disk.
    say(`[cocoon] writing the root disk (${options.diskMiB} MiB ext4)`);
    await mkdir(resolve(options.workDir), { recursive: true });
    const disk = await makeExt4Disk({ sourceDir: mounted.dir, diskPath, sizeMiB: options.diskMiB, signal });
    const tDisk = performance.now();
    checkCancel();
    const allocated = (await stat(diskPath)).blocks * 512;
    say(`[cocoon] root disk ready: ${Math.ceil(disk.contentBytes / 1048576)} MiB of files, ${Math.ceil(allocated / 1048576)} MiB allocated`);
    ok = true;
    const w = prepared.workload;
    return {
      diskPath,
      diskMiB: options.diskMiB,
      config: {
        argv: w.argv, env: w.env, cwd: w.cwd, uid: w.uid, gid: w.gid, groups: w.groups,
        user: prepared.user, exposedPorts: prepared.exposedPorts, stopSignal: built.config.stopSignal,
      },
      port: options.port ?? prepared.exposedTcpPort,
      contentBytes: disk.contentBytes,
      log: built.log,
      timingsMs: {
        seed: round(tSeed - t0),
        build: round(tBuild - tSeed),
        export: round(tExport - tBuild),
        disk: round(tDisk - tExport),
        total: round(performance.now() - t0),
      },
    };
  } finally {
    if (mounted) await mounted.release().catch((e: unknown) => log.warn({ err: errorMessage(e) }, 'could not remove the export container'));
    await removeImage(built.tag).catch((e: unknown) => log.warn({ err: errorMessage(e) }, 'could not remove the built image'));
    if (!ok) await rm(diskPath, { force: true });
  }
}

function round(ms: number): number {
  return Math.round(ms);
}

/**
 * Which seeded base images a Dockerfile's FROM lines need. A FROM with a variable (`$BASE`)
 * could be anything: then all of them.
 */
export function baseImagesNeeded(dockerfile: string): BaseImageName[] {
  const text = dockerfile.replace(/\\\r?\n/g, ' ');
  const stages = new Set<string>();
  const needed = new Set<BaseImageName>();
  for (const line of text.split('\n')) {
    const m = /^\s*FROM\s+(.*)$/i.exec(line);
    if (!m) continue;
    const words = m[1]!.trim().split(/\s+/).filter((w) => !w.startsWith('--'));
    const ref = words[0];
    if (!ref) continue;
    const isStage = stages.has(ref.toLowerCase());
    if (words[1]?.toLowerCase() === 'as' && words[2]) stages.add(words[2].toLowerCase());
    if (ref.includes('$')) return ['busybox', 'debian'];
    if (isStage) continue;
    const name = ref.replace(/^(docker\.io|index\.docker\.io|registry-1\.docker\.io)\//, '').replace(/^library\//, '').split(/[:@]/)[0];
    if (name === 'busybox') needed.add('busybox');
    if (name === 'debian') needed.add('debian');
  }
  return [...needed];
}
