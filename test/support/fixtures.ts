/**
 * The "one server, one image per test file" setups the VM test files share, so that each file
 * states only what it tests:
 *
 * - `useTestImageServer`: a server with the microVM module and one READY test image made without
 *   the pipeline (support/image.ts), started before the file's tests and stopped after them,
 *   failing the file when a QEMU process is left behind.
 * - `startPlatform` / `stopPlatform`: the image service, the microVM subsystem and the surfaces a
 *   file asks for (E2B, AWS) on ephemeral ports, with the admin's API client: for files that
 *   build their image through the real pipeline (buildah, real QEMU).
 * - `testAppBundle`: the bundle those files build: busybox running the C test app (support/testapp.c)
 *   on the app port 8080 and on a second port (the AWS-style hooks listener).
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { after, before } from 'node:test';
import { loadConfig } from '../../src/config/config.ts';
import { ADMIN_KEY_FILE, startServer, type RunningServer, type ServerModule } from '../../src/server.ts';
import type { Image } from '../../src/store/images.ts';
import { imagesModule, type ImagesModule } from '../../src/wiring/images.ts';
import { microvmModule, type MicrovmModule, type MicrovmModuleOptions } from '../../src/wiring/microvms.ts';
import { client, type Client } from '../images/helpers.ts';
import { createTestImage, type TestImageOptions } from './image.ts';
import { startTestServer, stopTestServer, type TestServer } from './server.ts';
import { buildTestApp } from './testapp.ts';
import { writeTree } from './tree.ts';
import { cleanupDir, tempDir } from './vm.ts';

export interface TestImageServer {
  /** The server's data directory (made at once; the server starts in the file's `before`). */
  readonly dataDir: string;
  readonly server: TestServer;
  readonly image: Image;
}

/**
 * Registers, in the calling `describe`, a `before` that starts a test server and makes one READY
 * test image, and an `after` that stops it, removes its data directory and asserts that no QEMU
 * process was left. Read `server` and `image` from the tests or a later `before`.
 */
export function useTestImageServer(
  o: { prefix?: string; options?: MicrovmModuleOptions; image?: Omit<TestImageOptions, 'db' | 'dataDir' | 'tenantId'> } = {},
): TestImageServer {
  const dataDir = tempDir(o.prefix ?? 'cocoon-mvm-');
  let server: TestServer | undefined;
  let image: Image | undefined;
  before(async () => {
    server = await startTestServer({ dataDir, ...(o.options ? { options: o.options } : {}) });
    image = await createTestImage({ ...o.image, db: server.server.db, dataDir, tenantId: server.adminTenantId });
  });
  after(async () => {
    const leaked = await stopTestServer(server, dataDir);
    assert.deepEqual(leaked, [], 'a test left QEMU processes running');
  });
  return {
    dataDir,
    get server() {
      assert.ok(server, 'the test server starts in before()');
      return server;
    },
    get image() {
      assert.ok(image, 'the test image is made in before()');
      return image;
    },
  };
}

export interface Platform {
  server: RunningServer;
  images: ImagesModule;
  microvms: MicrovmModule;
  dataDir: string;
  adminKey: string;
  /** The admin tenant's API client. */
  api: Client;
}

/**
 * A server with the image service and the microVM subsystem, plus the modules `surfaces` adds
 * on them (e.g. `(images, microvms) => [awsModule(images, microvms)]`), on ephemeral ports.
 */
export async function startPlatform(o: { dataDir: string; surfaces?: (images: ImagesModule, microvms: MicrovmModule) => ServerModule[] }): Promise<Platform> {
  const images = imagesModule();
  const microvms = microvmModule();
  const server = await startServer({ ...loadConfig({ COCOON_DATA_DIR: o.dataDir }), apiPort: 0, gatewayPort: 0 }, [images, microvms, ...(o.surfaces?.(images, microvms) ?? [])]);
  const adminKey = fs.readFileSync(path.join(o.dataDir, ADMIN_KEY_FILE), 'utf8').trim();
  return { server, images, microvms, dataDir: o.dataDir, adminKey, api: client(server.apiUrl, adminKey) };
}

/** Stops the platform (if it started) and removes its data directory, killing any QEMU left under it; answers leaked pids. */
export async function stopPlatform(platform: Platform | undefined, dataDir: string): Promise<number[]> {
  try {
    await platform?.server.close();
  } finally {
    // cleanupDir kills leftovers: a failing test must not leak QEMU processes.
  }
  return cleanupDir(dataDir);
}

/**
 * A .tar.gz of a busybox image running the C test app on 8080 (the app) and on `secondPort`
 * (the hooks listener), with `env` set for both (the test app's TESTAPP_HOOK_<NAME> settings).
 * `dir` is scratch space.
 */
export function testAppBundle(dir: string, o: { secondPort: number; env?: Record<string, string> }): Buffer {
  const root = path.join(dir, 'bundle');
  fs.mkdirSync(root, { recursive: true });
  const env = Object.entries(o.env ?? {}).map(([name, value]) => `${name}=${value}`);
  writeTree(root, {
    Dockerfile: [
      'FROM busybox',
      'COPY testapp /testapp',
      ...(env.length > 0 ? [`ENV ${env.join(' ')}`] : []),
      'EXPOSE 8080',
      `CMD ["sh", "-c", "/testapp ${o.secondPort} & exec /testapp 8080"]`,
      '',
    ].join('\n'),
  });
  fs.copyFileSync(buildTestApp(path.join(dir, 'testapp-build')), path.join(root, 'testapp'));
  fs.chmodSync(path.join(root, 'testapp'), 0o755);
  const out = path.join(dir, 'bundle.tar.gz');
  execFileSync('tar', ['-czf', out, '-C', root, '.']);
  return fs.readFileSync(out);
}
