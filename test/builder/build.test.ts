/**
 * The builder against real buildah, mkfs.ext4 and debugfs: Dockerfile → root disk.
 * Every test leaves buildah's storage as it found it, also when it fails.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdir, mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import { createServer, type AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { after, afterEach, before, beforeEach, describe, test, type TestContext } from 'node:test';
import { isCocoonError } from '../../src/common/errors.ts';
import { ensureBaseImages } from '../../src/builder/base-images.ts';
import { buildImage } from '../../src/builder/buildah.ts';
import { buildRootDisk, type RootDiskResult } from '../../src/builder/root-disk.ts';
import { checkBuilderHost } from '../../src/builder/setup.ts';
import { parseWorkload } from '../../src/builder/workload.ts';
import {
  debugfsCat, debugfsExists, debugfsLs, fsck, fsType, processesMatching, removeLeftovers, runcContainers,
  storageLeftovers, storageSnapshot, type StorageSnapshot,
} from './_helpers.ts';

const run = promisify(execFile);
const PATH_DEFAULT = 'PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin';

let dir: string;
let snapshot: StorageSnapshot;

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'cocoon-build-test-'));
  const host = await checkBuilderHost();
  assert.deepEqual(host.problems, [], 'this host has what builds need');
  // Seeded once per machine (a fresh one debootstraps Debian: ~30 s); quick afterwards.
  const seeded = await ensureBaseImages();
  for (const s of seeded) console.log(`# base image ${s.name}: ${s.seeded ? 'seeded' : 'present'} in ${Math.round(s.ms)} ms`);
});
after(async () => {
  await rm(dir, { recursive: true, force: true });
});
beforeEach(async () => {
  snapshot = await storageSnapshot();
});
afterEach(async () => {
  await removeLeftovers(snapshot); // a failed test must not leave containers or images either
});

/** Writes a build context from a map of file names to contents. */
async function context(name: string, files: Record<string, string>): Promise<{ contextDir: string; workDir: string }> {
  const contextDir = join(dir, name, 'context');
  const workDir = join(dir, name, 'work');
  for (const [file, text] of Object.entries(files)) {
    await mkdir(join(contextDir, file, '..'), { recursive: true });
    await writeFile(join(contextDir, file), text);
  }
  return { contextDir, workDir };
}

async function assertNothingLeft(t: TestContext, marker?: string): Promise<void> {
  const left = await storageLeftovers(snapshot);
  assert.deepEqual(left, { containers: [], images: [], network: [] }, 'no working container, image, or build network remains');
  if (marker) assert.deepEqual(await processesMatching(marker), [], `no process "${marker}" remains`);
  const runc = (await runcContainers()).filter((c) => c.bundle.includes('cocoon-build-'));
  assert.deepEqual(runc, [], 'no runc container of a build remains');
  t.diagnostic('storage, networks, processes and runc containers as before');
}

function report(t: TestContext, name: string, r: RootDiskResult): void {
  const line = `${name}: seed ${r.timingsMs.seed} ms, build ${r.timingsMs.build} ms, export ${r.timingsMs.export} ms, ` +
    `disk ${r.timingsMs.disk} ms, total ${r.timingsMs.total} ms; content ${Math.ceil(r.contentBytes / 1048576)} MiB`;
  t.diagnostic(line);
  console.log(`# ${line}`);
}

describe('buildRootDisk', () => {
  test('a busybox web app: ext4 disk with the app and its workload file', async (t) => {
    const ctx = await context('busybox-httpd', {
      'Dockerfile': `FROM busybox
COPY site/ /www/
COPY start.sh /start.sh
RUN chmod +x /start.sh && echo "built at step 3"
EXPOSE 8080
ENTRYPOINT ["/start.sh"]
CMD ["-p", "8080"]
`,
      'start.sh': '#!/bin/sh\nexec httpd -f -v -h /www "$@"\n',
      'site/index.html': '<h1>hello from cocoon</h1>\n',
    });
    const lines: string[] = [];
    const r = await buildRootDisk({ ...ctx, diskMiB: 128, onLog: (l) => lines.push(l) });
    report(t, 'busybox httpd', r);

    assert.ok(lines.some((l) => l.includes('STEP 1/7: FROM busybox')), 'the log streams build steps');
    assert.ok(lines.includes('built at step 3'), 'the log streams RUN output');
    assert.deepEqual(r.log.filter((l) => !l.startsWith('[cocoon]')), lines.filter((l) => !l.startsWith('[cocoon]')));
    assert.equal(r.port, 8080);
    assert.deepEqual(r.config.argv, ['/start.sh', '-p', '8080']);
    assert.deepEqual(r.config.exposedPorts, ['8080/tcp']);

    assert.equal(r.diskPath, join(ctx.workDir, 'rootfs.ext4'));
    assert.equal(await fsType(r.diskPath), 'ext4');
    await fsck(r.diskPath);
    const w = parseWorkload(await debugfsCat(r.diskPath, '/.cocoon/workload'));
    assert.deepEqual(w.argv, ['/start.sh', '-p', '8080']);
    assert.deepEqual(w.env, [PATH_DEFAULT, 'HOME=/root']);
    assert.equal(w.cwd, '/');
    assert.equal(w.uid, 0);
    assert.equal(w.gid, 0);
    assert.deepEqual(w.groups, [10]); // root is in wheel, as in Docker's busybox
    assert.equal(await debugfsCat(r.diskPath, '/www/index.html'), '<h1>hello from cocoon</h1>\n');
    assert.match(await debugfsLs(r.diskPath, '/'), /\s100755\s.*\sstart\.sh\s*$/m);
    for (const d of ['dev', 'proc', 'sys', 'tmp', 'run']) assert.ok(await debugfsExists(r.diskPath, `/${d}`), d);
    await assertNothingLeft(t);
  });

  test('multi-stage with ARG, ENV, WORKDIR, ADD and USER by name', async (t) => {
    const ctx = await context('multi-stage', {
      'Dockerfile': `ARG VERSION=1.0
FROM busybox AS build
ARG VERSION
ARG EXTRA=none
RUN mkdir -p /out && echo "version=$VERSION extra=$EXTRA" > /out/version.txt

FROM busybox
ARG VERSION
ENV APP_VERSION=$VERSION APP_HOME=/opt/app
RUN echo 'svc:x:1234:2345:Service:/opt/app:/bin/sh' >> /etc/passwd \\
 && echo 'svc:x:2345:' >> /etc/group \\
 && echo 'extra:x:3456:root,svc' >> /etc/group
WORKDIR $APP_HOME
COPY --from=build /out/version.txt ./
ADD data.tar ./data/
RUN chown -R svc:svc /opt/app
USER svc
EXPOSE 9090/tcp 53/udp
CMD echo "$APP_VERSION" && exec httpd -f -p 9090
`,
    });
    const staging = join(dir, 'multi-stage', 'staging');
    await mkdir(staging, { recursive: true });
    await writeFile(join(staging, 'hello.txt'), 'from a tarball\n');
    await run('tar', ['-C', staging, '-cf', join(ctx.contextDir, 'data.tar'), 'hello.txt']);

    const r = await buildRootDisk({ ...ctx, diskMiB: 64, buildArgs: { VERSION: '2.5', EXTRA: 'yes' } });
    report(t, 'multi-stage', r);
    assert.equal(r.port, 9090);
    const w = parseWorkload(await debugfsCat(r.diskPath, '/.cocoon/workload'));
    assert.deepEqual(w.argv, ['/bin/sh', '-c', 'echo "$APP_VERSION" && exec httpd -f -p 9090']);
    assert.deepEqual(w.env, [PATH_DEFAULT, 'APP_VERSION=2.5', 'APP_HOME=/opt/app', 'HOME=/opt/app']);
    assert.equal(w.cwd, '/opt/app');
    assert.equal(w.uid, 1234);
    assert.equal(w.gid, 2345);
    assert.deepEqual(w.groups, [3456]);
    assert.deepEqual(w, pick(r.config), "the result describes what the disk holds");
    assert.equal(await debugfsCat(r.diskPath, '/opt/app/version.txt'), 'version=2.5 extra=yes\n');
    assert.equal(await debugfsCat(r.diskPath, '/opt/app/data/hello.txt'), 'from a tarball\n');
    assert.match(await debugfsLs(r.diskPath, '/opt/app'), /\s1234\s+2345\s.*version\.txt/);
    await assertNothingLeft(t);
  });

  test('FROM debian:bookworm-slim with apt-get install', { timeout: 600_000 }, async (t) => {
    const ctx = await context('debian-apt', {
      'Dockerfile': `FROM debian:bookworm-slim
RUN apt-get update \\
 && apt-get install -y --no-install-recommends busybox \\
 && rm -rf /var/lib/apt/lists/*
RUN useradd --uid 1500 --create-home web
USER web
WORKDIR /home/web
CMD ["busybox", "httpd", "-f", "-p", "8000"]
`,
    });
    const r = await buildRootDisk({ ...ctx, diskMiB: 512, port: 3000 });
    report(t, 'debian apt-get', r);
    assert.equal(r.port, 3000, 'the requested port wins over EXPOSE');
    assert.equal(await fsType(r.diskPath), 'ext4');
    const w = parseWorkload(await debugfsCat(r.diskPath, '/.cocoon/workload'));
    assert.deepEqual(w.argv, ['busybox', 'httpd', '-f', '-p', '8000']);
    assert.deepEqual(w.env, [PATH_DEFAULT, 'HOME=/home/web']);
    assert.equal(w.uid, 1500);
    assert.equal(w.gid, 1500);
    assert.equal(w.cwd, '/home/web');
    assert.ok(await debugfsExists(r.diskPath, '/usr/bin/busybox'), 'apt-get installed busybox');
    assert.ok(await debugfsExists(r.diskPath, '/usr/bin/apt-get'));
    await assertNothingLeft(t);
  });

  test('RUN steps reach the network but not the host\'s loopback services', async (t) => {
    const server = createServer((socket) => socket.end('secret\n'));
    await new Promise<void>((res) => server.listen(0, '127.0.0.1', res));
    try {
      const port = (server.address() as AddressInfo).port;
      const ctx = await context('isolation', {
        'Dockerfile': 'FROM busybox\nARG PORT\nRUN (nc -w 2 127.0.0.1 $PORT </dev/null | grep -q secret && echo LOOPBACK-REACHED) || echo loopback-unreachable\nCMD ["sh"]\n',
      });
      const lines: string[] = [];
      await buildRootDisk({ ...ctx, diskMiB: 32, buildArgs: { PORT: String(port) }, onLog: (l) => lines.push(l) });
      assert.ok(lines.includes('loopback-unreachable'), lines.join('\n'));
    } finally {
      server.close();
    }
    await assertNothingLeft(t);
  });

  test('a failing RUN step: build_failed with its output, nothing left', async (t) => {
    const ctx = await context('failing', {
      'Dockerfile': 'FROM busybox\nRUN echo "about to fail: marker-4711" && ls /definitely-missing\nCMD ["sh"]\n',
    });
    const lines: string[] = [];
    await assert.rejects(buildRootDisk({ ...ctx, diskMiB: 64, onLog: (l) => lines.push(l) }), (e) => {
      assert.ok(isCocoonError(e, 'build_failed'), String(e));
      assert.equal(e.status, 422);
      assert.match(e.message, /marker-4711/);
      assert.match(e.message, /definitely-missing/);
      assert.match(e.message, /STEP 2\/3: RUN/);
      return true;
    });
    assert.ok(lines.some((l) => l.includes('about to fail: marker-4711')));
    assert.deepEqual(await readdir(ctx.workDir).catch(() => []), [], 'no disk');
    await assertNothingLeft(t);
  });

  test('an unknown USER and an image without a command: clear errors, nothing left', async (t) => {
    const ctx = await context('unknown-user', { 'Dockerfile': 'FROM busybox\nUSER ghost\nCMD ["sh"]\n' });
    await assert.rejects(buildRootDisk({ ...ctx, diskMiB: 64 }), (e) => isCocoonError(e, 'unknown_user') && /ghost/.test(e.message));
    const ctx2 = await context('no-command', { 'Dockerfile': 'FROM scratch\nCOPY file /file\n', 'file': 'x' });
    await assert.rejects(buildRootDisk({ ...ctx2, diskMiB: 64 }), (e) => isCocoonError(e, 'no_command'));
    await assertNothingLeft(t);
  });

  test('a base image that is not seeded and cannot be pulled: build_failed that says so', async (t) => {
    const ctx = await context('no-base', { 'Dockerfile': 'FROM quay.io/cocoon-test/does-not-exist:1\nCMD ["sh"]\n' });
    await assert.rejects(buildRootDisk({ ...ctx, diskMiB: 64 }), (e) => isCocoonError(e, 'build_failed') && /busybox, debian:bookworm-slim/.test(e.message));
    // A short name resolves on Docker Hub, as with Docker (here: unreachable).
    const ctx2 = await context('short-name', { 'Dockerfile': 'FROM cocoon-test-not-there:1\nCMD ["sh"]\n' });
    await assert.rejects(buildRootDisk({ ...ctx2, diskMiB: 64 }), (e) => isCocoonError(e, 'build_failed') && /docker\.io\/library\/cocoon-test-not-there/.test(e.message));
    await assertNothingLeft(t);
  });

  test('cancelling a build stops it and leaves nothing behind', async (t) => {
    const ctx = await context('cancel', {
      'Dockerfile': 'FROM busybox\nRUN echo started-marker-617 && sleep 617\nCMD ["sh"]\n',
    });
    const controller = new AbortController();
    let abortedAt = 0;
    const onLog = (l: string): void => {
      if (l === 'started-marker-617') {
        abortedAt = performance.now();
        controller.abort();
      }
    };
    await assert.rejects(buildRootDisk({ ...ctx, diskMiB: 64, onLog, signal: controller.signal }), (e) => isCocoonError(e, 'build_cancelled'));
    assert.ok(abortedAt > 0, 'the RUN step had started');
    t.diagnostic(`cancelled in ${Math.round(performance.now() - abortedAt)} ms`);
    console.log(`# cancel (SIGTERM, buildah cleans up): ${Math.round(performance.now() - abortedAt)} ms`);
    assert.deepEqual(await readdir(ctx.workDir).catch(() => []), []);
    await assertNothingLeft(t, 'sleep 617');
  });

  test('a build killed outright (no grace) is swept clean too; a timeout says so', async (t) => {
    const ctx = await context('kill', {
      'Dockerfile': 'FROM busybox\nRUN echo started-marker-618 && sleep 618\nCMD ["sh"]\n',
    });
    const controller = new AbortController();
    const started = performance.now();
    await assert.rejects(buildImage({
      contextDir: ctx.contextDir,
      signal: controller.signal,
      cancelGraceMs: 1, // SIGKILL right after SIGTERM: buildah gets no time to clean up
      onLog: (l) => { if (l === 'started-marker-618') controller.abort(); },
    }), (e) => isCocoonError(e, 'build_cancelled'));
    console.log(`# cancel (SIGKILL, swept): ${Math.round(performance.now() - started)} ms including the build start`);
    await assertNothingLeft(t, 'sleep 618');

    const ctx2 = await context('timeout', { 'Dockerfile': 'FROM busybox\nRUN sleep 619\n' });
    await assert.rejects(buildImage({ contextDir: ctx2.contextDir, signal: AbortSignal.timeout(1500) }), (e) => isCocoonError(e, 'build_timeout'));
    await assertNothingLeft(t, 'sleep 619');
  });
});

function pick(c: RootDiskResult['config']): object {
  return { argv: c.argv, env: c.env, cwd: c.cwd, uid: c.uid, gid: c.gid, groups: c.groups, hooks: {} };
}
