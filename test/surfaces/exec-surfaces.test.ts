/**
 * Exec, files and the shell through the surfaces, on a real microVM (real buildah, real QEMU,
 * the real API): the SDK (run with callbacks, stdin, env/cwd, a timeout; a background handle
 * written to, waited on and killed; files as strings, bytes and streams), the CLI (`vm exec`
 * exit codes, stdout and stderr apart, `-i`; `vm cp` of a file and a folder both ways,
 * byte-exact), and `cocoon vm shell` under a real terminal (tmux): a TTY of the terminal's
 * size, a resize seen by `stty size`, Ctrl-C interrupting a `sleep` in the guest, the shell's
 * exit status. One image and one microVM for the whole file. The dashboard's terminal is in
 * dashboard-e2e.test.ts (its image); the client side alone in exec-client.test.ts.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { Cocoon, CocoonApiError, type StartedMicroVM } from '../../packages/sdk/src/index.ts';
import { wsFactory } from '../../src/cli/websocket.ts';
import { busyboxFolder, cocoon, execRoutesMissing, repo, sleep, startTestServer, tempDir, type TestServer } from './helpers.ts';

let server: TestServer | undefined;
let missing: string | undefined;
let sdk: Cocoon;
let vm: StartedMicroVM;
let flags: string[];
const scratch = tempDir('cocoon-exec-surfaces-');

before(async () => {
  server = await startTestServer();
  missing = execRoutesMissing(server);
  if (missing) return;
  const admin = new Cocoon({ apiUrl: server.url, apiKey: server.adminKey });
  const tenant = await admin.tenants.create({ name: 'exec-user' });
  sdk = new Cocoon({ apiUrl: server.url, apiKey: tenant.apiKey });
  flags = ['--api-url', server.url, '--api-key', tenant.apiKey];
  const folder = busyboxFolder();
  try {
    const bundle = await sdk.bundles.push(folder);
    const image = await sdk.images.create({ name: 'exec-box', bundle: bundle.uri });
    await sdk.images.waitUntilReady(image.id, { timeoutMs: 15 * 60_000 });
    vm = await sdk.microvms.start({ image: image.arn, idlePolicy: { maxIdleDurationSeconds: 3600 } });
    await sdk.microvms.waitForState(vm.id, 'RUNNING', { timeoutMs: 10 * 60_000 });
  } finally {
    fs.rmSync(folder, { recursive: true, force: true });
  }
});

after(async () => {
  if (server && !missing && sdk) {
    for await (const left of sdk.microvms.iterate({ state: ['PENDING', 'RUNNING', 'SUSPENDING', 'SUSPENDED', 'RESUMING'] })) {
      await sdk.microvms.terminate(left.id).catch(() => undefined);
    }
  }
  await server?.close();
  fs.rmSync(scratch, { recursive: true, force: true });
});

const sha = (bytes: Buffer | Uint8Array) => createHash('sha256').update(bytes).digest('hex');

describe('exec and files through the SDK, on a real microVM', { timeout: 30 * 60_000 }, () => {
  it('runs commands: exit codes, stdout and stderr apart as they come, stdin, env, cwd, a timeout', async (t) => {
    if (missing) return t.skip(missing);
    const chunks: Array<[string, string]> = [];
    const result = await sdk.exec.run(vm.id, ['sh', '-c', 'echo "to out $GREETING"; echo to-err >&2; pwd; exit 7'], {
      env: { GREETING: 'hi' },
      cwd: '/www',
      onStdout: (text) => void chunks.push(['out', text]),
      onStderr: (text) => void chunks.push(['err', text]),
    });
    assert.equal(result.exitCode, 7);
    assert.equal(result.stdout, 'to out hi\n/www\n');
    assert.equal(result.stderr, 'to-err\n');
    assert.equal(chunks.filter(([s]) => s === 'err').map(([, text]) => text).join(''), 'to-err\n');
    assert.ok(result.pid && result.pid > 1);

    const fed = await sdk.exec.run(vm.id, ['wc', '-c'], { stdin: 'twelve bytes' });
    assert.deepEqual([fed.exitCode, fed.stdout.trim()], [0, '12']);

    const shell = await sdk.exec.run(vm.id, 'echo $((6*7)) | tr 4 x');
    assert.equal(shell.stdout, 'x2\n', 'a string runs through /bin/sh -c');

    const killed = await sdk.exec.run(vm.id, ['sleep', '600'], { timeoutSeconds: 1 });
    assert.deepEqual({ exitCode: killed.exitCode, timedOut: killed.timedOut }, { exitCode: null, timedOut: true });

    // A program that is not there: a clear error, or a non-zero exit (127) — never success.
    const absent = await sdk.exec.run(vm.id, ['/no/such/program']).catch((error: unknown) => error);
    if (absent instanceof Error) assert.ok(absent instanceof CocoonApiError, String(absent));
    else assert.notEqual((absent as { exitCode: number | null }).exitCode, 0);
  });

  it('keeps a background process: a handle to write its stdin, wait for it, kill another', async (t) => {
    if (missing) return t.skip(missing);
    const reader = await sdk.exec.start(vm.id, ['sh', '-c', 'read -r line; echo "got $line"; exit 4']);
    assert.ok((await sdk.exec.list(vm.id)).some((p) => p.pid === reader.pid), 'listed while it runs');
    const done = reader.wait();
    await reader.attached;
    await reader.sendStdin('hello\n');
    const result = await done;
    assert.deepEqual([result.exitCode, result.stdout], [4, 'got hello\n']);

    const sleeper = await sdk.exec.start(vm.id, ['sleep', '600']);
    const ended = sleeper.wait();
    await sleeper.attached;
    await sleeper.kill();
    const killed = await ended;
    assert.deepEqual([killed.exitCode, killed.signal], [null, 'SIGKILL']);
    assert.ok(!(await sdk.exec.list(vm.id)).some((p) => p.pid === sleeper.pid), 'gone from the list');
  });

  it('reads and writes files as strings, bytes and streams; lists, stats, renames, removes', async (t) => {
    if (missing) return t.skip(missing);
    const files = sdk.files;
    await files.mkdir(vm.id, '/tmp/sdk/a/b', { parents: true });
    const stat = await files.write(vm.id, '/tmp/sdk/a/hello.txt', 'héllo wörld\n', { mode: 0o640 });
    assert.deepEqual([stat.type, stat.size, stat.mode], ['file', 14, '0640']);
    assert.equal(await files.read(vm.id, '/tmp/sdk/a/hello.txt'), 'héllo wörld\n');
    const bytes = randomBytes(3 * 1024 * 1024 + 17);
    await files.write(vm.id, '/tmp/sdk/a/b/blob.bin', new Blob([bytes]));
    assert.equal(sha(await files.read(vm.id, '/tmp/sdk/a/b/blob.bin', { format: 'bytes' })), sha(bytes));
    let streamed = 0;
    const hash = createHash('sha256');
    for await (const chunk of await files.read(vm.id, '/tmp/sdk/a/b/blob.bin', { format: 'stream' })) {
      streamed += chunk.length;
      hash.update(chunk);
    }
    assert.deepEqual([streamed, hash.digest('hex')], [bytes.length, sha(bytes)]);
    const listed = await files.list(vm.id, '/tmp/sdk/a');
    assert.deepEqual(listed.map((f) => [f.name, f.type]).sort(), [['b', 'directory'], ['hello.txt', 'file']]);
    await files.rename(vm.id, '/tmp/sdk/a/hello.txt', '/tmp/sdk/a/renamed.txt');
    assert.equal(await files.exists(vm.id, '/tmp/sdk/a/hello.txt'), false);
    const seen = await sdk.exec.run(vm.id, ['cat', '/tmp/sdk/a/renamed.txt']);
    assert.equal(seen.stdout, 'héllo wörld\n', 'what the files API wrote, the guest reads');
    if (server!.has('GET', '/api/v1/microvms/:id/files/watch')) {
      const changes: string[] = [];
      const watcher = await files.watch(vm.id, '/tmp/sdk/a', (change) => changes.push(`${change.type} ${change.name}`));
      await files.write(vm.id, '/tmp/sdk/a/new.txt', 'new');
      for (let i = 0; i < 100 && !changes.some((c) => c.endsWith(' new.txt')); i++) await sleep(100);
      watcher.stop();
      await watcher.done;
      assert.ok(changes.some((c) => /^(create|write|rename_to) new\.txt$/.test(c)), changes.join(', '));
    }
    await files.remove(vm.id, '/tmp/sdk', { recursive: true });
    assert.equal(await files.exists(vm.id, '/tmp/sdk'), false);
  });
});

describe('cocoon vm exec and vm cp, on a real microVM', { timeout: 30 * 60_000 }, () => {
  it('exits with the command\'s code, keeps stdout and stderr apart, forwards stdin with -i', async (t) => {
    if (missing) return t.skip(missing);
    const apart = await cocoon([...flags, 'vm', 'exec', vm.id, 'sh', '-c', 'echo to-out; echo to-err >&2; exit 7']);
    assert.equal(apart.code, 7, apart.stderr);
    assert.equal(apart.stdout, 'to-out\n');
    assert.equal(apart.stderr, 'to-err\n');
    const ok = await cocoon([...flags, 'vm', 'exec', vm.id, 'ls', '-a', '/www']);
    assert.equal(ok.code, 0, ok.stderr);
    assert.match(ok.stdout, /^index\.html$/m, 'the command keeps its own options');

    const input = randomBytes(1024 * 1024);
    const piped = await cocoon([...flags, 'vm', 'exec', '-i', vm.id, 'cat'], { input });
    assert.equal(piped.code, 0, piped.stderr);
    assert.equal(sha(piped.stdoutBytes), sha(input), 'stdin in, stdout out, byte-exact');
    const counted = await cocoon([...flags, 'vm', 'exec', '-i', vm.id, 'sh', '-c', 'wc -c; echo done >&2; exit 3'], { input: 'abc' });
    assert.deepEqual([counted.code, counted.stdout.trim(), counted.stderr], [3, '3', 'done\n']);

    const timedOut = await cocoon([...flags, 'vm', 'exec', '--timeout', '1', vm.id, 'sleep', '600']);
    assert.equal(timedOut.code, 124);
    assert.match(timedOut.stderr, /ran out of time/);
    const noProgram = await cocoon([...flags, 'vm', 'exec', vm.id, '/no/such/program']);
    assert.equal(noProgram.code, 127, noProgram.stderr);
    const notFound = await cocoon([...flags, 'vm', 'exec', 'mvm-00000000000000000000000000', 'true']);
    assert.equal(notFound.code, 3, notFound.stderr);
  });

  it('copies a file and a folder in and out, byte-exact, like docker cp', async (t) => {
    if (missing) return t.skip(missing);
    const local = path.join(scratch, 'cp');
    fs.mkdirSync(path.join(local, 'tree/deep/er'), { recursive: true });
    const big = randomBytes(2 * 1024 * 1024 + 3);
    fs.writeFileSync(path.join(local, 'big.bin'), big);
    fs.writeFileSync(path.join(local, 'tree/a.txt'), 'alpha\n');
    fs.writeFileSync(path.join(local, 'tree/run.sh'), '#!/bin/sh\necho ran\n', { mode: 0o755 });
    fs.writeFileSync(path.join(local, 'tree/deep/er/blob'), randomBytes(70_000));
    fs.writeFileSync(path.join(local, 'tree/deep/empty'), '');

    const fileIn = await cocoon([...flags, 'vm', 'cp', path.join(local, 'big.bin'), `${vm.id}:/tmp/`]);
    assert.equal(fileIn.code, 0, fileIn.stderr);
    assert.match(fileIn.stdout, new RegExp(`Copied 1 file \\(2\\.0 MiB\\) to ${vm.id}:/tmp/big\\.bin`));
    const inGuest = await sdk.exec.run(vm.id, ['sha256sum', '/tmp/big.bin']);
    assert.equal(inGuest.stdout.split(' ')[0], sha(big));

    const treeIn = await cocoon([...flags, 'vm', 'cp', path.join(local, 'tree'), `${vm.id}:/tmp`]);
    assert.equal(treeIn.code, 0, treeIn.stderr);
    const ran = await sdk.exec.run(vm.id, ['/tmp/tree/run.sh']);
    assert.equal(ran.stdout, 'ran\n', 'the mode came along');

    const treeOut = await cocoon([...flags, '--json', 'vm', 'cp', `${vm.id}:/tmp/tree`, path.join(local, 'back')]);
    assert.equal(treeOut.code, 0, treeOut.stderr);
    assert.deepEqual([treeOut.json.files, treeOut.json.folders], [4, 3]);
    for (const file of ['a.txt', 'run.sh', 'deep/er/blob', 'deep/empty']) {
      assert.equal(sha(fs.readFileSync(path.join(local, 'back', file))), sha(fs.readFileSync(path.join(local, 'tree', file))), file);
    }
    assert.equal(fs.statSync(path.join(local, 'back/run.sh')).mode & 0o777, 0o755);
    const fileOut = await cocoon([...flags, 'vm', 'cp', `${vm.id}:/tmp/big.bin`, path.join(local, 'big.out')]);
    assert.equal(fileOut.code, 0, fileOut.stderr);
    assert.equal(sha(fs.readFileSync(path.join(local, 'big.out'))), sha(big));
    const absent = await cocoon([...flags, 'vm', 'cp', `${vm.id}:/no/such/file`, local]);
    assert.equal(absent.code, 3, absent.stderr);
  });
});

describe('a shell token: a terminal through the gateway without an API key', { timeout: 30 * 60_000 }, () => {
  it('opens a PTY with the SDK and with cocoon vm shell --token; an http token cannot', async (t) => {
    if (missing) return t.skip(missing);
    const shell = await sdk.tokens.create(vm.id, { scope: 'shell', expirationMinutes: 5 });
    const viaGateway = new Cocoon({ apiUrl: server!.url, webSocket: wsFactory });
    let seen = '';
    const pty = await viaGateway.pty.openWithToken(vm, shell.token, { command: ['sh'], cols: 90, rows: 20, onData: (text) => (seen += text) });
    await pty.write('stty size; exit 4\n');
    assert.equal((await pty.wait()).exitCode, 4);
    assert.match(seen, /^20 90\r?$/m);

    const cli = await cocoon(['--api-url', server!.url, 'vm', 'shell', vm.id, '--token', shell.token], { input: 'echo sum=$((2+3)); exit 5\n' });
    assert.equal(cli.code, 5, cli.stderr);
    assert.match(cli.stdout, /^sum=5\r?$/m);

    const http = await sdk.tokens.create(vm.id, { expirationMinutes: 5 });
    await assert.rejects(viaGateway.pty.openWithToken(vm, http.token, { command: ['true'] }), CocoonApiError);
  });
});

describe('cocoon vm shell under a real terminal (tmux)', { timeout: 30 * 60_000 }, () => {
  it('is a TTY of the terminal\'s size, follows a resize, passes Ctrl-C to the guest, exits with the shell\'s status', async (t) => {
    if (missing) return t.skip(missing);
    const socket = `cocoon-test-${process.pid}`;
    const statusFile = path.join(scratch, 'shell-status');
    const tmux = (...args: string[]) => execFileSync('tmux', ['-L', socket, '-f', '/dev/null', ...args], { encoding: 'utf8' });
    const screen = () => tmux('capture-pane', '-p', '-J', '-t', 'shell');
    const waitFor = async (pattern: RegExp, what: string) => {
      for (let i = 0; i < 600; i++) {
        const text = screen();
        if (pattern.test(text)) return text;
        await sleep(100);
      }
      assert.fail(`${what}: not on the screen within a minute:\n${screen()}`);
    };
    const type = (text: string) => tmux('send-keys', '-t', 'shell', '-l', text);
    const command = [path.join(repo, 'bin/cocoon'), ...flags, 'vm', 'shell', vm.id].map((a) => `'${a.replace(/'/g, "'\\''")}'`).join(' ');
    tmux('new-session', '-d', '-s', 'shell', '-x', '100', '-y', '30', `${command}; echo "shell-status=$?" > '${statusFile}'; sleep 600`);
    try {
      type('echo ready-$((20+1))\n');
      await waitFor(/^ready-21$/m, 'the shell answered');
      type('tty; stty size\n');
      const first = await waitFor(/^30 100$/m, 'the size of the terminal');
      assert.match(first, /^\/dev\/pts\/\d+$/m, 'a real TTY in the guest');

      tmux('resize-window', '-t', 'shell', '-x', '120', '-y', '40');
      await sleep(300);
      type('clear; stty size\n');
      await waitFor(/^40 120$/m, 'the new size after a resize');

      type('sleep 600\n');
      await sleep(1000);
      tmux('send-keys', '-t', 'shell', 'C-c');
      type('echo "after-sleep rc=$?"\n');
      await waitFor(/^after-sleep rc=130$/m, 'Ctrl-C interrupted the sleep in the guest (130 = SIGINT)');

      type('exit 3\n');
      for (let i = 0; i < 600 && !fs.existsSync(statusFile); i++) await sleep(100);
      assert.equal(fs.readFileSync(statusFile, 'utf8').trim(), 'shell-status=3', 'cocoon vm shell exits with the shell\'s status');
    } finally {
      try {
        tmux('kill-server');
      } catch {
        // already gone
      }
    }
  });
});
