/**
 * From an image's root filesystem and configuration to a bootable root disk: writes
 * `/.cocoon/workload`, makes sure the directories the guest mounts on exist, and turns the tree
 * into a sparse ext4 image that QEMU exposes as /dev/vda.
 *
 * The tree belongs to an untrusted image: every path inside it is resolved within the tree
 * (symlinks included, as a chroot would), never on the host.
 */
import { constants } from 'node:fs';
import { chown, lstat, mkdir, open, readlink, rm, stat, statfs, chmod } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { CocoonError } from '../common/errors.ts';
import type { ImageConfig } from './buildah.ts';
import { exec } from './exec.ts';
import { buildEnv, combineArgv, firstTcpPort, renderWorkload, resolveUser, type WorkloadConfig } from './workload.ts';

export const WORKLOAD_PATH = '/.cocoon/workload';

/**
 * Resolves `path` inside `root` as if `root` were `/`: absolute symlinks restart at `root`,
 * `..` stops there. Returns the host path, whose every existing component is a real directory
 * (the last one may be anything, or missing).
 */
export async function resolveInRoot(root: string, path: string, followLast = true): Promise<string> {
  let pending = path.split('/').filter((c) => c !== '' && c !== '.');
  const done: string[] = [];
  let hops = 0;
  while (pending.length) {
    const c = pending.shift()!;
    if (c === '..') {
      done.pop();
      continue;
    }
    const host = join(root, ...done, c);
    let st;
    try {
      st = await lstat(host);
    } catch {
      // Missing: the rest cannot hold symlinks; `..` still stops at the root.
      return join(root, ...normalize([...done, c, ...pending]));
    }
    if (st.isSymbolicLink() && (pending.length > 0 || followLast)) {
      if (++hops > 40) throw new CocoonError('invalid_image', `Too many symbolic links resolving ${path} in the image.`, { status: 422 });
      const target = await readlink(host);
      if (target.startsWith('/')) done.length = 0;
      pending = [...target.split('/').filter((x) => x !== '' && x !== '.'), ...pending];
      continue;
    }
    done.push(c);
  }
  return join(root, ...done);
}

function normalize(parts: string[]): string[] {
  const out: string[] = [];
  for (const p of parts) {
    if (p === '..') out.pop();
    else out.push(p);
  }
  return out;
}

/** Reads a regular file inside the image tree; undefined when it is missing or not a file. */
export async function readFileInRoot(root: string, path: string, maxBytes = 4 * 1024 * 1024): Promise<string | undefined> {
  const host = await resolveInRoot(root, path);
  let fh;
  try {
    fh = await open(host, constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK);
  } catch {
    return undefined;
  }
  try {
    const st = await fh.stat();
    if (!st.isFile()) return undefined;
    if (st.size > maxBytes) throw new CocoonError('invalid_image', `${path} in the image is larger than ${maxBytes} bytes.`, { status: 422 });
    return (await fh.readFile()).toString('utf8');
  } finally {
    await fh.close();
  }
}

/** Writes a file inside the image tree, never through a symlink; replaces what is there. */
async function writeFileInRoot(root: string, path: string, text: string, mode: number): Promise<void> {
  const host = await resolveInRoot(root, path, false);
  await rm(host, { force: true, recursive: true });
  const fh = await open(host, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW, mode);
  try {
    await fh.writeFile(text);
    await fh.chmod(mode);
  } finally {
    await fh.close();
  }
}

/** Creates a directory (and its parents) inside the tree; returns its host path. */
async function mkdirInRoot(root: string, path: string, owner?: { uid: number; gid: number }): Promise<string> {
  const parts = path.split('/').filter((c) => c !== '' && c !== '.');
  let current = '/';
  let host = root;
  for (const p of parts) {
    current = join(current, p);
    host = await resolveInRoot(root, current);
    let st;
    try {
      st = await stat(host);
    } catch {
      await mkdir(host, { mode: 0o755 });
      if (owner) await chown(host, owner.uid, owner.gid);
      continue;
    }
    if (!st.isDirectory()) {
      throw new CocoonError('invalid_image', `${current} in the image is not a directory, but the working directory needs it to be one.`, { status: 422 });
    }
  }
  return host;
}

export interface PreparedRootfs {
  workload: WorkloadConfig;
  /** As in the image: `8080/tcp`. */
  exposedPorts: string[];
  /** The lowest exposed TCP port, if any. */
  exposedTcpPort: number | undefined;
  /** The USER line as written in the image (empty for root). */
  user: string;
}

export interface PrepareOptions {
  /** Hook commands for the workload file (`run`, `suspend`, `resume`, `terminate`). */
  hooks?: Record<string, string>;
}

/**
 * Readies an image tree for the guest (in place: pass a throwaway copy or container mount):
 * resolves the workload from the image config, writes `/.cocoon/workload`, and makes
 * /dev /proc /sys /tmp /run real directories, /etc/hosts and /etc/resolv.conf useful.
 */
export async function prepareRootfs(root: string, config: ImageConfig, options: PrepareOptions = {}): Promise<PreparedRootfs> {
  const argv = combineArgv(config.entrypoint, config.cmd);
  if (argv.length === 0) {
    throw new CocoonError('no_command', 'The image has neither ENTRYPOINT nor CMD: add one to the Dockerfile (e.g. CMD ["./server"]) so the microVM knows what to run.', { status: 422 });
  }
  const passwd = await readFileInRoot(root, '/etc/passwd');
  const group = await readFileInRoot(root, '/etc/group');
  const user = resolveUser(config.user, passwd, group);
  const cwd = config.workingDir || '/';
  const workload: WorkloadConfig = {
    argv,
    env: buildEnv(config.env, user.home),
    cwd,
    uid: user.uid,
    gid: user.gid,
    groups: user.groups,
    hooks: options.hooks ?? {},
  };
  const text = renderWorkload(workload);

  // Mount points the guest uses: real directories (cocoon-init moves /dev, /proc, /sys there).
  for (const [dir, mode] of [['dev', 0o755], ['proc', 0o555], ['sys', 0o555], ['tmp', 0o1777], ['run', 0o755]] as const) {
    const host = join(root, dir);
    const st = await lstat(host).catch(() => undefined);
    const keepSymlink = st?.isSymbolicLink() && (dir === 'tmp' || dir === 'run'); // resolved in the guest
    if (st?.isDirectory() || keepSymlink) continue;
    if (st) await rm(host, { recursive: true, force: true });
    await mkdir(host);
    await chmod(host, mode);
  }
  // The working directory, as a runtime would create it.
  if (cwd !== '/') await mkdirInRoot(root, cwd, { uid: user.uid, gid: user.gid });

  // Name resolution in the guest (user-mode networking: DNS at 10.0.2.3), unless the image has its own.
  await fillIfEmpty(root, '/etc/hosts', '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\tcocoon\n');
  await fillIfEmpty(root, '/etc/resolv.conf', 'nameserver 10.0.2.3\n');

  // The workload file: whatever the image had at /.cocoon is replaced.
  await rm(join(root, '.cocoon'), { recursive: true, force: true });
  await mkdir(join(root, '.cocoon'), { mode: 0o700 });
  await writeFileInRoot(root, WORKLOAD_PATH, text, 0o600);

  return { workload, exposedPorts: config.exposedPorts, exposedTcpPort: firstTcpPort(config.exposedPorts), user: config.user };
}

async function fillIfEmpty(root: string, path: string, text: string): Promise<void> {
  const etc = await resolveInRoot(root, dirname(path));
  const st = await stat(etc).catch(() => undefined);
  if (!st?.isDirectory()) return;
  const host = join(etc, path.slice(path.lastIndexOf('/') + 1));
  const fst = await lstat(host).catch(() => undefined);
  if (fst && (!fst.isFile() || fst.size > 0)) return; // a symlink, or real content: the image's choice
  const fh = await open(host, constants.O_WRONLY | constants.O_CREAT | constants.O_TRUNC | constants.O_NOFOLLOW, 0o644);
  try {
    await fh.writeFile(text);
    await fh.chmod(0o644);
  } finally {
    await fh.close();
  }
}

export interface DiskOptions {
  /** The tree to put on the disk. */
  sourceDir: string;
  diskPath: string;
  sizeMiB: number;
  label?: string;
  signal?: AbortSignal;
}

export interface DiskResult {
  diskPath: string;
  sizeMiB: number;
  /** Space the tree takes (allocated bytes) and its number of inodes. */
  contentBytes: number;
  contentInodes: number;
}

const MIB = 1024 * 1024;
const BLOCK = 4096;
const BYTES_PER_INODE = 16384;
export const MIN_DISK_MIB = 16;
export const MAX_DISK_MIB = 32768;

/** The ext4 journal mke2fs makes for a filesystem of `blocks` 4 KiB blocks (e2fsprogs 1.47). */
function journalBlocks(blocks: number): number {
  if (blocks < 2048) return 0;
  if (blocks < 32768) return 1024;
  if (blocks < 256 * 1024) return 4096;
  if (blocks < 512 * 1024) return 8192;
  if (blocks < 4096 * 1024) return 16384;
  if (blocks < 8192 * 1024) return 32768;
  if (blocks < 16384 * 1024) return 65536;
  if (blocks < 32768 * 1024) return 131072;
  return 262144;
}

/** A generous estimate of the disk size (MiB) that holds `bytes` in `inodes` files. */
export function requiredDiskMiB(bytes: number, inodes: number): number {
  for (let mib = MIN_DISK_MIB; ; mib = Math.ceil(mib * 1.1)) {
    const blocks = (mib * MIB) / BLOCK;
    const inodeCount = Math.max((mib * MIB) / BYTES_PER_INODE, Math.ceil(inodes * 1.25) + 1024);
    const overhead = journalBlocks(blocks) * BLOCK + inodeCount * 256 + blocks * 64 /* bitmaps, descriptors */ + 4 * MIB;
    if (bytes * 1.05 + overhead <= mib * MIB) return mib;
    if (mib > 1024 * 1024) return mib;
  }
}

/**
 * Makes a sparse ext4 disk image of `sizeMiB` holding the tree (`mkfs.ext4 -d`): owners, modes,
 * symlinks, hard links, device nodes and xattrs as in the tree, root directory owned by 0:0.
 * Throws CocoonError `disk_too_small` when the content does not fit.
 */
export async function makeExt4Disk(options: DiskOptions): Promise<DiskResult> {
  const { sourceDir, diskPath, sizeMiB } = options;
  if (!Number.isInteger(sizeMiB) || sizeMiB < MIN_DISK_MIB || sizeMiB > MAX_DISK_MIB) {
    throw new CocoonError('invalid_disk_size', `diskMiB must be a whole number from ${MIN_DISK_MIB} to ${MAX_DISK_MIB}; got ${sizeMiB}.`, { status: 400 });
  }
  const [bytesOut, inodesOut] = [
    await exec('du', ['-s', '-x', '-B1', sourceDir], { signal: options.signal }),
    await exec('du', ['-s', '-x', '--inodes', sourceDir], { signal: options.signal }),
  ];
  const contentBytes = Number(bytesOut.stdout.split(/\s/)[0]);
  const contentInodes = Number(inodesOut.stdout.split(/\s/)[0]);
  const needed = requiredDiskMiB(contentBytes, contentInodes);
  const tooSmall = (): CocoonError => new CocoonError('disk_too_small',
    `The image's files take ${Math.ceil(contentBytes / MIB)} MiB in ${contentInodes} files, which does not fit a ${sizeMiB} MiB disk. ` +
    `Ask for diskMiB of at least ${needed}, or make the image smaller.`,
    { status: 422, details: { contentBytes, contentInodes, neededMiB: needed } });
  if (needed > sizeMiB) throw tooSmall();

  await mkdir(dirname(diskPath), { recursive: true });
  await rm(diskPath, { force: true });
  // The disk is sparse, but its files take at least their own size on the host's filesystem.
  const hostFree = await freeBytes(dirname(diskPath));
  if (hostFree !== undefined && hostFree < contentBytes) throw noSpace(diskPath, `${Math.ceil(contentBytes / MIB)} MiB of files, ${Math.floor(hostFree / MIB)} MiB free`);
  const fh = await open(diskPath, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL, 0o600);
  try {
    await fh.truncate(sizeMiB * MIB); // sparse: blocks are allocated only where mkfs writes
  } finally {
    await fh.close();
  }
  const defaultInodes = (sizeMiB * MIB) / BYTES_PER_INODE;
  const inodes = Math.max(defaultInodes, Math.ceil(contentInodes * 1.25) + 1024);
  const args = [
    '-q', '-F', '-t', 'ext4',
    '-b', String(BLOCK),
    '-N', String(Math.ceil(inodes)),
    '-m', '0', // no blocks reserved for root: the workload may run as any user
    '-L', options.label ?? 'cocoon-root',
    // Sparse file of zeros: skip zeroing inode tables and journal (no lazy init in the guest).
    '-E', 'root_owner=0:0,assume_storage_prezeroed=1',
    '-d', sourceDir,
    diskPath,
  ];
  try {
    await exec('mkfs.ext4', args, { signal: options.signal, errorCode: 'disk_failed' });
  } catch (e) {
    await rm(diskPath, { force: true });
    const text = e instanceof CocoonError ? `${e.message} ${String(e.details?.stderr ?? '')}` : '';
    // ENOSPC ("No space left on device") comes from the host's filesystem, where the disk file
    // is written; a filesystem inside the disk that is too small says "Could not allocate".
    if (/no space left on device|ENOSPC/i.test(text)) throw noSpace(diskPath, 'mkfs.ext4 could not write the disk file', e);
    if (/could not allocate|not enough space|allocating inode/i.test(text)) throw tooSmall();
    throw e;
  }
  return { diskPath, sizeMiB, contentBytes, contentInodes };
}

/** Free bytes on the filesystem holding `dir` for this process (root may use the reserved blocks; undefined if unknown). */
async function freeBytes(dir: string): Promise<number | undefined> {
  try {
    const fs = await statfs(dir);
    return (process.getuid?.() === 0 ? fs.bfree : fs.bavail) * fs.bsize;
  } catch {
    return undefined;
  }
}

/** The host's disk (the data directory's) is full: not the image's fault, nothing to change in the request. */
function noSpace(diskPath: string, what: string, cause?: unknown): CocoonError {
  return new CocoonError(
    'no_space',
    `no space left on the data directory's disk for the root disk (${diskPath}): ${what}. Free space there (or remove unused images), then build again.`,
    { status: 507, ...(cause ? { cause } : {}) },
  );
}
