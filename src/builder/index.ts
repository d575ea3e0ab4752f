/** The builder role: build context → root disk. See root-disk.ts for the entry point. */
export { buildRootDisk, baseImagesNeeded, type BuildRootDiskOptions, type RootDiskConfig, type RootDiskResult } from './root-disk.ts';
export { ensureBaseImages, BUSYBOX_IMAGE, DEBIAN_IMAGE, type SeedOptions, type SeedResult } from './base-images.ts';
export { buildImage, inspectImage, mountImage, removeImage, type BuildOptions, type BuildResult, type ImageConfig } from './buildah.ts';
export { makeExt4Disk, prepareRootfs, requiredDiskMiB, WORKLOAD_PATH } from './rootfs.ts';
export { parseWorkload, renderWorkload, resolveUser, firstTcpPort, type WorkloadConfig } from './workload.ts';
export { checkBuilderHost, type HostCheck } from './setup.ts';
