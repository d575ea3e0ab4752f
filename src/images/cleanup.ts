/**
 * Undoing what a build left behind when its process could not clean up (the daemon was killed
 * mid-build). Everything a build starts is recognisable by its image's directory:
 *
 * - processes (buildah, mkfs.ext4, the build VM…) have it on their command line; the VM driver
 *   sweeps its own first. buildah gets SIGTERM first, so that it removes its own working
 *   containers (it does, within seconds), then its process group is killed;
 * - runc containers of RUN steps have their bundle under `build/tmp/`;
 * - the built image and the export container have names made from the image id;
 * - mounts under the directory are undone before anything is removed.
 */
import fs from 'node:fs';
import path from 'node:path';
import { errorMessage } from '../common/errors.ts';
import { log } from '../common/log.ts';
import { defaultVmDriver } from '../vmm/drivers.ts';
import { imageExists, releaseCniNetwork, removeContainer, removeImage, unmountUnder } from '../builder/buildah.ts';
import { exec } from '../builder/exec.ts';
import { buildTag, exportContainerName, imageBuildPaths } from './paths.ts';
import { setting } from '../common/settings.ts';

const RUNC = setting('COCOON_RUNC');
const RUNC_ROOT = '/run/runc';

export interface LeftoverReport {
  killed: Array<{ pid: number; command: string }>;
  runcContainers: string[];
  removedImage: boolean;
  removedContainer: boolean;
}

/** Processes whose command line mentions `dir` (followed by '/' or the end of an argument). */
export function processesUnder(dir: string): Array<{ pid: number; command: string }> {
  const found: Array<{ pid: number; command: string }> = [];
  for (const entry of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(entry) || Number(entry) === process.pid) continue;
    let args: string[];
    try {
      args = fs.readFileSync(`/proc/${entry}/cmdline`, 'utf8').split('\0');
    } catch {
      continue; // exited meanwhile
    }
    if (args.some((a) => a === dir || a.includes(`${dir}/`) || a.includes(`${dir},`))) {
      found.push({ pid: Number(entry), command: args.filter(Boolean).join(' ').slice(0, 200) });
    }
  }
  return found;
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    // A zombie (exited, not yet reaped by its parent) counts as gone.
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
  } catch {
    return false;
  }
}

async function waitGone(pids: number[], ms: number): Promise<void> {
  const deadline = Date.now() + ms;
  while (pids.some(alive) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
}

function signal(pid: number, sig: NodeJS.Signals, group: boolean): void {
  try {
    process.kill(group ? -pid : pid, sig);
  } catch {
    try {
      process.kill(pid, sig);
    } catch {
      // gone
    }
  }
}

/**
 * Stops every process of an abandoned build of `imageId`: buildah politely (SIGTERM, up to
 * `graceMs`, so that it removes its containers), everything else at once.
 */
export async function killBuildProcesses(dataDir: string, imageId: string, graceMs = 20_000): Promise<Array<{ pid: number; command: string }>> {
  const paths = imageBuildPaths(dataDir, imageId);
  const killed: Array<{ pid: number; command: string }> = [];
  // The build VM first, by its driver (it knows its own processes: their command line names the run directory).
  const driver = defaultVmDriver();
  for (const pid of await driver.sweep(paths.vm)) killed.push({ pid, command: `${driver.name} (the build VM)` });
  for (let round = 0; round < 3; round++) {
    const found = processesUnder(paths.root);
    if (found.length === 0) break;
    const builders = found.filter((p) => /(^|\/)buildah( |$)/.test(p.command));
    const others = found.filter((p) => !builders.includes(p));
    for (const p of others) signal(p.pid, 'SIGKILL', false);
    if (builders.length) {
      for (const p of builders) signal(p.pid, 'SIGTERM', false);
      await waitGone(builders.map((p) => p.pid), graceMs);
      for (const p of builders) if (alive(p.pid)) signal(p.pid, 'SIGKILL', true);
    }
    await waitGone(found.map((p) => p.pid), 5000);
    killed.push(...found);
  }
  return killed;
}

/**
 * Removes what buildah may still hold for the build of `imageId`: runc containers of RUN steps
 * (and their bridge network), mounts, the export container, the built image.
 */
export async function sweepBuildahLeftovers(dataDir: string, imageId: string): Promise<Omit<LeftoverReport, 'killed'>> {
  const paths = imageBuildPaths(dataDir, imageId);
  const runcIds: string[] = [];
  try {
    const r = await exec(RUNC, ['--root', RUNC_ROOT, 'list', '--format', 'json'], { allowFailure: true });
    const list = r.code === 0 ? (JSON.parse(r.stdout.trim() || '[]') as Array<{ id: string; bundle: string }> | null) : [];
    for (const c of list ?? []) {
      if (!c.bundle.startsWith(paths.build + '/')) continue;
      runcIds.push(c.id);
      await exec(RUNC, ['--root', RUNC_ROOT, 'kill', c.id, 'KILL'], { allowFailure: true });
      await exec(RUNC, ['--root', RUNC_ROOT, 'delete', '--force', c.id], { allowFailure: true });
    }
  } catch (error) {
    log.warn({ err: errorMessage(error) }, 'could not list runc containers');
  }
  // RUN steps' bundle directories are named buildahNNN; their containers `buildah-buildahNNN`.
  const tmpNames: string[] = [];
  for (const dir of await fs.promises.readdir(paths.tmp).catch(() => [] as string[])) {
    for (const name of await fs.promises.readdir(path.join(paths.tmp, dir)).catch(() => [] as string[])) {
      if (name.startsWith('buildah')) tmpNames.push(`buildah-${name}`);
    }
  }
  for (const id of new Set([...runcIds, ...tmpNames])) {
    await releaseCniNetwork(id).catch((e: unknown) => log.warn({ err: errorMessage(e), container: id }, 'could not release a build network'));
  }
  await unmountUnder(paths.root);
  let removedContainer = false;
  const container = exportContainerName(imageId);
  const r = await exec(setting('COCOON_BUILDAH'), ['containers', '--format', '{{.ContainerName}}'], { allowFailure: true });
  if (r.stdout.split('\n').includes(container)) {
    await removeContainer(container);
    removedContainer = true;
  }
  let removedImage = false;
  const tag = buildTag(imageId);
  if (await imageExists(tag)) {
    await removeImage(tag);
    removedImage = true;
  }
  return { runcContainers: runcIds, removedImage, removedContainer };
}

/** Everything above, then the scratch directory and a half-written snapshot. */
export async function cleanupAbandonedBuild(dataDir: string, imageId: string, graceMs?: number): Promise<LeftoverReport> {
  const paths = imageBuildPaths(dataDir, imageId);
  const killed = await killBuildProcesses(dataDir, imageId, graceMs);
  const swept = await sweepBuildahLeftovers(dataDir, imageId);
  await unmountUnder(paths.root);
  await fs.promises.rm(paths.build, { recursive: true, force: true });
  await fs.promises.rm(paths.snapshotPartial, { recursive: true, force: true });
  return { killed, ...swept };
}
