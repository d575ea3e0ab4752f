/**
 * Shared scaffolding for the image tests: a real server (startServer, ephemeral port, temp data
 * directory), bundle makers (tar.gz and zip from a map of files), an API client, and checks
 * that nothing of a build remains (QEMU, buildah processes and containers, runc containers,
 * scratch directories).
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import type { CocoonConfig } from '../../src/config/config.ts';
import { imagesModule, type ImagesModule } from '../../src/wiring/images.ts';
import type { ImageServiceOptions } from '../../src/images/image-service.ts';
import { unmountUnder } from '../../src/builder/buildah.ts';
import { cleanupAbandonedBuild, processesUnder } from '../../src/images/cleanup.ts';
import { isId } from '../../src/store/ids.ts';
import { startServer, type RunningServer } from '../../src/server.ts';
import { cleanupDir, tempDir } from '../support/vm.ts';
import { type Tree as BundleFiles, writeTree } from '../support/tree.ts';

const run = promisify(execFile);

export interface TestServer {
  server: RunningServer;
  module: ImagesModule;
  dataDir: string;
  url: string;
  adminKey: string;
  close(): Promise<void>;
}

export function testConfig(dataDir: string): CocoonConfig {
  return {
    dataDir,
    host: '127.0.0.1',
    apiPort: 0,
    gatewayPort: 0,
    gatewayDomain: 'vm.localhost',
    region: 'local-1',
    accel: 'tcg',
  };
}

/** A server on an ephemeral port with the images module; `dataDir` is reused when given. */
export async function startTestServer(options: Partial<ImageServiceOptions> = {}, dataDir = tempDir('cocoon-img-')): Promise<TestServer> {
  const module = imagesModule(options);
  const server = await startServer(testConfig(dataDir), [module]);
  const adminKey = fs.readFileSync(path.join(dataDir, 'admin-api-key'), 'utf8').trim();
  let closed = false;
  return {
    server,
    module,
    dataDir,
    url: server.apiUrl,
    adminKey,
    async close() {
      if (closed) return;
      closed = true;
      await server.close();
    },
  };
}

export interface ApiAnswer<T = any> {
  status: number;
  body: T;
  text: string;
  headers: Headers;
}

/** A small client for one API key. */
export function client(url: string, key: string) {
  const call = async <T = any>(method: string, route: string, body?: unknown, headers: Record<string, string> = {}): Promise<ApiAnswer<T>> => {
    const init: RequestInit & { duplex?: string } = { method, headers: { authorization: `Bearer ${key}`, ...headers } };
    if (body instanceof Buffer || body instanceof Uint8Array) {
      init.body = body;
    } else if (body !== undefined) {
      init.body = JSON.stringify(body);
      (init.headers as Record<string, string>)['content-type'] = 'application/json';
    }
    const response = await fetch(`${url}/api/v1${route}`, init);
    const text = await response.text();
    let parsed: unknown = text;
    if ((response.headers.get('content-type') ?? '').includes('json') && text) parsed = JSON.parse(text);
    return { status: response.status, body: parsed as T, text, headers: response.headers };
  };
  return {
    call,
    get: <T = any>(route: string) => call<T>('GET', route),
    post: <T = any>(route: string, body?: unknown, headers?: Record<string, string>) => call<T>('POST', route, body, headers),
    delete: <T = any>(route: string) => call<T>('DELETE', route),
    async uploadBundle(data: Buffer, type = 'application/gzip'): Promise<ApiAnswer> {
      return call('POST', '/bundles', data, { 'content-type': type });
    },
    /** Polls an image until its state is one of `states` (generous: TCG and a shared machine). */
    async waitForState(id: string, states: string[], timeoutMs = 600_000): Promise<any> {
      const deadline = Date.now() + timeoutMs;
      for (;;) {
        const answer = await call('GET', `/images/${id}`);
        assert.equal(answer.status, 200, answer.text);
        if (states.includes(answer.body.state)) return answer.body;
        if (Date.now() > deadline) assert.fail(`image ${id} still ${answer.body.state} after ${timeoutMs} ms`);
        await new Promise((r) => setTimeout(r, 200));
      }
    },
  };
}
export type Client = ReturnType<typeof client>;

export type { BundleFiles };

/** A .tar.gz or .zip of `files` (made with tar and zip, as a user would). */
export async function makeBundle(files: BundleFiles, format: 'tar.gz' | 'zip' = 'tar.gz'): Promise<Buffer> {
  const dir = tempDir('cocoon-bundle-');
  try {
    const root = path.join(dir, 'root');
    fs.mkdirSync(root);
    writeTree(root, files);
    const out = path.join(dir, `bundle.${format}`);
    if (format === 'tar.gz') await run('tar', ['-czf', out, '-C', root, '.']);
    else await run('zip', ['-q', '-r', '-y', out, '.'], { cwd: root });
    return fs.readFileSync(out);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

/** A tar.gz with entries whose names tar itself would refuse to make (traversal, absolute). */
export async function makeRawTarGz(entries: Array<{ name: string; content?: string; symlink?: string }>): Promise<Buffer> {
  const script = `
import io, sys, tarfile, json
entries = json.loads(sys.argv[1])
buf = io.BytesIO()
with tarfile.open(fileobj=buf, mode='w:gz') as tar:
    for e in entries:
        info = tarfile.TarInfo(e['name'])
        if e.get('symlink') is not None:
            info.type = tarfile.SYMTYPE
            info.linkname = e['symlink']
            tar.addfile(info)
        else:
            data = e.get('content', '').encode()
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
sys.stdout.buffer.write(buf.getvalue())
`;
  const { stdout } = await run('python3', ['-c', script, JSON.stringify(entries)], { encoding: 'buffer', maxBuffer: 64 * 1024 * 1024 });
  return stdout as unknown as Buffer;
}

/** The busybox sample: a shell web app (busybox httpd with a CGI script), EXPOSE 8080. */
export const BUSYBOX_APP: BundleFiles = {
  Dockerfile: [
    'FROM busybox',
    'ENV GREETING="hello from cocoon"',
    'COPY www/ /www/',
    'COPY start.sh /start.sh',
    'EXPOSE 8080',
    'CMD ["/bin/sh", "/start.sh"]',
    '',
  ].join('\n'),
  'start.sh': { content: '#!/bin/sh\necho "app: starting httpd on 8080"\nexec httpd -f -v -p 8080 -h /www\n', mode: 0o755 },
  'www/index.html': 'busybox app\n',
  'www/cgi-bin/hello': {
    content: '#!/bin/sh\nprintf "Content-Type: text/plain\\r\\n\\r\\n"\necho "$GREETING"\n',
    mode: 0o755,
  },
};

/** buildah working containers whose name mentions `needle`. */
export async function buildahContainers(needle: string): Promise<string[]> {
  const { stdout } = await run('buildah', ['containers', '-a', '--format', '{{.ContainerName}} {{.ImageName}}']);
  return stdout.split('\n').filter((l) => l.includes(needle));
}

export async function buildahImages(needle: string): Promise<string[]> {
  const { stdout } = await run('buildah', ['images', '-a', '--format', '{{.Name}}:{{.Tag}}']);
  return stdout.split('\n').filter((l) => l.includes(needle));
}

export async function runcContainersUnder(dir: string): Promise<string[]> {
  const { stdout } = await run('runc', ['--root', '/run/runc', 'list', '--format', 'json']);
  const list = (JSON.parse(stdout.trim() || '[]') ?? []) as Array<{ id: string; bundle: string }>;
  return list.filter((c) => c.bundle.startsWith(dir)).map((c) => c.id);
}

/** Asserts that nothing of image `id`'s build is left: processes, containers, scratch. */
export async function assertNoLeftovers(dataDir: string, id: string): Promise<void> {
  const imageDir = path.join(dataDir, 'images', id);
  assert.deepEqual(processesUnder(imageDir), [], 'no process of the build remains (QEMU, buildah, mkfs)');
  assert.deepEqual(await buildahContainers(id), [], 'no buildah container of the build remains');
  assert.deepEqual(await buildahImages(id), [], 'no built image remains in buildah storage');
  assert.deepEqual(await runcContainersUnder(imageDir), [], 'no runc container of the build remains');
  assert.equal(fs.existsSync(path.join(imageDir, 'build')), false, 'the scratch directory is gone');
  assert.equal(fs.existsSync(path.join(imageDir, 'snapshot.partial')), false, 'no partial snapshot');
}

/**
 * Removes a data directory after a test, also one that failed half-way: every image's build
 * leftovers (processes, buildah containers and images, runc containers, mounts) first.
 */
export async function removeDataDir(dir: string): Promise<void> {
  const images = path.join(dir, 'images');
  for (const id of fs.existsSync(images) ? fs.readdirSync(images) : []) {
    if (isId(id, 'image')) await cleanupAbandonedBuild(dir, id, 2000).catch(() => undefined);
  }
  for (const p of processesUnder(dir)) {
    try {
      process.kill(p.pid, 'SIGKILL');
    } catch {
      // gone
    }
  }
  await unmountUnder(dir);
  cleanupDir(dir);
}
