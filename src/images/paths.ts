/**
 * Where an image's files live: `$COCOON_DATA_DIR/images/<imageId>/`
 *
 *   snapshot/        the booted, ready VM (manifest.json, state, mem, disk.raw): what microVMs
 *                    restore from. Appears whole (atomic rename) and never changes after READY.
 *   snapshot.partial the snapshot being written (removed on failure and at restart)
 *   base.raw         a checkpoint image's own hard link of the raw disk its snapshot's disk
 *                    layer stands on (lifecycle/fork.ts): the parent image may be deleted
 *   build.log        every line of the build: fetch, buildah, disk, boot console, readiness
 *   build/           scratch of the build in flight (bundle context, buildah TMPDIR, root disk,
 *                    the VM's run directory); removed when the build ends, whatever happened
 */
import path from 'node:path';
import { isId } from '../store/ids.ts';

export function imagesDir(dataDir: string): string {
  return path.join(dataDir, 'images');
}

export function imageDir(dataDir: string, imageId: string): string {
  // Ids come from the store, but never let a string from elsewhere build a path.
  if (!isId(imageId, 'image')) throw new Error(`not an image id: ${JSON.stringify(imageId)}`);
  return path.join(imagesDir(dataDir), imageId);
}

/** The snapshot a microVM of this image restores from (`VmDriver.restore({ snapshotDir })`). */
export function imageSnapshotDir(dataDir: string, imageId: string): string {
  return path.join(imageDir(dataDir, imageId), 'snapshot');
}

/** The raw disk a checkpoint image's snapshot disk (a qcow2 layer) stands on. */
export function imageBaseDisk(dataDir: string, imageId: string): string {
  return path.join(imageDir(dataDir, imageId), 'base.raw');
}

export function imageBuildLogPath(dataDir: string, imageId: string): string {
  return path.join(imageDir(dataDir, imageId), 'build.log');
}

export interface ImageBuildPaths {
  /** The image's directory. */
  root: string;
  /** Scratch of one build; removed when it ends. */
  build: string;
  /** The unpacked bundle: the build context. */
  context: string;
  /** Parent of buildah's private TMPDIR (RUN steps' runc bundles land below it). */
  tmp: string;
  /** Where the root disk is written. */
  disk: string;
  /** The build VM's run directory (sockets, RAM file, serial log, pid file). */
  vm: string;
  snapshot: string;
  snapshotPartial: string;
  log: string;
}

export function imageBuildPaths(dataDir: string, imageId: string): ImageBuildPaths {
  const root = imageDir(dataDir, imageId);
  const build = path.join(root, 'build');
  return {
    root,
    build,
    context: path.join(build, 'context'),
    tmp: path.join(build, 'tmp'),
    disk: path.join(build, 'disk'),
    vm: path.join(build, 'vm'),
    snapshot: path.join(root, 'snapshot'),
    snapshotPartial: path.join(root, 'snapshot.partial'),
    log: path.join(root, 'build.log'),
  };
}

/** The name buildah gives the image built for `imageId` (temporary: removed once on the disk). */
export function buildTag(imageId: string): string {
  return `localhost/cocoon-build/${imageId}:latest`;
}

/** The throwaway working container the built image is mounted through. */
export function exportContainerName(imageId: string): string {
  return `cocoon-export-${imageId}`;
}
