/**
 * Seeds base images into buildah's local storage, offline, under their usual names, so that
 * common Dockerfiles (`FROM busybox`, `FROM debian:bookworm-slim`) build without a registry:
 *
 * - `docker.io/library/busybox:latest`: Debian's static busybox, its applet links, and the
 *   /etc files of the official image (users root … nobody).
 * - `docker.io/library/debian:bookworm-slim` (also `debian:bookworm`, `debian:12-slim`,
 *   `debian:12`): `debootstrap --variant=minbase bookworm` from the host's Debian mirror,
 *   slimmed like the official image; apt inside points at the same mirror, so that
 *   `RUN apt-get update && apt-get install …` works. The debootstrap result is cached as a
 *   tarball (once per machine, ~30 s); importing it takes a few seconds.
 *
 * Idempotent and quick when already there (one `buildah inspect` per name). A name that
 * exists and was not seeded here (say, pulled from a registry) is left alone. Seeding is
 * serialized across processes with a lock file in the cache directory.
 */
import { spawn } from 'node:child_process';
import { constants } from 'node:fs';
import { chmod, copyFile, lstat, mkdir, mkdtemp, open, readdir, readFile, rename, rm, symlink, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { CocoonError, errorMessage } from '../common/errors.ts';
import { buildah, imageExists, inspectImage, removeContainer, unmountUnder } from './buildah.ts';
import { exec } from './exec.ts';
import { builderCacheDir } from './paths.ts';
import { setting } from '../common/settings.ts';

export const BUSYBOX_IMAGE = 'docker.io/library/busybox:latest';
export const DEBIAN_IMAGE = 'docker.io/library/debian:bookworm-slim';

/** Bump a recipe's version to have existing seeds (and cached tarballs) replaced. */
const SEED_LABEL = 'io.cocoon.seed';
const BUSYBOX_RECIPE = 'busybox-1';
const DEBIAN_RECIPE = 'debian-bookworm-slim-1';

const DEFAULT_PATH = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin';

export type BaseImageName = 'busybox' | 'debian';

export interface SeedOptions {
  /** Where the debootstrap tarball and the lock live (default `<repo>/.cache/builder/base-images`). */
  cacheDir?: string;
  /** Which images (default both). */
  only?: BaseImageName[];
  /** Progress lines (debootstrap output, import steps). */
  onLog?: (line: string) => void;
  signal?: AbortSignal;
}

export interface SeedResult {
  image: BaseImageName;
  name: string;
  /** True when it was (re)imported now, false when it was there already. */
  seeded: boolean;
  ms: number;
}

export function defaultCacheDir(): string {
  return join(builderCacheDir(), 'base-images');
}

let inFlight: Promise<SeedResult[]> | undefined;

/** Makes sure the base images are in local storage; seeds those that are missing. */
export async function ensureBaseImages(options: SeedOptions = {}): Promise<SeedResult[]> {
  const wanted = options.only ?? ['busybox', 'debian'];
  // Fast path: everything there (no lock, no cache dir).
  const t0 = performance.now();
  const states = await Promise.all(wanted.map((w) => seedState(w)));
  if (states.every((s) => s === 'current')) {
    const ms = performance.now() - t0;
    return wanted.map((image) => ({ image, name: mainName(image), seeded: false, ms }));
  }
  // One seeding at a time in this process; the file lock covers other processes.
  while (inFlight) await inFlight.catch(() => {});
  inFlight = (async () => {
    const cacheDir = options.cacheDir ?? defaultCacheDir();
    await mkdir(cacheDir, { recursive: true });
    return withFileLock(join(cacheDir, 'seed.lock'), async () => {
      const results: SeedResult[] = [];
      for (const image of wanted) {
        const start = performance.now();
        const state = await seedState(image);
        const seeded = state !== 'current';
        const oldId = state === 'stale' ? await imageId(mainName(image)) : undefined;
        if (seeded) {
          if (image === 'busybox') await seedBusybox(options);
          else await seedDebian(cacheDir, options);
        }
        await addAliases(image);
        if (oldId) await buildah(['rmi', oldId], { allowFailure: true }); // in use by containers: stays
        results.push({ image, name: mainName(image), seeded, ms: performance.now() - start });
      }
      return results;
    });
  })();
  try {
    return await inFlight;
  } finally {
    inFlight = undefined;
  }
}

function mainName(image: BaseImageName): string {
  return image === 'busybox' ? BUSYBOX_IMAGE : DEBIAN_IMAGE;
}

const ALIASES: Record<BaseImageName, string[]> = {
  busybox: ['docker.io/library/busybox:stable'],
  debian: ['docker.io/library/debian:12-slim', 'docker.io/library/debian:bookworm', 'docker.io/library/debian:12'],
};

/** `current`: there (ours and up to date, or not ours at all); `stale`: ours, older recipe; `missing`. */
async function seedState(image: BaseImageName): Promise<'current' | 'stale' | 'missing'> {
  const name = mainName(image);
  if (!(await imageExists(name))) return 'missing';
  const cfg = await inspectImage(name);
  const seed = cfg.labels[SEED_LABEL];
  if (seed === undefined) return 'current'; // not seeded here (e.g. pulled): leave it alone
  return seed === (image === 'busybox' ? BUSYBOX_RECIPE : DEBIAN_RECIPE) ? 'current' : 'stale';
}

/** Tags the extra names: those missing, and those that point at an older seed of ours. */
async function addAliases(image: BaseImageName): Promise<void> {
  const id = await imageId(mainName(image));
  for (const alias of ALIASES[image]) {
    const aliasId = await imageId(alias);
    if (aliasId === id) continue;
    if (aliasId === undefined || (await inspectImage(alias)).labels[SEED_LABEL] !== undefined) {
      await buildah(['tag', mainName(image), alias]);
    }
  }
}

async function imageId(ref: string): Promise<string | undefined> {
  const r = await buildah(['inspect', '--type', 'image', '--format', '{{.FromImageID}}', ref], { allowFailure: true });
  return r.code === 0 ? r.stdout.trim() : undefined;
}

// ---------------------------------------------------------------------------------- busybox

const BUSYBOX_PASSWD = `root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
bin:x:2:2:bin:/bin:/bin/false
sys:x:3:3:sys:/dev:/bin/false
sync:x:4:100:sync:/bin:/bin/sync
mail:x:8:8:mail:/var/spool/mail:/bin/false
www-data:x:33:33:www-data:/var/www:/bin/false
operator:x:37:37:Operator:/var:/bin/false
nobody:x:65534:65534:nobody:/home:/bin/false
`;

const BUSYBOX_GROUP = `root:x:0:
daemon:x:1:
bin:x:2:
sys:x:3:
adm:x:4:
tty:x:5:
disk:x:6:
lp:x:7:
mail:x:8:
kmem:x:9:
wheel:x:10:root
cdrom:x:11:
dialout:x:18:
floppy:x:19:
video:x:28:
audio:x:29:
tape:x:32:
www-data:x:33:
operator:x:37:
utmp:x:43:
plugdev:x:46:
staff:x:50:
lock:x:54:
netdev:x:82:
users:x:100:
nogroup:x:65534:
`;

/** Where Debian's busybox-static puts the binary. */
const HOST_BUSYBOX = setting('COCOON_BUSYBOX');

async function seedBusybox(options: SeedOptions): Promise<void> {
  const say = options.onLog ?? (() => {});
  await assertStaticBinary(HOST_BUSYBOX);
  const { stdout } = await exec(HOST_BUSYBOX, ['--list-full']);
  const applets = stdout.split('\n').map((l) => l.trim()).filter((l) => l && !l.includes('..'));
  say(`seeding ${BUSYBOX_IMAGE} from ${HOST_BUSYBOX} (${applets.length} applets)`);
  await importRootfs(BUSYBOX_IMAGE, BUSYBOX_RECIPE, ['sh'], async (root) => {
    for (const d of ['bin', 'sbin', 'usr/bin', 'usr/sbin', 'usr/local/bin', 'etc', 'dev', 'proc', 'sys', 'run', 'home', 'var/spool/mail', 'var/www']) {
      await mkdir(join(root, d), { recursive: true, mode: 0o755 });
    }
    await mkdir(join(root, 'root'), { mode: 0o700 });
    await mkdir(join(root, 'tmp'));
    await chmod(join(root, 'tmp'), 0o1777);
    await copyFile(HOST_BUSYBOX, join(root, 'bin/busybox'));
    await chmod(join(root, 'bin/busybox'), 0o755);
    for (const applet of applets) {
      const path = join(root, applet);
      if (applet === 'bin/busybox' || (await exists(path))) continue;
      await mkdir(dirname(path), { recursive: true, mode: 0o755 });
      await symlink('/bin/busybox', path);
    }
    await writeFile(join(root, 'etc/passwd'), BUSYBOX_PASSWD, { mode: 0o644 });
    await writeFile(join(root, 'etc/group'), BUSYBOX_GROUP, { mode: 0o644 });
    const shadow = BUSYBOX_PASSWD.split('\n').filter(Boolean).map((l) => `${l.split(':')[0]}:*:10933:0:99999:7:::`).join('\n') + '\n';
    await writeFile(join(root, 'etc/shadow'), shadow, { mode: 0o640 });
  });
}

/** Refuses a dynamically linked busybox: the image has no libraries for it. */
async function assertStaticBinary(path: string): Promise<void> {
  let buf: Buffer;
  try {
    const fh = await open(path, 'r');
    try {
      buf = Buffer.alloc(64 * 1024);
      const { bytesRead } = await fh.read(buf, 0, buf.length, 0);
      buf = buf.subarray(0, bytesRead);
    } finally {
      await fh.close();
    }
  } catch (e) {
    throw new CocoonError('base_image_seed_failed', `${path} is missing (${errorMessage(e)}): install Debian's busybox-static (apt-get install busybox-static).`);
  }
  const isElf64 = buf.length > 64 && buf.readUInt32BE(0) === 0x7f454c46 && buf[4] === 2;
  if (!isElf64) throw new CocoonError('base_image_seed_failed', `${path} is not a 64-bit ELF program: install busybox-static.`);
  const phoff = Number(buf.readBigUInt64LE(0x20));
  const phentsize = buf.readUInt16LE(0x36);
  const phnum = buf.readUInt16LE(0x38);
  for (let i = 0; i < phnum; i++) {
    const off = phoff + i * phentsize;
    if (off + 4 <= buf.length && buf.readUInt32LE(off) === 3 /* PT_INTERP */) {
      throw new CocoonError('base_image_seed_failed', `${path} is dynamically linked: install busybox-static (apt-get install busybox-static), which replaces it with a static build.`);
    }
  }
}

// ----------------------------------------------------------------------------------- debian

export interface DebianSources {
  /** Main archive, e.g. http://deb.debian.org/debian */
  mirror: string;
  /** Security archive, e.g. http://deb.debian.org/debian-security, when the host has one. */
  security: string | undefined;
}

interface AptEntry {
  types: string[];
  uris: string[];
  suites: string[];
}

/**
 * Finds the Debian mirror in apt sources, given the texts of /etc/apt/sources.list (one-line
 * format) and /etc/apt/sources.list.d/*.list / *.sources (deb822). Prefers the entry serving
 * `bookworm`; falls back to any `…/debian` archive, then to deb.debian.org.
 */
export function findDebianSources(files: Array<{ name: string; text: string }>): DebianSources {
  const entries: AptEntry[] = [];
  for (const f of files) {
    if (f.name.endsWith('.sources')) entries.push(...parseDeb822(f.text));
    else if (f.name.endsWith('.list')) entries.push(...parseOneLine(f.text));
  }
  const usable = (u: string): boolean => /^(https?|file):\/\//.test(u);
  const debs = entries.filter((e) => e.types.includes('deb'));
  const pick = (suite: string, notSecurity: boolean): string | undefined => {
    for (const e of debs) {
      if (!e.suites.includes(suite)) continue;
      const uri = e.uris.find((u) => usable(u) && (!notSecurity || !/security/.test(u)));
      if (uri) return uri.replace(/\/+$/, '');
    }
    return undefined;
  };
  const mirror = pick('bookworm', true)
    ?? debs.flatMap((e) => e.uris).find((u) => usable(u) && /\/debian\/?$/.test(u))?.replace(/\/+$/, '')
    ?? 'http://deb.debian.org/debian';
  const security = pick('bookworm-security', false)
    ?? debs.flatMap((e) => e.uris).find((u) => usable(u) && /\/debian-security\/?$/.test(u))?.replace(/\/+$/, '');
  return { mirror, security };
}

function parseDeb822(text: string): AptEntry[] {
  const out: AptEntry[] = [];
  for (const stanza of text.split(/\n\s*\n/)) {
    const fields = new Map<string, string>();
    let last: string | undefined;
    for (const line of stanza.split('\n')) {
      if (line.startsWith('#')) continue;
      if (/^\s/.test(line) && last) {
        fields.set(last, `${fields.get(last)} ${line.trim()}`);
        continue;
      }
      const m = /^([A-Za-z-]+):\s*(.*)$/.exec(line);
      if (m) {
        last = m[1]!.toLowerCase();
        fields.set(last, m[2]!.trim());
      }
    }
    if (fields.get('enabled')?.toLowerCase() === 'no') continue;
    const words = (k: string): string[] => (fields.get(k) ?? '').split(/\s+/).filter(Boolean);
    if (fields.has('uris')) out.push({ types: words('types'), uris: words('uris'), suites: words('suites') });
  }
  return out;
}

function parseOneLine(text: string): AptEntry[] {
  const out: AptEntry[] = [];
  for (const raw of text.split('\n')) {
    const line = raw.replace(/#.*$/, '').replace(/\[[^\]]*\]/, '').trim();
    const [type, uri, suite] = line.split(/\s+/);
    if (type && uri && suite) out.push({ types: [type], uris: [uri], suites: [suite] });
  }
  return out;
}

/** The host's Debian sources (COCOON_DEBIAN_MIRROR overrides the main archive). */
export async function hostDebianSources(): Promise<DebianSources> {
  const files: Array<{ name: string; text: string }> = [];
  const main = await readFile('/etc/apt/sources.list', 'utf8').catch(() => undefined);
  if (main !== undefined) files.push({ name: 'sources.list', text: main });
  const dir = '/etc/apt/sources.list.d';
  for (const name of (await readdir(dir).catch(() => [] as string[])).sort()) {
    const text = await readFile(join(dir, name), 'utf8').catch(() => undefined);
    if (text !== undefined) files.push({ name, text });
  }
  const found = findDebianSources(files);
  const mirror = setting('COCOON_DEBIAN_MIRROR');
  return mirror !== undefined ? { ...found, mirror } : found;
}

/** What the official slim image configures: no docs, man pages, locales; apt cleans up. */
const DPKG_SLIM = `# As in the official debian:*-slim images: keep images small.
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
`;

const APT_CONF: Record<string, string> = {
  'docker-clean': `DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
`,
  'docker-no-languages': 'Acquire::Languages "none";\n',
  'docker-autoremove-suggests': 'Apt::AutoRemove::SuggestsImportant "false";\n',
};

async function seedDebian(cacheDir: string, options: SeedOptions): Promise<void> {
  const say = options.onLog ?? (() => {});
  const tarball = join(cacheDir, `${DEBIAN_RECIPE}.tar`);
  if (!(await exists(tarball))) await debootstrapTarball(tarball, options);
  say(`importing ${DEBIAN_IMAGE} from ${tarball}`);
  await importRootfs(DEBIAN_IMAGE, DEBIAN_RECIPE, ['bash'], async (root) => {
    await exec('tar', ['--numeric-owner', '--xattrs', '--xattrs-include=*', '-xpf', tarball, '-C', root], { errorCode: 'base_image_seed_failed', signal: options.signal });
  });
}

async function debootstrapTarball(tarball: string, options: SeedOptions): Promise<void> {
  const say = options.onLog ?? (() => {});
  const sources = await hostDebianSources();
  const work = await mkdtemp(join(dirname(tarball), 'debootstrap-'));
  const root = join(work, 'rootfs');
  try {
    say(`debootstrap --variant=minbase bookworm from ${sources.mirror} (once per machine)`);
    await exec('debootstrap', ['--variant=minbase', '--merged-usr', 'bookworm', root, sources.mirror], {
      errorCode: 'base_image_seed_failed',
      onLine: (l) => say(`debootstrap: ${l}`),
      discardOutput: true,
      signal: options.signal,
      killGraceMs: 10_000,
    }).catch(async (e: unknown) => {
      const logText = await readFile(join(root, 'debootstrap/debootstrap.log'), 'utf8').catch(() => '');
      throw new CocoonError('base_image_seed_failed',
        `debootstrap of Debian bookworm from ${sources.mirror} failed: ${errorMessage(e)}\n${logText.split('\n').slice(-15).join('\n')}\n` +
        'Check that the mirror is reachable, or set COCOON_DEBIAN_MIRROR.', { cause: e });
    });
    await slimDebian(root, sources);
    const partial = `${tarball}.partial`;
    await exec('tar', ['--numeric-owner', '--xattrs', '--xattrs-include=*', '-C', root, '-cf', partial, '.'], { errorCode: 'base_image_seed_failed', signal: options.signal });
    await rename(partial, tarball);
  } finally {
    await unmountUnder(work); // debootstrap mounts /proc and /sys inside while it runs
    await rm(work, { recursive: true, force: true });
    await rm(`${tarball}.partial`, { force: true });
  }
}

/** Makes a debootstrap tree look like the official slim image. */
async function slimDebian(root: string, sources: DebianSources): Promise<void> {
  // Host files debootstrap copies in; buildah and the guest provide their own.
  for (const f of ['etc/resolv.conf', 'etc/hostname', 'etc/hosts', 'etc/machine-id']) {
    await rm(join(root, f), { force: true });
  }
  await rm(join(root, 'etc/apt/sources.list'), { force: true });
  const suites = ['bookworm', 'bookworm-updates'];
  let deb822 = `Types: deb\nURIs: ${sources.mirror}\nSuites: ${suites.join(' ')}\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n`;
  if (sources.security) {
    deb822 += `\nTypes: deb\nURIs: ${sources.security}\nSuites: bookworm-security\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n`;
  }
  await mkdir(join(root, 'etc/apt/sources.list.d'), { recursive: true });
  await writeFile(join(root, 'etc/apt/sources.list.d/debian.sources'), deb822, { mode: 0o644 });
  await mkdir(join(root, 'etc/dpkg/dpkg.cfg.d'), { recursive: true });
  await writeFile(join(root, 'etc/dpkg/dpkg.cfg.d/docker'), DPKG_SLIM, { mode: 0o644 });
  for (const [name, text] of Object.entries(APT_CONF)) {
    await writeFile(join(root, 'etc/apt/apt.conf.d', name), text, { mode: 0o644 });
  }
  // What the excludes above would not have installed, and caches and logs.
  await exec('find', [join(root, 'usr/share/doc'), '-mindepth', '2', '!', '-name', 'copyright', '!', '-type', 'd', '-delete'], { allowFailure: true });
  await exec('find', [join(root, 'usr/share/doc'), '-mindepth', '1', '-type', 'd', '-empty', '-delete'], { allowFailure: true });
  for (const d of ['usr/share/man', 'usr/share/groff', 'usr/share/info', 'usr/share/lintian', 'usr/share/linda']) {
    await emptyDir(join(root, d));
  }
  await exec('find', [join(root, 'usr/share/locale'), '-mindepth', '1', '-maxdepth', '1', '!', '-name', 'locale.alias', '-exec', 'rm', '-rf', '{}', '+'], { allowFailure: true });
  for (const d of ['var/lib/apt/lists', 'var/cache/apt/archives', 'var/log', 'tmp', 'var/tmp']) await emptyDir(join(root, d), ['partial', 'lock']);
  await rm(join(root, 'var/cache/apt/pkgcache.bin'), { force: true });
  await rm(join(root, 'var/cache/apt/srcpkgcache.bin'), { force: true });
  await rm(join(root, 'var/cache/ldconfig/aux-cache'), { force: true });
  await chmod(join(root, 'tmp'), 0o1777);
}

// ----------------------------------------------------------------------------------- shared

/**
 * Creates an image from scratch: `fill` writes the root filesystem into the mounted working
 * container, then it is committed under `name` with a default command, PATH and the seed label.
 */
async function importRootfs(name: string, recipe: string, cmd: string[], fill: (root: string) => Promise<void>): Promise<void> {
  const { stdout } = await buildah(['from', '--quiet', 'scratch'], { errorCode: 'base_image_seed_failed' });
  const ctr = stdout.trim();
  try {
    const root = (await buildah(['mount', ctr], { errorCode: 'base_image_seed_failed' })).stdout.trim();
    await fill(root);
    await buildah(['umount', ctr]);
    await buildah(['config',
      '--cmd', JSON.stringify(cmd),
      '--env', `PATH=${DEFAULT_PATH}`,
      '--label', `${SEED_LABEL}=${recipe}`,
      '--os', 'linux',
      '--arch', 'amd64',
      '--created-by', `cocoon seed ${recipe}`,
      ctr], { errorCode: 'base_image_seed_failed' });
    await buildah(['commit', '--quiet', '--rm', '--format', 'docker', ctr, name], { errorCode: 'base_image_seed_failed' });
  } catch (e) {
    await buildah(['umount', ctr], { allowFailure: true });
    await removeContainer(ctr).catch(() => {});
    throw e;
  }
}

/**
 * Runs `fn` holding an exclusive flock(2) on `path`. The lock is taken by flock(1) on an fd it
 * shares with this process (an open file description), and stays held until we close it.
 */
async function withFileLock<T>(path: string, fn: () => Promise<T>): Promise<T> {
  const fh = await open(path, constants.O_RDWR | constants.O_CREAT, 0o644);
  try {
    await new Promise<void>((res, rej) => {
      const child = spawn('flock', ['--exclusive', '3'], { stdio: ['ignore', 'ignore', 'pipe', fh.fd] });
      let err = '';
      child.stderr!.on('data', (b: Buffer) => { err += b.toString(); });
      child.on('error', rej);
      child.on('close', (code) => code === 0 ? res() : rej(new CocoonError('base_image_seed_failed', `flock ${path} failed: ${err.trim()}`)));
    });
    return await fn();
  } finally {
    await fh.close();
  }
}

async function exists(path: string): Promise<boolean> {
  try {
    await lstat(path);
    return true;
  } catch {
    return false;
  }
}

async function emptyDir(dir: string, keep: string[] = []): Promise<void> {
  for (const name of await readdir(dir).catch(() => [] as string[])) {
    if (!keep.includes(name)) await rm(join(dir, name), { recursive: true, force: true });
  }
}
