import assert from 'node:assert/strict';
import { lstat, mkdir, mkdtemp, readFile, readlink, rm, stat, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { isCocoonError } from '../../src/common/errors.ts';
import type { ImageConfig } from '../../src/builder/buildah.ts';
import { makeExt4Disk, prepareRootfs, readFileInRoot, resolveInRoot } from '../../src/builder/rootfs.ts';
import { parseWorkload } from '../../src/builder/workload.ts';
import { debugfsCat, debugfsLs, fsType } from './_helpers.ts';

const config = (over: Partial<ImageConfig> = {}): ImageConfig => ({
  entrypoint: [], cmd: ['sh'], env: [], workingDir: '', user: '', exposedPorts: [], stopSignal: undefined, labels: {}, ...over,
});

let dir: string;
before(async () => { dir = await mkdtemp(join(tmpdir(), 'cocoon-rootfs-test-')); });
after(async () => { await rm(dir, { recursive: true, force: true }); });

async function tree(name: string): Promise<string> {
  const root = join(dir, name);
  await mkdir(join(root, 'etc'), { recursive: true });
  await writeFile(join(root, 'etc/passwd'), 'root:x:0:0:root:/root:/bin/sh\nweb:x:33:33:web:/var/www:/bin/false\n');
  await writeFile(join(root, 'etc/group'), 'root:x:0:\nweb:x:33:\n');
  return root;
}

describe('paths inside the image stay inside it', () => {
  test('absolute and relative symlinks resolve within the root', async () => {
    const root = await tree('resolve');
    await mkdir(join(root, 'usr/lib'), { recursive: true });
    await symlink('/usr/lib', join(root, 'lib'));
    await symlink('../../../../../../etc', join(root, 'usr/escape'));
    assert.equal(await resolveInRoot(root, '/lib/x'), join(root, 'usr/lib/x'));
    assert.equal(await resolveInRoot(root, '/usr/escape/passwd'), join(root, 'etc/passwd'));
    assert.equal(await resolveInRoot(root, '/../../etc/passwd'), join(root, 'etc/passwd'));
    assert.equal(await resolveInRoot(root, '/missing/../../x'), join(root, 'x'));
  });

  test('an image whose /etc/passwd points at the host file reads its own', async () => {
    const root = join(dir, 'hostile-passwd');
    await mkdir(join(root, 'etc'), { recursive: true });
    await mkdir(join(root, 'real'), { recursive: true });
    await writeFile(join(root, 'real/passwd'), 'root:x:0:0::/:/bin/sh\nimg:x:7:7::/:/bin/sh\n');
    await symlink('/real/passwd', join(root, 'etc/passwd'));
    assert.match((await readFileInRoot(root, '/etc/passwd'))!, /^img:/m);
    await symlink('/etc/shadow', join(root, 'etc/group'));
    assert.equal(await readFileInRoot(root, '/etc/group'), undefined); // /etc/shadow of the image: missing
  });

  test('a symlink loop is an error, not a hang', async () => {
    const root = join(dir, 'loop');
    await mkdir(root);
    await symlink('/b', join(root, 'a'));
    await symlink('/a', join(root, 'b'));
    await assert.rejects(resolveInRoot(root, '/a/x'), (e) => isCocoonError(e, 'invalid_image'));
  });
});

describe('prepareRootfs', () => {
  test('writes the workload file, never through the image\'s symlinks', async () => {
    const root = await tree('prepare');
    const outside = join(dir, 'outside');
    await mkdir(outside);
    await symlink(outside, join(root, '.cocoon')); // /.cocoon → a host directory
    await symlink('/', join(root, 'dev')); // would make the guest mount over the initramfs
    await writeFile(join(root, 'proc'), 'not a dir');
    await symlink('/var/tmp', join(root, 'tmp'));
    await writeFile(join(root, 'etc/hosts'), '');
    const prepared = await prepareRootfs(root, config({ cmd: ['/bin/sh', '-c', 'httpd -f'], user: 'web', workingDir: '/var/www/app', env: ['A=b c'], exposedPorts: ['8080/tcp'] }));
    assert.deepEqual(await (await import('node:fs/promises')).readdir(outside), []);
    assert.ok((await lstat(join(root, '.cocoon'))).isDirectory());
    const w = parseWorkload(await readFile(join(root, '.cocoon/workload'), 'utf8'));
    assert.deepEqual(w.argv, ['/bin/sh', '-c', 'httpd -f']);
    assert.equal(w.uid, 33);
    assert.equal(w.gid, 33);
    assert.equal(w.cwd, '/var/www/app');
    assert.ok(w.env.includes('A=b c'));
    assert.ok(w.env.includes('HOME=/var/www'));
    assert.deepEqual(w, prepared.workload);
    assert.equal(prepared.exposedTcpPort, 8080);
    for (const d of ['dev', 'proc', 'sys', 'run']) assert.ok((await lstat(join(root, d))).isDirectory(), d);
    assert.equal(await readlink(join(root, 'tmp')), '/var/tmp'); // resolved by the guest, left alone
    const cwd = await stat(join(root, 'var/www/app'));
    assert.equal(cwd.uid, 33);
    assert.match(await readFile(join(root, 'etc/hosts'), 'utf8'), /localhost/);
    assert.match(await readFile(join(root, 'etc/resolv.conf'), 'utf8'), /nameserver 10\.0\.2\.3/);
  });

  test('an unknown USER and a missing command are clear errors', async () => {
    const root = await tree('errors');
    await assert.rejects(prepareRootfs(root, config({ user: 'nobody-here' })), (e) => isCocoonError(e, 'unknown_user') && /nobody-here/.test(e.message));
    await assert.rejects(prepareRootfs(root, config({ cmd: [] })), (e) => isCocoonError(e, 'no_command'));
  });
});

describe('makeExt4Disk', () => {
  test('a sparse ext4 image with the tree, owners and modes kept', async () => {
    const root = await tree('disk');
    await mkdir(join(root, 'data'));
    await writeFile(join(root, 'data/file'), 'x'.repeat(100_000));
    await symlink('/data/file', join(root, 'link'));
    await prepareRootfs(root, config({ cmd: ['true'], user: 'web' }));
    const diskPath = join(dir, 'disk.ext4');
    const r = await makeExt4Disk({ sourceDir: root, diskPath, sizeMiB: 64 });
    const st = await stat(diskPath);
    assert.equal(st.size, 64 * 1024 * 1024);
    assert.ok(st.blocks * 512 < 8 * 1024 * 1024, `sparse: ${st.blocks * 512} bytes allocated`);
    assert.ok(r.contentBytes >= 100_000);
    assert.equal(await fsType(diskPath), 'ext4');
    assert.match(await debugfsCat(diskPath, '/.cocoon/workload'), /^uid 33$/m);
    const ls = await debugfsLs(diskPath, '/');
    assert.match(ls, /\s41777\s.*\stmp\s*$/m);
    assert.match(ls, /\s120777\s.*\slink\s*$/m);
  });

  test('content that does not fit is a clear error, and no disk is left', async () => {
    const root = join(dir, 'big');
    await mkdir(root);
    await writeFile(join(root, 'blob'), Buffer.alloc(40 * 1024 * 1024, 1));
    const diskPath = join(dir, 'small.ext4');
    await assert.rejects(makeExt4Disk({ sourceDir: root, diskPath, sizeMiB: 32 }),
      (e) => isCocoonError(e, 'disk_too_small') && /at least \d+/.test(e.message));
    await assert.rejects(stat(diskPath));
    await assert.rejects(makeExt4Disk({ sourceDir: root, diskPath, sizeMiB: 8 }), (e) => isCocoonError(e, 'invalid_disk_size'));
  });
});
