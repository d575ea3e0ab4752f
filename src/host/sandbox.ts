/**
 * Least privilege for a VM's process (QEMU today; any VMM the same way): when the daemon runs
 * as root, the VM process does not.
 *
 * - Every VM process runs with its own uid (picked per VM from a range no account uses) and
 *   the group of the `cocoon-qemu` system user (created at first use, or by `npm run setup`;
 *   the name is kept: hosts have it), with no supplementary groups and no_new_privs, on top
 *   of the VMM's own sandbox (QEMU's seccomp: src/vmm/qemu/qemu-args.ts). Two VMs' processes
 *   cannot open each other's files: RAM, disk layer, sockets.
 * - It can reach only what it needs: its run directory's files (RAM file and disk layer: its
 *   own, 0600), a subdirectory for the sockets and pid file it creates, the guest kernel and
 *   initramfs (read), and snapshot disks as read-only backing files (root-owned, group
 *   `cocoon-qemu`, 0640). The run directory itself stays root's (0710, group `cocoon-qemu`):
 *   the VM process cannot replace the logs and records the daemon reads there.
 * - Directories on those paths get group `cocoon-qemu` search permission (no listing) when
 *   they are inside the data directory or the temp directory; anything else on the way must
 *   already be searchable, or the VM is refused with `qemu_no_access` and what to change.
 *   Everything else the daemon keeps (database, keys, objects) is 0600/0700 and out of reach.
 *
 * `COCOON_QEMU_USER=root` keeps the VM processes as root (diagnosis only); a daemon that is
 * not root runs them as itself. (The settings and error codes keep their QEMU names: they are
 * public.)
 */
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { CocoonError, errorMessage } from '../common/errors.ts';
import { log } from '../common/log.ts';
import { dataDir } from '../config/paths.ts';
import { setting } from '../common/settings.ts';

const run = promisify(execFile);

/**
 * Per-VM uids: 0x70000000 + 2^27. systemd's UID ranges document 1879048192-2147483647 as
 * unused (regular, dynamic and container ranges all lie below).
 */
export const VM_UID_BASE = 0x70000000;
export const VM_UID_COUNT = 1 << 27;

/** Who a VM's process runs as. */
export interface VmIdentity {
  uid: number;
  gid: number;
  /** The shared group's name (also the system user's). */
  group: string;
}

let account: Promise<{ uid: number; gid: number; name: string } | undefined> | undefined;
let warned = false;

/** The name of the system user whose group VM processes run in, or undefined when they keep the daemon's user. */
export function vmUserName(): string | undefined {
  if (typeof process.getuid !== 'function' || process.getuid() !== 0) {
    if (!warned) log.info('the daemon is not root: QEMU runs as the daemon\'s own user');
    warned = true;
    return undefined;
  }
  const name = setting('COCOON_QEMU_USER');
  if (name === 'root') {
    if (!warned) log.warn('COCOON_QEMU_USER=root: QEMU runs as root (for diagnosis only; guests are less contained)');
    warned = true;
    return undefined;
  }
  return name;
}

/** Reads `name` from /etc/passwd; undefined when absent. */
function lookupUser(name: string): { uid: number; gid: number; name: string } | undefined {
  for (const line of fs.readFileSync('/etc/passwd', 'utf8').split('\n')) {
    const fields = line.split(':');
    if (fields[0] === name && fields.length >= 4) return { name, uid: Number(fields[2]), gid: Number(fields[3]) };
  }
  return undefined;
}

/** Creates the `cocoon-qemu` system user and group if missing (idempotent; concurrent callers are fine). */
export async function ensureVmAccount(name: string): Promise<{ uid: number; gid: number; name: string }> {
  const existing = lookupUser(name);
  if (existing) return existing;
  try {
    await run('useradd', ['--system', '--user-group', '--no-create-home', '--home-dir', '/nonexistent', '--shell', '/usr/sbin/nologin', name]);
    log.info({ user: name }, 'created the system user QEMU runs as');
  } catch (error) {
    // 9: the name exists (another process created it meanwhile)
    if ((error as { code?: number }).code !== 9) {
      throw new CocoonError('qemu_user_failed', `cannot create the system user ${name} for QEMU: ${errorMessage(error)}`, { cause: error });
    }
  }
  const created = lookupUser(name);
  if (!created) throw new CocoonError('qemu_user_failed', `the system user ${name} for QEMU does not exist after useradd`);
  return created;
}

/**
 * The identity the process of the VM in `runDir` runs as, or undefined when it keeps the
 * daemon's user. The uid is derived from the run directory's inode (and device): distinct for every run
 * directory that exists at the same time on one filesystem, and stable for the VM's life. A
 * process started ahead of its VM (src/vmm/qemu/pool.ts) got its uid from the directory it was
 * started in; its run directory then records that uid (`recordVmUid`), and that record wins.
 */
export async function vmIdentity(runDir: string): Promise<VmIdentity | undefined> {
  const name = vmUserName();
  if (!name) return undefined;
  account ??= ensureVmAccount(name).catch((error: unknown) => {
    account = undefined;
    throw error;
  });
  const user = await account;
  if (!user) return undefined;
  if (setting('COCOON_QEMU_UIDS') === 'shared') return { uid: user.uid, gid: user.gid, group: name };
  const recorded = recordedVmUid(runDir);
  if (recorded !== undefined) return { uid: recorded, gid: user.gid, group: name };
  const st = fs.statSync(runDir, { bigint: true });
  const slot = (st.ino + st.dev * 0x9e3779b1n) % BigInt(VM_UID_COUNT);
  return { uid: VM_UID_BASE + Number(slot), gid: user.gid, group: name };
}

/** The file in a run directory that records its VM process's uid (root's: a guest cannot write it). */
const VM_UID_FILE = 'vm-uid';

/** Records that the VM in `runDir` runs as `uid` (a process started ahead, in another directory). */
export function recordVmUid(runDir: string, uid: number): void {
  const file = path.join(runDir, VM_UID_FILE);
  fs.writeFileSync(`${file}.tmp`, String(uid), { mode: 0o600 });
  fs.renameSync(`${file}.tmp`, file);
}

function recordedVmUid(runDir: string): number | undefined {
  try {
    const file = path.join(runDir, VM_UID_FILE);
    const st = fs.lstatSync(file);
    if (!st.isFile() || st.uid !== 0) return undefined;
    const uid = Number(fs.readFileSync(file, 'utf8').trim());
    return Number.isInteger(uid) && uid >= VM_UID_BASE && uid < VM_UID_BASE + VM_UID_COUNT ? uid : undefined;
  } catch {
    return undefined;
  }
}

/** The argv that starts `command` as `identity`: setpriv drops root before the command runs. */
export function dropPrivilegesArgv(identity: VmIdentity | undefined, command: string, args: string[]): string[] {
  if (!identity) return [command, ...args];
  return [
    'setpriv',
    `--reuid=${identity.uid}`,
    `--regid=${identity.gid}`,
    '--clear-groups',
    '--no-new-privs',
    '--inh-caps=-all',
    '--bounding-set=-all',
    '--',
    command,
    ...args,
  ];
}

/* ---- file access ---- */

type Need = 'search' | 'read' | 'write';

function allows(st: fs.Stats, identity: VmIdentity, need: Need): boolean {
  const bit = need === 'search' ? 1 : need === 'read' ? 4 : 2;
  if (st.uid === identity.uid) return (st.mode & (bit << 6)) !== 0;
  if (st.gid === identity.gid) return (st.mode & (bit << 3)) !== 0;
  return (st.mode & bit) !== 0;
}

/** Directories inside which Cocoon may add group search permission for QEMU. */
function grantRoots(): string[] {
  return [dataDir(), os.tmpdir(), ...setting('COCOON_QEMU_ACCESS_ROOTS')].map((p) =>
    path.resolve(p),
  );
}

function inside(child: string, parent: string): boolean {
  const relative = path.relative(parent, child);
  return relative === '' || (!relative.startsWith('..') && !path.isAbsolute(relative));
}

function noAccess(target: string, blocking: string, identity: VmIdentity, why: string): CocoonError {
  return new CocoonError(
    'qemu_no_access',
    `QEMU runs as an unprivileged user (uid ${identity.uid}, group ${identity.group}) and cannot reach ${target}: ${blocking} ${why}. ` +
      `Keep Cocoon's data directory and cache where every user can search the parent directories (e.g. under /var/lib), ` +
      `or give group ${identity.group} search permission there (chgrp ${identity.group} DIR; chmod g+x DIR). ` +
      `COCOON_QEMU_USER=root runs QEMU as root instead (not recommended).`,
    { status: 500 },
  );
}

/**
 * The file calls a grant makes. `asyncFs` goes through libuv's thread pool; `inlineFs` makes
 * each call right away (a few microseconds each). A restore grants while its memory is copied
 * and checked: with the pool's threads and the host's two cores busy, the grant's few dozen
 * calls one after the other waited ~20-80 ms in all that way (issue 12), against well under
 * 1 ms inline, which blocks the event loop for no longer than that.
 */
export interface GrantFs {
  stat(file: string): Promise<fs.Stats>;
  chown(file: string, uid: number, gid: number): Promise<void>;
  chmod(file: string, mode: number): Promise<void>;
  /** Up to `length` bytes of `file` at `position` (fewer at its end). */
  readAt(file: string, length: number, position: number): Promise<Buffer>;
}

export const asyncFs: GrantFs = {
  stat: (file) => fs.promises.stat(file),
  chown: (file, uid, gid) => fs.promises.chown(file, uid, gid),
  chmod: (file, mode) => fs.promises.chmod(file, mode),
  async readAt(file, length, position) {
    const handle = await fs.promises.open(file, 'r');
    try {
      const buffer = Buffer.alloc(length);
      const { bytesRead } = await handle.read(buffer, 0, length, position);
      return buffer.subarray(0, bytesRead);
    } finally {
      await handle.close();
    }
  },
};

export const inlineFs: GrantFs = {
  stat: async (file) => fs.statSync(file),
  chown: async (file, uid, gid) => fs.chownSync(file, uid, gid),
  chmod: async (file, mode) => fs.chmodSync(file, mode),
  async readAt(file, length, position) {
    const fd = fs.openSync(file, 'r');
    try {
      const buffer = Buffer.alloc(length);
      return buffer.subarray(0, fs.readSync(fd, buffer, 0, length, position));
    } finally {
      fs.closeSync(fd);
    }
  },
};

/**
 * Makes every directory above `target` searchable by QEMU: those inside the data or temp
 * directory get group `cocoon-qemu` and g+x when their group has no rights yet; any other
 * directory must already be searchable.
 */
export async function grantSearch(target: string, identity: VmIdentity, f: GrantFs = asyncFs): Promise<void> {
  const roots = grantRoots();
  const absolute = path.resolve(target);
  const parts = absolute.split(path.sep).filter(Boolean);
  let dir: string = path.sep;
  for (let i = 0; i < parts.length - 1; i++) {
    dir = path.join(dir, parts[i] as string);
    const st = await f.stat(dir);
    if (allows(st, identity, 'search')) continue;
    const grantable = roots.some((root) => inside(dir, root)) && st.uid === 0 && (st.gid === identity.gid || (st.mode & 0o070) === 0);
    if (!grantable) throw noAccess(absolute, dir, identity, 'is not searchable by it');
    await f.chown(dir, 0, identity.gid);
    await f.chmod(dir, (st.mode & 0o7777) | 0o010);
  }
}

/** Fails with `qemu_no_access` unless QEMU can read `file` (a guest kernel, an initramfs). */
export async function assertReadable(file: string, identity: VmIdentity, f: GrantFs = asyncFs): Promise<void> {
  const absolute = path.resolve(file);
  const parts = absolute.split(path.sep).filter(Boolean);
  let dir: string = path.sep;
  for (let i = 0; i < parts.length - 1; i++) {
    dir = path.join(dir, parts[i] as string);
    if (!allows(await f.stat(dir), identity, 'search')) throw noAccess(absolute, dir, identity, 'is not searchable by it');
  }
  if (!allows(await f.stat(absolute), identity, 'read')) throw noAccess(absolute, absolute, identity, 'is not readable by it');
}

/** Gives a file to the VM's QEMU alone: owner uid, group `cocoon-qemu`, 0600. */
export async function giveToVm(file: string, identity: VmIdentity, f: GrantFs = asyncFs): Promise<void> {
  await f.chown(file, identity.uid, identity.gid);
  await f.chmod(file, 0o600);
}

/**
 * A file every VM may read but none may change: root-owned, group `cocoon-qemu`, 0640 (snapshot
 * disks, which later VMs use as backing files). Its directories are made searchable.
 */
export async function shareReadOnly(file: string, identity: VmIdentity, f: GrantFs = asyncFs): Promise<void> {
  await f.chown(file, 0, identity.gid);
  await f.chmod(file, 0o640);
  await grantSearch(file, identity, f);
}

/** Takes a file back from QEMU: root's alone (snapshot memory, device state). */
export async function keepFromVm(file: string): Promise<void> {
  await fs.promises.chown(file, 0, 0);
  await fs.promises.chmod(file, 0o600);
}

/**
 * Before a VM's process starts: the run directory is root's (0710, the VM group may enter),
 * `processDir` in it is the process's own (its sockets, pid file), and so are the RAM file and
 * the disk it writes; the disk's backing files must be readable by it. `openedFiles` (a guest
 * kernel and initramfs) reach the process as open descriptors: only their own permissions
 * matter, not their directories'.
 */
export async function grantVmAccess(
  identity: VmIdentity,
  paths: { runDir: string; processDir: string; ramPath: string; disk: { path: string; readOnly?: boolean }; openedFiles: string[] },
  f: GrantFs = asyncFs,
): Promise<void> {
  await f.chown(paths.runDir, 0, identity.gid);
  await f.chmod(paths.runDir, 0o710);
  await grantSearch(paths.runDir, identity, f);
  await f.chown(paths.processDir, identity.uid, identity.gid);
  await f.chmod(paths.processDir, 0o700);
  await giveToVm(paths.ramPath, identity, f);
  // A missing disk is the VMM's to report (vm_start_failed, in its own words).
  if (!fs.existsSync(paths.disk.path)) return;
  if (paths.disk.readOnly) await shareReadOnly(paths.disk.path, identity, f);
  else {
    await giveToVm(paths.disk.path, identity, f);
    await grantSearch(paths.disk.path, identity, f);
  }
  for (const backing of await backingChain(paths.disk.path, 16, f)) {
    const st = await f.stat(backing);
    // Snapshot disks are sealed 0640 root:cocoon-qemu; older ones (or a caller's base) are made so.
    if (st.uid !== 0 || st.gid !== identity.gid || (st.mode & 0o040) === 0 || (st.mode & 0o022) !== 0) {
      if (st.uid === 0) await shareReadOnly(backing, identity, f);
    }
    await grantSearch(backing, identity, f);
    await assertReadable(backing, identity, f);
  }
  for (const file of paths.openedFiles) {
    if ((fs.statSync(file).mode & 0o004) === 0) {
      throw new CocoonError('qemu_no_access', `the VM's process runs as an unprivileged user and cannot read ${file}: make it readable by all (chmod a+r)`);
    }
  }
}

/**
 * The backing files below a qcow2 image, nearest first (read from the qcow2 headers: the
 * backing file name lives at the offset the header gives). Raw files have none.
 */
export async function backingChain(file: string, maxDepth = 16, f: GrantFs = asyncFs): Promise<string[]> {
  const chain: string[] = [];
  let current = path.resolve(file);
  for (let depth = 0; depth < maxDepth; depth++) {
    const header = await f.readAt(current, 24, 0);
    if (header.length < 24 || header.readUInt32BE(0) !== 0x514649fb) break; // not qcow2
    const offset = header.readBigUInt64BE(8);
    const size = header.readUInt32BE(16);
    if (offset === 0n || size === 0 || size > 4096) break;
    const name = await f.readAt(current, size, Number(offset));
    const next = path.resolve(path.dirname(current), name.toString('utf8'));
    chain.push(next);
    current = next;
  }
  return chain;
}
