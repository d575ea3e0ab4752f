/**
 * The unmodified `e2b` SDK (pinned in devDependencies) against a real Cocoon: control plane at
 * E2B_API_URL=<api>/e2b, envd through the gateway at E2B_SANDBOX_URL, a Cocoon API key as
 * E2B_API_KEY, and a template that is a Cocoon image prepared like E2B's `base` (user `user`,
 * home /home/user). One server and one image build for the whole file.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { AuthenticationError, CommandExitError, NotFoundError, Sandbox, SandboxError, SandboxNotFoundError } from 'e2b';
import { loadConfig } from '../../src/config/config.ts';
import { e2bModule } from '../../src/compat/e2b/module.ts';
import { imagesModule } from '../../src/wiring/images.ts';
import { microvmModule } from '../../src/wiring/microvms.ts';
import { startServer, type RunningServer } from '../../src/server.ts';
import { holdRam, releaseRam } from '../../src/vmm/space-ledger.ts';
import { client, makeBundle } from '../images/helpers.ts';
import { cleanupDir, tempDir } from '../support/vm.ts';

const SLOW = { timeout: 900_000 };
const TEMPLATE = 'base';

describe('the e2b SDK drives Cocoon', () => {
  const dataDir = tempDir('cocoon-e2b-');
  let server: RunningServer;
  let microvms: ReturnType<typeof microvmModule>;
  let key: string;
  let otherKey: string;
  const created: Sandbox[] = [];
  const saved = { ...process.env };

  async function create(opts: Parameters<typeof Sandbox.create>[1] = {}): Promise<Sandbox> {
    const sandbox = await Sandbox.create(TEMPLATE, opts);
    created.push(sandbox);
    return sandbox;
  }

  before(async () => {
    microvms = microvmModule();
    server = await startServer({ ...loadConfig({ COCOON_DATA_DIR: dataDir }), apiPort: 0, gatewayPort: 0 }, [imagesModule(), microvms, e2bModule(microvms)]);
    key = fs.readFileSync(path.join(dataDir, 'admin-api-key'), 'utf8').trim();
    const api = client(server.apiUrl, key);
    const tenant = await api.post('/tenants', { name: 'other' });
    assert.equal(tenant.status, 201, tenant.text);
    otherKey = tenant.body.apiKey;
    process.env.E2B_API_URL = `${server.apiUrl}/e2b`;
    process.env.E2B_SANDBOX_URL = `http://127.0.0.1:${microvms.gatewayPort}`;
    process.env.E2B_API_KEY = key;
    process.env.E2B_DOMAIN = 'vm.localhost';
    const upload = await api.uploadBundle(
      await makeBundle({
        Dockerfile: [
          'FROM debian:bookworm-slim',
          'RUN useradd -m -s /bin/bash user',
          'USER user',
          'WORKDIR /home/user',
          'CMD ["sleep", "infinity"]',
          '',
        ].join('\n'),
      }),
    );
    assert.equal(upload.status, 201, upload.text);
    const image = await api.post('/images', { name: TEMPLATE, bundle: upload.body.uri, port: null });
    assert.equal(image.status, 202, image.text);
    const ready = await api.waitForState(image.body.id, ['READY', 'FAILED'], 850_000);
    assert.equal(ready.state, 'READY', ready.error);
  }, SLOW);

  after(async () => {
    for (const sandbox of created) await sandbox.kill().catch(() => undefined);
    for (const k of ['E2B_API_URL', 'E2B_SANDBOX_URL', 'E2B_API_KEY', 'E2B_DOMAIN']) {
      if (saved[k] === undefined) delete process.env[k];
      else process.env[k] = saved[k];
    }
    await server?.close();
    assert.deepEqual(cleanupDir(dataDir), [], 'no QEMU left');
  });

  test('commands: output, exit codes (CommandExitError with stdout and stderr), envs, cwd, user, streams', SLOW, async () => {
    const sandbox = await create({ envs: { FROM_SANDBOX: 'sbx' }, metadata: { suite: 'e2b', case: 'commands' } });
    const ok = await sandbox.commands.run('echo hello; echo oops >&2; whoami; pwd; echo $FROM_SANDBOX $FROM_CMD', { envs: { FROM_CMD: 'cmd' } });
    assert.equal(ok.exitCode, 0);
    assert.equal(ok.stdout, 'hello\nuser\n/home/user\nsbx cmd\n');
    assert.equal(ok.stderr, 'oops\n');

    await assert.rejects(sandbox.commands.run('echo partial; echo bad >&2; exit 3'), (error: unknown) => {
      assert.ok(error instanceof CommandExitError, String(error));
      assert.equal(error.exitCode, 3);
      assert.equal(error.stdout, 'partial\n');
      assert.equal(error.stderr, 'bad\n');
      return true;
    });

    const root = await sandbox.commands.run('whoami; pwd', { user: 'root', cwd: '/tmp' });
    assert.equal(root.stdout, 'root\n/tmp\n');

    const chunks: string[] = [];
    const streamed = await sandbox.commands.run('for i in 1 2 3; do echo line$i; sleep 0.2; done', { onStdout: (d) => void chunks.push(d) });
    assert.equal(streamed.stdout, 'line1\nline2\nline3\n');
    assert.equal(chunks.join(''), 'line1\nline2\nline3\n');
    assert.ok(chunks.length >= 2, `output arrived in pieces as it was written (${chunks.length})`);

    // Background: a handle, listed, fed through stdin, then killed.
    const bg = await sandbox.commands.run('read line; echo got $line; sleep 600', { background: true, stdin: true });
    const listed = await sandbox.commands.list();
    assert.ok(listed.some((p) => p.pid === bg.pid), 'the background command is listed');
    await sandbox.commands.sendStdin(bg.pid, 'hi\n');
    for (let i = 0; i < 100 && !bg.stdout.includes('got hi'); i++) await new Promise((r) => setTimeout(r, 50));
    assert.equal(bg.stdout, 'got hi\n');
    // Another connection to the same process.
    const again = await sandbox.commands.connect(bg.pid);
    assert.equal(again.pid, bg.pid);
    assert.equal(await sandbox.commands.kill(bg.pid), true);
    await assert.rejects(bg.wait(), (error: unknown) => error instanceof CommandExitError);
    assert.ok(!(await sandbox.commands.list()).some((p) => p.pid === bg.pid), 'killed commands leave the list');
    assert.equal(await sandbox.commands.kill(999_999), false, 'an unknown pid');
  });

  test('files: write and read text, bytes and streams both ways, list, exists, makeDir, rename, remove, getInfo, watchDir', SLOW, async () => {
    const sandbox = await create();
    const info = await sandbox.files.write('notes/hello.txt', 'hello files');
    assert.equal(info.path, '/home/user/notes/hello.txt');
    assert.equal(await sandbox.files.read('/home/user/notes/hello.txt'), 'hello files');
    const owner = await sandbox.commands.run('stat -c %U /home/user/notes/hello.txt /home/user/notes');
    assert.equal(owner.stdout, 'user\nuser\n', 'written as the calling user');

    const bytes = new Uint8Array(200_000).map((_, i) => (i * 7) % 256);
    await sandbox.files.write('/tmp/blob.bin', bytes.buffer);
    assert.deepEqual(await sandbox.files.read('/tmp/blob.bin', { format: 'bytes' }), bytes);
    const sum = await sandbox.commands.run('wc -c < /tmp/blob.bin');
    assert.equal(sum.stdout.trim(), '200000');
    await sandbox.files.write('/tmp/stream.txt', new Blob(['streamed ', 'upload']).stream());
    assert.equal(await sandbox.files.read('/tmp/stream.txt'), 'streamed upload');
    await sandbox.files.write('/tmp/gz.txt', 'gzip body', { gzip: true });
    assert.equal(await sandbox.files.read('/tmp/gz.txt'), 'gzip body');
    const many = await sandbox.files.write([
      { path: '/tmp/m/a.txt', data: 'A' },
      { path: '/tmp/m/b.txt', data: 'B' },
    ]);
    assert.equal(many.length, 2);

    assert.equal(await sandbox.files.exists('/tmp/m/a.txt'), true);
    assert.equal(await sandbox.files.exists('/tmp/m/none'), false);
    assert.equal(await sandbox.files.makeDir('/tmp/m/sub/deeper'), true);
    assert.equal(await sandbox.files.makeDir('/tmp/m/sub/deeper'), false, 'exists already');
    const flat = await sandbox.files.list('/tmp/m');
    assert.deepEqual(flat.map((e) => e.name).sort(), ['a.txt', 'b.txt', 'sub']);
    const deep = await sandbox.files.list('/tmp/m', { depth: 3 });
    assert.ok(deep.some((e) => e.path === '/tmp/m/sub/deeper' && e.type === 'dir'));
    const stat = await sandbox.files.getInfo('/tmp/m/a.txt');
    assert.equal(stat.type, 'file');
    assert.equal(stat.size, 1);
    assert.equal(stat.owner, 'user');
    const moved = await sandbox.files.rename('/tmp/m/a.txt', '/tmp/m/c.txt');
    assert.equal(moved.path, '/tmp/m/c.txt');
    await sandbox.files.remove('/tmp/m/sub');
    assert.equal(await sandbox.files.exists('/tmp/m/sub'), false);
    await assert.rejects(sandbox.files.read('/tmp/m/none'), (error: unknown) => error instanceof NotFoundError);

    const events: string[] = [];
    const watcher = await sandbox.files.watchDir('/tmp/m', (event) => void events.push(`${event.type}:${event.name}`));
    await sandbox.commands.run('echo x > /tmp/m/new.txt');
    await sandbox.files.write('/tmp/m/c.txt', 'overwritten through envd');
    for (let i = 0; i < 100 && !(events.includes('create:new.txt') && events.includes('write:c.txt')); i++) await new Promise((r) => setTimeout(r, 50));
    await watcher.stop();
    assert.ok(events.includes('create:new.txt'), events.join(','));
    assert.ok(events.includes('write:c.txt'), `an upload is seen as a write: ${events.join(',')}`);
    assert.ok(!events.some((e) => e.includes('cocoon-upload')), 'no temporary upload file is seen');
  });

  test('PTY: create, sendInput, resize, disconnect and connect, kill', SLOW, async () => {
    const sandbox = await create();
    let out = '';
    const decoder = new TextDecoder();
    const terminal = await sandbox.pty.create({ cols: 80, rows: 24, onData: (d) => void (out += decoder.decode(d, { stream: true })) });
    await sandbox.pty.sendInput(terminal.pid, new TextEncoder().encode('echo pty-$((40+2)); stty size\n'));
    for (let i = 0; i < 200 && !out.includes('pty-42'); i++) await new Promise((r) => setTimeout(r, 50));
    assert.match(out, /pty-42/);
    await sandbox.pty.resize(terminal.pid, { cols: 100, rows: 30 });
    await sandbox.pty.sendInput(terminal.pid, new TextEncoder().encode('stty size\n'));
    for (let i = 0; i < 200 && !out.includes('30 100'); i++) await new Promise((r) => setTimeout(r, 50));
    assert.match(out, /30 100/);
    // Disconnect, then connect again with a new handler: the terminal lives on.
    await terminal.disconnect();
    let again = '';
    const reconnected = await sandbox.pty.connect(terminal.pid, { onData: (d) => void (again += decoder.decode(d, { stream: true })) });
    await sandbox.pty.sendInput(terminal.pid, new TextEncoder().encode('echo again-$((1+1))\n'));
    for (let i = 0; i < 200 && !again.includes('again-2'); i++) await new Promise((r) => setTimeout(r, 50));
    assert.match(again, /again-2/);
    assert.equal(reconnected.pid, terminal.pid);
    assert.equal(await sandbox.pty.kill(terminal.pid), true);
  });

  test('lifecycle: list with metadata and state filters, getInfo, setTimeout, pause then connect with memory and files kept, kill', SLOW, async () => {
    const sandbox = await create({ metadata: { suite: 'e2b', case: 'lifecycle' }, timeoutMs: 120_000 });
    const info = await sandbox.getInfo();
    assert.equal(info.sandboxId, sandbox.sandboxId);
    assert.equal(info.templateId, TEMPLATE);
    assert.equal(info.state, 'running');
    assert.deepEqual(info.metadata, { suite: 'e2b', case: 'lifecycle' });
    const before = info.endAt.getTime();
    await sandbox.setTimeout(600_000);
    assert.ok((await sandbox.getInfo()).endAt.getTime() > before + 300_000);

    const found = await Sandbox.list({ query: { metadata: { case: 'lifecycle' } } }).nextItems();
    assert.deepEqual(found.map((s) => s.sandboxId), [sandbox.sandboxId]);

    // Memory: a shell variable held only by a running process; disk: a file.
    const holder = await sandbox.commands.run('secret=$((6*7)); read x; echo "kept $secret"', { background: true, stdin: true, timeoutMs: 0 });
    await sandbox.files.write('/home/user/kept.txt', 'on disk');
    assert.equal(await sandbox.pause(), true);
    assert.equal((await sandbox.getInfo()).state, 'paused');
    const paused = await Sandbox.list({ query: { state: ['paused'], metadata: { case: 'lifecycle' } } }).nextItems();
    assert.deepEqual(paused.map((s) => s.sandboxId), [sandbox.sandboxId]);
    assert.equal(await sandbox.isRunning(), false, 'a paused sandbox answers 502 at /health');

    const back = await Sandbox.connect(sandbox.sandboxId);
    assert.equal((await back.getInfo()).state, 'running');
    assert.equal(await back.files.read('/home/user/kept.txt'), 'on disk');
    const reattached = await back.commands.connect(holder.pid);
    await back.commands.sendStdin(holder.pid, '\n');
    const result = await reattached.wait();
    assert.equal(result.stdout, 'kept 42\n');

    assert.equal(await Sandbox.kill(sandbox.sandboxId), true);
    await assert.rejects(Sandbox.getInfo(sandbox.sandboxId), (error: unknown) => error instanceof SandboxNotFoundError);
    assert.equal(await Sandbox.kill(sandbox.sandboxId), false);
  });

  test('fork and snapshot map onto Cocoon\'s fork and checkpoint', SLOW, async () => {
    const sandbox = await create();
    await sandbox.files.write('/home/user/state.txt', 'before');
    const [fork] = await sandbox.fork({ count: 1 });
    assert.ok(fork instanceof Sandbox, String(fork));
    created.push(fork);
    assert.notEqual(fork.sandboxId, sandbox.sandboxId);
    assert.equal(await fork.files.read('/home/user/state.txt'), 'before');
    await fork.files.write('/home/user/state.txt', 'fork');
    assert.equal(await sandbox.files.read('/home/user/state.txt'), 'before', 'the fork is independent');

    const snapshot = await sandbox.createSnapshot({ name: 'e2b-snap' });
    assert.deepEqual(snapshot.names, ['e2b-snap']);
    const restored = await create();
    const fromSnapshot = await Sandbox.create('e2b-snap');
    created.push(fromSnapshot);
    assert.equal(await fromSnapshot.files.read('/home/user/state.txt'), 'before');
    assert.equal(await restored.files.exists('/home/user/state.txt'), false, 'the base template is unchanged');
  });

  test('refused: a wrong API key, a wrong access token, another tenant\'s sandbox', SLOW, async () => {
    await assert.rejects(Sandbox.create(TEMPLATE, { apiKey: 'not-a-key' }), (error: unknown) => error instanceof AuthenticationError);
    const sandbox = await create();
    const stranger = new (Sandbox as unknown as new (o: object) => Sandbox)({ sandboxId: sandbox.sandboxId, envdVersion: '0.5.7', envdAccessToken: 'forged' });
    await assert.rejects(stranger.commands.run('echo hi'), (error: unknown) => error instanceof AuthenticationError);
    await assert.rejects(stranger.files.read('/etc/hostname'), (error: unknown) => error instanceof AuthenticationError);

    await assert.rejects(Sandbox.getInfo(sandbox.sandboxId, { apiKey: otherKey }), (error: unknown) => error instanceof SandboxNotFoundError);
    await assert.rejects(Sandbox.connect(sandbox.sandboxId, { apiKey: otherKey }), (error: unknown) => error instanceof SandboxNotFoundError);
    assert.equal(await Sandbox.kill(sandbox.sandboxId, { apiKey: otherKey }), false);
    assert.deepEqual(await Sandbox.list({ apiKey: otherKey }).nextItems(), []);
    assert.equal((await sandbox.commands.run('echo still here')).stdout, 'still here\n');
  });

  test('a data directory too full for a sandbox\'s memory: create refused up front (SandboxError "507: no_space: …"), nothing made; a paused one stays paused; with room again they start', SLOW, async () => {
    const paused = await create({ metadata: { case: 'no-space' } });
    await paused.files.write('/home/user/kept.txt', 'kept through a refused connect');
    await paused.pause();
    const api = client(server.apiUrl, key);
    const microvmIds = async () => ((await api.get('/microvms')).body.items as Array<{ id: string }>).map((m) => m.id).sort();
    const sandboxIds = async () => (await Sandbox.list({ query: { state: ['running', 'paused'] } }).nextItems()).map((s) => s.sandboxId).sort();
    const before = { microvms: await microvmIds(), sandboxes: await sandboxIds() };
    // What the space check weighs (src/vmm/space-ledger.ts): the free space less what the RAM
    // files of live VMs there may still claim. A sparse "RAM file" entered as live, as large as
    // the free space, leaves no room for any guest's memory, as a disk that full would. The free
    // space is read once the paused sandbox's QEMU is gone: the pause answered before its exit,
    // and the RAM file's blocks it still held would be free again a moment later.
    await microvms.engine.driver.exitsSettled();
    const ram = path.join(dataDir, 'no-room.ram');
    const stats = fs.statfsSync(path.dirname(ram));
    fs.writeFileSync(ram, '');
    fs.truncateSync(ram, stats.bavail * stats.bsize);
    holdRam(ram, stats.bavail * stats.bsize);
    try {
      await assert.rejects(Sandbox.create(TEMPLATE), (error: unknown) => {
        assert.ok(error instanceof SandboxError, String(error));
        assert.match(error.message, /^507: no_space: no space left on the data directory's disk for a microVM of image img-/);
        return true;
      });
      assert.deepEqual(await microvmIds(), before.microvms, 'no microVM made');
      assert.deepEqual(await sandboxIds(), before.sandboxes, 'no sandbox made');

      await assert.rejects(Sandbox.connect(paused.sandboxId), (error: unknown) => {
        assert.ok(error instanceof SandboxError, String(error));
        assert.match(error.message, /^507: no_space: /);
        return true;
      });
      assert.equal((await Sandbox.getInfo(paused.sandboxId)).state, 'paused', 'not woken, still paused');
    } finally {
      releaseRam(ram);
      fs.rmSync(ram, { force: true });
    }
    const sandbox = await create();
    assert.equal((await sandbox.commands.run('echo room again')).stdout, 'room again\n');
    await sandbox.kill();
    const woken = await Sandbox.connect(paused.sandboxId);
    assert.equal(await woken.files.read('/home/user/kept.txt'), 'kept through a refused connect');
    await woken.kill();
  });
});
