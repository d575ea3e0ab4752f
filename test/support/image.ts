/**
 * A READY image without the image pipeline: the busybox test root disk (busybox httpd on 8080,
 * the C test app on 8081, optional hooks in the workload file) booted with QemuVm.boot and
 * snapshotted where the pipeline puts a READY image's snapshot, `images/<id>/snapshot`, with
 * the image row walked to READY.
 */
import fs from 'node:fs';
import path from 'node:path';
import { loadGuestArtifacts } from '../../src/guest/artifacts.ts';
import { createImage, transitionImage, type Image, type ImageHooks } from '../../src/store/images.ts';
import type { Db } from '../../src/store/sql.ts';
import { QemuVm } from '../../src/vmm/qemu/qemu.ts';
import { makeTestRootDisk } from './rootfs.ts';
import { buildTestApp } from './testapp.ts';
import { httpGet } from './vm.ts';

export const APP_PORT = 8080;
export const TESTAPP_PORT = 8081;

export interface TestImageOptions {
  db: Db;
  dataDir: string;
  tenantId: string;
  region?: string;
  name?: string;
  memoryMiB?: number;
  /** Hooks: their commands go into the root disk's workload file, their timeouts into the image row. */
  hooks?: ImageHooks;
  /** Without the test app's background loop (benchmarks of idle microVMs). */
  idle?: boolean;
}

export async function createTestImage(options: TestImageOptions): Promise<Image> {
  const { db, dataDir } = options;
  const image = await createImage(db, {
    tenantId: options.tenantId,
    region: options.region ?? 'local-1',
    name: options.name ?? 'testapp',
    bundleUri: `cocoon://bundles/${'0'.repeat(64)}.tar.gz`,
    vcpus: 1,
    memoryMiB: options.memoryMiB ?? 256,
    diskMiB: 64,
    port: APP_PORT,
    readiness: { httpPath: '/', timeoutSeconds: 120 },
    ...(options.hooks ? { hooks: options.hooks } : {}),
  });
  await transitionImage(db, image.id, 'PENDING', 'BUILDING');
  const imageDir = path.join(dataDir, 'images', image.id);
  const buildDir = path.join(imageDir, 'build');
  fs.mkdirSync(buildDir, { recursive: true });
  const rootDisk = path.join(buildDir, 'root.raw');
  const hookCommands = Object.fromEntries(Object.entries(options.hooks ?? {}).map(([name, hook]) => [name, hook.command]));
  makeTestRootDisk(rootDisk, {
    sizeMiB: 64,
    testApp: buildTestApp(path.join(dataDir, 'testapp-build')),
    hooks: hookCommands,
    backgroundLoop: !options.idle,
  });
  await transitionImage(db, image.id, 'BUILDING', 'BOOTING');
  const vm = await QemuVm.boot({
    id: image.id,
    runDir: path.join(buildDir, 'vm'),
    vcpus: 1,
    memoryMiB: options.memoryMiB ?? 256,
    accel: process.env.COCOON_ACCEL === 'kvm' ? 'kvm' : 'tcg',
    guest: loadGuestArtifacts(),
    disk: { path: rootDisk, format: 'raw' },
    network: { forwards: [{ guestPort: APP_PORT }, { guestPort: TESTAPP_PORT }] },
  });
  const snapshotDir = path.join(imageDir, 'snapshot');
  try {
    await httpGet(`http://127.0.0.1:${vm.hostPort(APP_PORT)}/`, 120_000);
    await httpGet(`http://127.0.0.1:${vm.hostPort(TESTAPP_PORT)}/`, 120_000);
    await transitionImage(db, image.id, 'BOOTING', 'SNAPSHOTTING');
    await vm.snapshot(snapshotDir, { compact: true });
  } finally {
    await vm.destroy();
  }
  fs.rmSync(buildDir, { recursive: true, force: true });
  await transitionImage(db, image.id, 'SNAPSHOTTING', 'READY', { artifacts: { snapshot: snapshotDir } });
  return { ...image, state: 'READY' };
}
