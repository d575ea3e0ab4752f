/** Helpers for the builder tests (no tests here). */
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';

const run = promisify(execFile);

/** A file's content inside an ext4 image, read with debugfs (no mount needed). */
export async function debugfsCat(disk: string, path: string): Promise<string> {
  const { stdout } = await run('debugfs', ['-R', `cat ${path}`, disk], { maxBuffer: 16 * 1024 * 1024 });
  return stdout;
}

/** `ls -l` of a directory inside an ext4 image. */
export async function debugfsLs(disk: string, path: string): Promise<string> {
  const { stdout } = await run('debugfs', ['-R', `ls -l ${path}`, disk]);
  return stdout;
}

/** Whether a path exists inside an ext4 image (debugfs stat). */
export async function debugfsExists(disk: string, path: string): Promise<boolean> {
  const { stdout, stderr } = await run('debugfs', ['-R', `stat ${path}`, disk]);
  return /Inode:/.test(stdout) && !/File not found/.test(stderr);
}

/** The filesystem type blkid sees. */
export async function fsType(disk: string): Promise<string> {
  const { stdout } = await run('blkid', ['-p', '-o', 'value', '-s', 'TYPE', disk]);
  return stdout.trim();
}

/** e2fsck in read-only mode: throws when the filesystem has errors. */
export async function fsck(disk: string): Promise<void> {
  await run('e2fsck', ['-f', '-n', disk]);
}

export interface StorageSnapshot {
  containers: string[];
  images: string[];
  /** CNI address leases and NAT/FORWARD rules (RUN steps' bridge network). */
  network: string[];
}

export async function storageSnapshot(): Promise<StorageSnapshot> {
  const [c, i, nat, filter, leases] = await Promise.all([
    run('buildah', ['containers', '-a', '--json']),
    run('buildah', ['images', '-a', '--json']),
    run('iptables', ['-t', 'nat', '-S']).catch(() => ({ stdout: '' })),
    run('iptables', ['-t', 'filter', '-S']).catch(() => ({ stdout: '' })),
    run('find', ['/var/lib/cni/networks', '-type', 'f', '!', '-name', 'lock', '!', '-name', 'last_reserved_ip*']).catch(() => ({ stdout: '' })),
  ]);
  return {
    containers: ((JSON.parse(c.stdout || '[]') ?? []) as Array<{ id: string }>).map((x) => x.id),
    images: ((JSON.parse(i.stdout || '[]') ?? []) as Array<{ id: string }>).map((x) => x.id),
    network: [
      ...nat.stdout.split('\n').filter((l) => l.includes('CNI-')),
      ...filter.stdout.split('\n').filter((l) => l.startsWith('-A CNI-FORWARD') && l.includes('/32')),
      ...leases.stdout.split('\n').filter(Boolean),
    ],
  };
}

/** What appeared since `before`. */
export async function storageLeftovers(before: StorageSnapshot): Promise<StorageSnapshot> {
  const now = await storageSnapshot();
  return {
    containers: now.containers.filter((id) => !before.containers.includes(id)),
    images: now.images.filter((id) => !before.images.includes(id)),
    network: now.network.filter((l) => !before.network.includes(l)),
  };
}

/** Removes what appeared since `before` (cleanup after a failed test). */
export async function removeLeftovers(before: StorageSnapshot): Promise<void> {
  const left = await storageLeftovers(before);
  for (const id of left.containers) await run('buildah', ['rm', id]).catch(() => {});
  for (const id of left.images) await run('buildah', ['rmi', '-f', id]).catch(() => {});
}

/** Host processes whose command line contains `needle`. */
export async function processesMatching(needle: string): Promise<string[]> {
  const { stdout } = await run('ps', ['-eo', 'pid=,args=']);
  return stdout.split('\n').filter((l) => l.includes(needle) && !l.includes('ps -eo'));
}

/** runc containers (as buildah's RUN steps create them). */
export async function runcContainers(): Promise<Array<{ id: string; bundle: string; pid: number }>> {
  const { stdout } = await run('runc', ['--root', '/run/runc', 'list', '--format', 'json']);
  return (JSON.parse(stdout.trim() || '[]') ?? []) as Array<{ id: string; bundle: string; pid: number }>;
}
