/**
 * Dockerfile builds with buildah (Debian's 1.28), and the few storage operations around them.
 *
 * Builds run `buildah bud` with runc and OCI isolation (crun refuses on these hosts' hybrid
 * cgroup v1), RUN steps on a private bridge network, without layer caching, tagged with a
 * unique name. The log streams line by line.
 * A cancelled build leaves no process, container, or image behind: buildah cleans up after
 * SIGTERM itself; should it have to be killed, the leftovers are swept here.
 */
import { randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, readdir, readFile, rename, rm, unlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { CocoonError, errorMessage } from '../common/errors.ts';
import { log } from '../common/log.ts';
import { iptables, splitIptablesRule } from '../net/iptables.ts';
import { abortReason, exec, tail, type ExecOptions } from './exec.ts';
import { builderCacheDir } from './paths.ts';
import { setting } from '../common/settings.ts';

const BUILDAH = setting('COCOON_BUILDAH');
const RUNC = setting('COCOON_RUNC');
/** Where buildah (as root) keeps the state of the runc containers it starts for RUN steps. */
const RUNC_ROOT = '/run/runc';

/** The parts of an image's configuration that decide how its workload starts. */
export interface ImageConfig {
  entrypoint: string[];
  cmd: string[];
  env: string[];
  workingDir: string;
  user: string;
  /** As in the image: `8080/tcp`, `53/udp`. */
  exposedPorts: string[];
  stopSignal: string | undefined;
  labels: Record<string, string>;
}

/** Runs buildah; failures become CocoonError `buildah_failed` unless another code is given. */
export function buildah(args: readonly string[], options: ExecOptions = {}) {
  return exec(BUILDAH, args, { errorCode: 'buildah_failed', ...options });
}

export async function imageExists(ref: string): Promise<boolean> {
  const r = await buildah(['inspect', '--type', 'image', '--format', '{{.FromImageID}}', ref], { allowFailure: true });
  return r.code === 0;
}

/** Reads an image's configuration (`buildah inspect`). */
export async function inspectImage(ref: string): Promise<ImageConfig> {
  const { stdout } = await buildah(['inspect', '--type', 'image', ref]);
  return parseInspect(stdout);
}

interface RawConfig {
  Entrypoint?: string[] | null;
  Cmd?: string[] | null;
  Env?: string[] | null;
  WorkingDir?: string;
  User?: string;
  ExposedPorts?: Record<string, unknown> | null;
  StopSignal?: string;
  Labels?: Record<string, string> | null;
}

/** The image configuration from `buildah inspect` output (Docker format first, then OCI). */
export function parseInspect(json: string): ImageConfig {
  const info = JSON.parse(json) as { Docker?: { config?: RawConfig }; OCIv1?: { config?: RawConfig } };
  const c: RawConfig = info.Docker?.config ?? info.OCIv1?.config ?? {};
  return {
    entrypoint: c.Entrypoint ?? [],
    cmd: c.Cmd ?? [],
    env: c.Env ?? [],
    workingDir: c.WorkingDir ?? '',
    user: c.User ?? '',
    exposedPorts: Object.keys(c.ExposedPorts ?? {}),
    stopSignal: c.StopSignal || undefined,
    labels: c.Labels ?? {},
  };
}

/** Removes an image by name or id; an image that is not there is fine. */
export async function removeImage(ref: string): Promise<void> {
  const r = await buildah(['rmi', '-f', ref], { allowFailure: true });
  if (r.code !== 0 && !/image not known|not found|unknown image/i.test(r.stderr)) {
    throw new CocoonError('buildah_failed', `Could not remove image ${ref}: ${tail(r.stderr)}`);
  }
}

/** Removes a working container; one that is not there is fine. */
export async function removeContainer(ref: string): Promise<void> {
  const r = await buildah(['rm', ref], { allowFailure: true });
  if (r.code !== 0 && !/not known|no such|not found|does not exist/i.test(r.stderr)) {
    throw new CocoonError('buildah_failed', `Could not remove container ${ref}: ${tail(r.stderr)}`);
  }
}

/** IDs of buildah's working containers. */
export async function listContainerIds(): Promise<string[]> {
  const { stdout } = await buildah(['containers', '--json']);
  const list = JSON.parse(stdout || '[]') as Array<{ id: string }> | null;
  return (list ?? []).map((c) => c.id);
}

/** IDs of all images in local storage, intermediate ones included. */
export async function listImageIds(): Promise<string[]> {
  const { stdout } = await buildah(['images', '-a', '--json']);
  const list = JSON.parse(stdout || '[]') as Array<{ id: string }> | null;
  return (list ?? []).map((i) => i.id);
}

export type BuildNetwork = 'host' | 'private' | 'none';

export interface BuildOptions {
  /** The build context: a directory holding the Dockerfile (or `dockerfile`). */
  contextDir: string;
  /** Path of the Dockerfile relative to the context (default `Dockerfile`). */
  dockerfile?: string;
  buildArgs?: Record<string, string>;
  /** Name for the result; default a unique `localhost/cocoon-build/<random>:latest`. */
  tag?: string;
  /**
   * Network of RUN steps (default `$COCOON_BUILD_NETWORK`, else `private`). `private`: a CNI
   * bridge with NAT, so `apt-get install` works but the host's loopback services (the API,
   * other microVMs' forwarded ports) are out of reach; `host`: the host's network, loopback
   * included (only for trusted Dockerfiles); `none`: no network.
   */
  network?: BuildNetwork;
  /** Target stage of a multi-stage Dockerfile (default: the last). */
  target?: string;
  /**
   * Directory under which the build's private TMPDIR is made (default the system temp dir).
   * A caller that may have to clean up after a crash puts it in its own scratch directory:
   * the runc containers of RUN steps are then recognisable by their bundle path.
   */
  tmpParent?: string;
  /** Each line of the build log as it comes. */
  onLog?: (line: string) => void;
  signal?: AbortSignal;
  /** How long buildah gets to stop after a cancel before it is killed (default 15 s). */
  cancelGraceMs?: number;
}

export interface BuildResult {
  imageId: string;
  tag: string;
  config: ImageConfig;
  /** The whole build log (bounded: the oldest lines go first beyond a few MiB). */
  log: string[];
  durationMs: number;
}

function defaultNetwork(): BuildNetwork {
  return setting('COCOON_BUILD_NETWORK');
}

const MAX_LOG_BYTES = 4 * 1024 * 1024;
const ARG_NAME = /^[A-Za-z_][A-Za-z0-9_]*$/;

/** Builds in flight and started in this process: a cleanup only sweeps storage when its build ran alone. */
let buildsInFlight = 0;
let buildsStarted = 0;

/**
 * Builds a Dockerfile into a local image. Throws CocoonError `build_failed` (with the last
 * lines of the log) when the Dockerfile fails, `build_cancelled` / `build_timeout` when the
 * signal fires; then nothing of the build remains.
 */
export async function buildImage(options: BuildOptions): Promise<BuildResult> {
  const started = performance.now();
  const contextDir = resolve(options.contextDir);
  const dockerfile = resolve(contextDir, options.dockerfile ?? 'Dockerfile');
  const tag = options.tag ?? `localhost/cocoon-build/${randomBytes(8).toString('hex')}:latest`;
  for (const [k, v] of Object.entries(options.buildArgs ?? {})) {
    if (!ARG_NAME.test(k)) {
      throw new CocoonError('invalid_build_arg', `Build argument name ${JSON.stringify(k)} is not valid: use letters, digits and _ (not first).`, { status: 400 });
    }
    if (v.includes('\0')) {
      throw new CocoonError('invalid_build_arg', `Build argument ${k} contains a NUL byte.`, { status: 400 });
    }
  }
  if (options.signal?.aborted) throw cancelledError(options.signal);

  // A private TMPDIR for buildah: the runc bundles of this build's RUN steps land there, which
  // tells this build's containers from those of concurrent builds.
  if (options.tmpParent) await mkdir(options.tmpParent, { recursive: true });
  const tmp = await mkdtemp(join(options.tmpParent ?? tmpdir(), 'cocoon-build-'));
  const logLines = new BoundedLog(MAX_LOG_BYTES);
  const emit = (line: string): void => {
    logLines.push(line);
    try {
      options.onLog?.(line);
    } catch (e) {
      log.warn({ err: errorMessage(e) }, 'build log callback threw');
    }
  };

  const args = [
    'bud',
    '--layers=false',
    '--pull=false', // use a local image when there is one (seeded bases), pull only if missing
    '--runtime', RUNC,
    '--isolation', 'oci',
    '--network', options.network ?? defaultNetwork(),
    '--format', 'docker', // keeps SHELL, HEALTHCHECK, ONBUILD, which the OCI format drops
    '--rm', '--force-rm',
    '--identity-label=false',
    '--iidfile', join(tmp, 'iid'),
    '-f', dockerfile,
    '-t', tag,
  ];
  if (options.target) args.push('--target', options.target);
  for (const [k, v] of Object.entries(options.buildArgs ?? {})) args.push('--build-arg', `${k}=${v}`);
  args.push(contextDir);

  const registries = await registriesConfEnv();
  const before = await Promise.all([listContainerIds(), listImageIds()]);
  const startedAlone = buildsInFlight === 0;
  const myNumber = ++buildsStarted;
  buildsInFlight++;
  try {
    const result = await exec(BUILDAH, args, {
      cwd: contextDir,
      env: { TMPDIR: tmp, BUILDAH_LAYERS: 'false', ...registries },
      onLine: emit,
      discardOutput: true,
      signal: options.signal,
      killGraceMs: options.cancelGraceMs ?? 15_000,
      allowFailure: true,
      resolveOnAbort: true,
    });
    if (result.aborted) {
      // After SIGTERM buildah removes its containers itself; after SIGKILL, sweep storage too
      // (only when no other build of this process ran meanwhile: their work looks the same).
      const alone = startedAlone && buildsStarted === myNumber;
      const diff = result.forceKilled && alone ? { containers: before[0], images: before[1] } : undefined;
      if (result.forceKilled && !alone) log.warn({ tag }, 'a killed build ran beside others: its working containers may remain');
      await sweep({ tmp, tag, before: diff });
      throw cancelledError(options.signal!);
    }
    if (result.code !== 0) {
      await sweep({ tmp, tag, before: undefined });
      throw buildFailed(logLines.lines(), result.code);
    }
    const imageId = (await readFile(join(tmp, 'iid'), 'utf8')).trim().replace(/^sha256:/, '');
    let config: ImageConfig;
    try {
      config = await inspectImage(imageId);
    } catch (e) {
      await removeImage(tag).catch(() => {});
      throw e;
    }
    if (options.signal?.aborted) {
      await removeImage(tag).catch(() => {});
      throw cancelledError(options.signal);
    }
    return { imageId, tag, config, log: logLines.lines(), durationMs: performance.now() - started };
  } finally {
    buildsInFlight--;
    await rm(tmp, { recursive: true, force: true }).catch(() => {});
  }
}

const SYSTEM_REGISTRIES_CONF = '/etc/containers/registries.conf';

/**
 * Short names (`FROM golang:1.22`) resolve to Docker Hub, as with Docker, unless the host's
 * registries.conf says otherwise. Done with a copy of that file plus the setting, given to
 * buildah through CONTAINERS_REGISTRIES_CONF (drop-ins such as shortnames.conf still apply), so
 * the host's own configuration is never edited.
 */
async function registriesConfEnv(): Promise<Record<string, string>> {
  const system = await readFile(SYSTEM_REGISTRIES_CONF, 'utf8').catch(() => '');
  if (/^\s*unqualified-search-registries\s*=/m.test(system)) return {};
  const text = '# Written by Cocoon: the host\'s registries.conf, with short names resolved on Docker Hub.\n' +
    'unqualified-search-registries = ["docker.io"]\n\n' + system;
  const dir = builderCacheDir();
  const path = join(dir, 'registries.conf');
  if ((await readFile(path, 'utf8').catch(() => undefined)) !== text) {
    await mkdir(dir, { recursive: true });
    const partial = `${path}.${process.pid}.partial`;
    await writeFile(partial, text, { mode: 0o644 });
    await rename(partial, path);
  }
  return { CONTAINERS_REGISTRIES_CONF: path };
}

/**
 * Removes what a stopped build may have left: runc containers of its RUN steps (found by their
 * bundle under the build's TMPDIR), its tagged image, and, when `before` is given (no other build
 * ran meanwhile), working containers and images that appeared during the build.
 */
async function sweep(what: { tmp: string; tag: string; before: { containers: string[]; images: string[] } | undefined }): Promise<void> {
  // buildah names the runc container of a RUN step `buildah-<bundle dir name>`.
  const runIds = new Set((await readdir(what.tmp).catch(() => [] as string[])).filter((n) => n.startsWith('buildah')).map((n) => `buildah-${n}`));
  try {
    const r = await exec(RUNC, ['--root', RUNC_ROOT, 'list', '--format', 'json'], { allowFailure: true });
    const list = r.code === 0 ? (JSON.parse(r.stdout.trim() || '[]') as Array<{ id: string; bundle: string }> | null) : [];
    for (const c of list ?? []) {
      if (!c.bundle.startsWith(what.tmp + '/')) continue;
      runIds.add(c.id);
      log.warn({ container: c.id }, 'removing a runc container left by a stopped build');
      await exec(RUNC, ['--root', RUNC_ROOT, 'kill', c.id, 'KILL'], { allowFailure: true });
      await exec(RUNC, ['--root', RUNC_ROOT, 'delete', '--force', c.id], { allowFailure: true });
    }
  } catch (e) {
    log.warn({ err: errorMessage(e) }, 'could not list runc containers');
  }
  // A killed buildah does not tear down the bridge network of a RUN step: do it here.
  for (const id of runIds) await releaseCniNetwork(id).catch((e: unknown) => log.warn({ err: errorMessage(e), container: id }, 'could not release a build network'));
  // Mounts buildah may have left under the build's TMPDIR (RUN step rootfs binds).
  await unmountUnder(what.tmp);
  if (await imageExists(what.tag)) await removeImage(what.tag).catch(() => {});
  if (what.before) {
    const [containers, images] = await Promise.all([listContainerIds(), listImageIds()]);
    for (const id of containers) {
      if (!what.before.containers.includes(id)) {
        log.warn({ container: id }, 'removing a working container left by a stopped build');
        await removeContainer(id).catch(() => {});
      }
    }
    for (const id of images) {
      if (!what.before.images.includes(id)) {
        log.warn({ image: id }, 'removing an image left by a stopped build');
        await removeImage(id).catch(() => {});
      }
    }
  }
}

const CNI_IPAM_DIR = '/var/lib/cni/networks';

/**
 * Undoes what the CNI plugins (bridge, host-local IPAM, firewall, NAT) set up for one container
 * when nobody ran their DEL: the address lease, the NAT chain and its POSTROUTING jump (both
 * carry the container id in a comment), the firewall's FORWARD rules for the address.
 */
export async function releaseCniNetwork(containerId: string): Promise<boolean> {
  const ips: string[] = [];
  for (const network of await readdir(CNI_IPAM_DIR).catch(() => [] as string[])) {
    const dir = join(CNI_IPAM_DIR, network);
    for (const name of await readdir(dir).catch(() => [] as string[])) {
      if (name === 'lock' || name.startsWith('last_reserved_ip')) continue;
      const owner = (await readFile(join(dir, name), 'utf8').catch(() => '')).split('\n')[0]?.trim();
      if (owner === containerId) {
        ips.push(name);
        await unlink(join(dir, name)).catch(() => {});
      }
    }
  }
  const marker = `id: \\"${containerId}\\"`;
  const nat = (await iptables(['-t', 'nat', '-S'], { allowFailure: true })).stdout.split('\n');
  const chains = new Set<string>();
  let found = ips.length > 0;
  for (const line of nat) {
    if (!line.startsWith('-A ') || !line.includes(marker)) continue;
    found = true;
    const words = splitIptablesRule(line);
    const chain = words[1]!;
    if (chain.startsWith('CNI-')) {
      chains.add(chain);
    } else {
      await iptables(['-t', 'nat', '-D', ...words.slice(1)], { allowFailure: true });
      const target = words[words.indexOf('-j') + 1];
      if (target?.startsWith('CNI-')) chains.add(target);
    }
  }
  for (const chain of chains) {
    await iptables(['-t', 'nat', '-F', chain], { allowFailure: true });
    await iptables(['-t', 'nat', '-X', chain], { allowFailure: true });
  }
  if (ips.length) {
    const filter = (await iptables(['-t', 'filter', '-S', 'CNI-FORWARD'], { allowFailure: true })).stdout.split('\n');
    for (const line of filter) {
      if (line.startsWith('-A ') && ips.some((ip) => line.includes(` ${ip}/32 `))) {
        await iptables(['-t', 'filter', '-D', ...splitIptablesRule(line).slice(1)], { allowFailure: true });
      }
    }
  }
  if (found) log.warn({ container: containerId, ips }, 'released the network of a killed build step');
  return found;
}

/** Lazily unmounts every mount point at or below `dir`, deepest first. */
export async function unmountUnder(dir: string): Promise<void> {
  const mounts = await readFile('/proc/self/mounts', 'utf8').catch(() => '');
  const points = mounts.split('\n')
    .map((l) => l.split(' ')[1])
    .filter((p): p is string => p !== undefined)
    .map((p) => p.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8))))
    .filter((p) => p === dir || p.startsWith(dir + '/'))
    .sort((a, b) => b.length - a.length);
  for (const p of points) await exec('umount', ['-l', p], { allowFailure: true });
}

function cancelledError(signal: AbortSignal): CocoonError {
  const reason = abortReason(signal);
  const timeout = reason instanceof Error && reason.name === 'TimeoutError';
  return timeout
    ? new CocoonError('build_timeout', 'The image build took too long and was stopped. Make the Dockerfile do less, or allow more time.', { status: 408, cause: reason })
    : new CocoonError('build_cancelled', 'The image build was cancelled.', { status: 409, cause: reason });
}

const PULL_FAILURE = /(pinging container registry|initializing source|short-name .* did not resolve|no such host|dial tcp|requested access to the resource is denied|manifest unknown|name unknown)/i;

function buildFailed(lines: string[], code: number): CocoonError {
  const errorLine = [...lines].reverse().find((l) => /^(Error|error):/.test(l)) ?? `buildah exited with status ${code}`;
  const last = lines.filter((l) => !/^(Getting image source signatures|Copying (blob|config)|Writing manifest|Storing signatures)/.test(l)).slice(-30);
  let hint = '';
  if (PULL_FAILURE.test(errorLine)) {
    hint = ' The base image is not in local storage and could not be pulled (no registry reachable?). Offline, these bases are available: busybox, debian:bookworm-slim.';
  }
  const message = `The Dockerfile build failed: ${errorLine.replace(/^(Error|error):\s*/, '')}.${hint}\nLast lines of the build log:\n${last.join('\n')}`;
  return new CocoonError('build_failed', message, { status: 422, details: { logTail: last } });
}

/** Keeps the lines of a log up to a byte budget, dropping the oldest beyond it. */
class BoundedLog {
  private readonly buf: string[] = [];
  private bytes = 0;
  private dropped = 0;
  private readonly max: number;

  constructor(max: number) {
    this.max = max;
  }

  push(line: string): void {
    this.buf.push(line);
    this.bytes += line.length + 1;
    while (this.bytes > this.max && this.buf.length > 1) {
      this.bytes -= this.buf.shift()!.length + 1;
      this.dropped++;
    }
  }

  lines(): string[] {
    return this.dropped ? [`[${this.dropped} earlier lines dropped]`, ...this.buf] : [...this.buf];
  }
}

export interface MountedImage {
  /** Name of the working container holding the mount. */
  container: string;
  /** The image's root filesystem, writable (changes stay in the throwaway container). */
  dir: string;
  /** Unmounts and removes the working container. */
  release(): Promise<void>;
}

/**
 * Mounts an image's root filesystem through a throwaway working container: a zero-copy export
 * that tools like `mkfs.ext4 -d` read directly.
 */
export async function mountImage(ref: string, containerName?: string): Promise<MountedImage> {
  const name = containerName ?? `cocoon-export-${randomBytes(6).toString('hex')}`;
  await buildah(['from', '--pull=never', '--quiet', '--name', name, ref]);
  try {
    const { stdout } = await buildah(['mount', name]);
    const dir = stdout.trim();
    if (!dir.startsWith('/')) throw new CocoonError('buildah_failed', `buildah mount printed no path for ${name}: ${stdout}`);
    let released = false;
    return {
      container: name,
      dir,
      async release() {
        if (released) return;
        released = true;
        await buildah(['umount', name], { allowFailure: true });
        await removeContainer(name);
      },
    };
  } catch (e) {
    await removeContainer(name).catch(() => {});
    throw e;
  }
}
