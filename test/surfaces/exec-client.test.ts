/**
 * The client side of exec, files and shell without a microVM: the wire shapes (ndjson events,
 * WebSocket frames and messages, request bodies and their validation), `cocoon vm exec`'s
 * argument handling, `cocoon vm cp`'s paths and docker-cp rules (local to local through the
 * same code), and the SDK and the CLI against a stand-in server that runs host processes
 * (fake-exec.ts): exit codes, streams kept apart, stdin, sessions authenticated by header or by
 * first message, errors. Against a real microVM: exec-surfaces.test.ts.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import {
  Cocoon,
  CocoonError,
  decodeOutputFrame,
  encodeOutputFrame,
  execBody,
  fromBase64,
  InvalidArgumentError,
  NotFoundError,
  AuthenticationError,
  InvalidRequestError,
  parseExecEvent,
  resizeMessage,
  shellStatus,
  startMessage,
  toBase64,
} from '../../packages/sdk/src/index.ts';
import { separateCommand } from '../../src/cli/exec-args.ts';
import { parseCopyEnd } from '../../src/cli/cp.ts';
import { copy, localSide } from '../../src/cli/copy.ts';
import { UsageError } from '../../src/cli/exit-codes.ts';
import { wsFactory } from '../../src/cli/websocket.ts';
import { FAKE_KEY, FAKE_VM, startFakeExec, type FakeExec } from './fake-exec.ts';
import { repo, tempDir } from './helpers.ts';

describe('exec wire shapes', () => {
  it('base64 round-trips any bytes, and refuses what is not base64', () => {
    const bytes = new Uint8Array(70_000).map((_, i) => (i * 7) % 256);
    assert.deepEqual(fromBase64(toBase64(bytes)), bytes);
    assert.equal(toBase64(new TextEncoder().encode('hi')), 'aGk=');
    assert.throws(() => fromBase64('***'), CocoonError);
  });

  it('parses ndjson events and checks what the server sends', () => {
    assert.deepEqual(parseExecEvent('{"type":"start","pid":42}'), { type: 'start', pid: 42 });
    assert.deepEqual(parseExecEvent('{"type":"stdout","data":"aGk="}'), { type: 'stdout', data: new TextEncoder().encode('hi') });
    assert.deepEqual(parseExecEvent('{"type":"exit","exitCode":3,"signal":null,"timedOut":false}'), { type: 'exit', exitCode: 3, signal: null, timedOut: false });
    assert.deepEqual(parseExecEvent('{"type":"exit","exitCode":null,"signal":"SIGKILL","timedOut":true,"reason":"suspended"}'),
      { type: 'exit', exitCode: null, signal: 'SIGKILL', timedOut: true, reason: 'suspended' });
    const error = parseExecEvent('{"type":"error","error":{"code":"no_shell","message":"no /bin/sh"}}');
    assert.ok(error?.type === 'error' && error.error instanceof InvalidRequestError && error.error.code === 'no_shell');
    const gone = parseExecEvent('{"type":"error","error":{"code":"microvm_not_found","message":"x"}}');
    assert.ok(gone?.type === 'error' && gone.error instanceof NotFoundError);
    assert.equal(parseExecEvent('{"type":"progress"}'), undefined, 'unknown event types are for later');
    for (const bad of ['nope', '[]', '{"type":"start","pid":-1}', '{"type":"stdout"}', '{"type":"exit","exitCode":999}', '{"type":"exit","exitCode":"0"}']) {
      assert.throws(() => parseExecEvent(bad), CocoonError, bad);
    }
  });

  it('encodes and decodes output frames (first byte: the stream)', () => {
    const data = new TextEncoder().encode('out');
    const frame = encodeOutputFrame('stderr', data);
    assert.deepEqual([...frame], [2, ...data]);
    assert.deepEqual(decodeOutputFrame(frame), { stream: 'stderr', data });
    assert.deepEqual(decodeOutputFrame(encodeOutputFrame('stdout', data))?.stream, 'stdout');
    assert.equal(decodeOutputFrame(new Uint8Array([9, 1])), undefined);
    assert.equal(decodeOutputFrame(new Uint8Array()), undefined);
  });

  it('builds request bodies and refuses bad input before sending anything', () => {
    assert.deepEqual(execBody(['ls', '-l'], { env: { A: '1' }, cwd: '/tmp', user: 0, timeoutSeconds: 5, stdin: 'x' }),
      { command: ['ls', '-l'], env: { A: '1' }, cwd: '/tmp', user: '0', timeoutSeconds: 5, stdin: 'eA==' });
    assert.deepEqual(execBody('echo hi | wc -c', { background: true }), { command: 'echo hi | wc -c', background: true });
    const bad: Array<() => unknown> = [
      () => execBody([], {}),
      () => execBody('  ', {}),
      () => execBody(['a\0b'], {}),
      () => execBody(['ls'], { cwd: 'relative' }),
      () => execBody(['ls'], { env: { 'NOT-A-NAME': 'x' } }),
      () => execBody(['ls'], { timeoutSeconds: 0 }),
      () => execBody(['ls'], { timeoutSeconds: 86_401 }),
      () => execBody(['ls'], { user: 'a:b' }),
      () => execBody(['cat'], { stdin: new Uint8Array(1024 * 1024 + 1) }),
      () => startMessage({ cols: 0 }),
      () => resizeMessage(80, 1001),
    ];
    for (const call of bad) assert.throws(call, InvalidArgumentError);
    assert.deepEqual(JSON.parse(startMessage({ tty: true, cols: 100, rows: 30 }, 'key')), { type: 'start', apiKey: 'key', tty: true, cols: 100, rows: 30 });
    assert.deepEqual(JSON.parse(startMessage({ command: 'top' })), { type: 'start', command: 'top', tty: false });
  });

  it('turns an exit into a shell status', () => {
    assert.equal(shellStatus({ exitCode: 3, signal: null, timedOut: false }), 3);
    assert.equal(shellStatus({ exitCode: null, signal: 'SIGKILL', timedOut: true }), 137);
    assert.equal(shellStatus({ exitCode: null, signal: 'SIGINT', timedOut: false }), 130);
  });
});

describe('cocoon vm exec: the command after the microVM', () => {
  const argv = (...args: string[]) => ['node', 'cocoon', ...args];
  it('puts -- after the microVM so that the command keeps its options', () => {
    const cases: Array<[string[], string[]]> = [
      [['vm', 'exec', 'mvm-1', 'ls', '-l'], ['vm', 'exec', 'mvm-1', '--', 'ls', '-l']],
      [['vm', 'exec', '-it', 'mvm-1', 'sh'], ['vm', 'exec', '-it', 'mvm-1', '--', 'sh']],
      [['--json', 'vm', 'exec', '-e', 'A=1', '-w', '/tmp', 'mvm-1', 'env', '--json'], ['--json', 'vm', 'exec', '-e', 'A=1', '-w', '/tmp', 'mvm-1', '--', 'env', '--json']],
      [['--api-url', 'http://x', 'vm', 'exec', '--timeout', '5', '-ieB=2', 'mvm-1', 'cat'], ['--api-url', 'http://x', 'vm', 'exec', '--timeout', '5', '-ieB=2', 'mvm-1', '--', 'cat']],
      [['vm', 'exec', '-u', 'root', 'mvm-1', 'id', '-u'], ['vm', 'exec', '-u', 'root', 'mvm-1', '--', 'id', '-u']],
    ];
    for (const [given, wanted] of cases) assert.deepEqual(separateCommand(argv(...given)), argv(...wanted), given.join(' '));
  });

  it('leaves everything else alone', () => {
    for (const given of [
      ['vm', 'exec', 'mvm-1', '--', 'ls', '-l'], ['vm', 'exec', '--', 'mvm-1', 'ls'], ['vm', 'exec', 'mvm-1'], ['vm', 'exec', '--help'],
      ['vm', 'list', '--json'], ['image', 'exec', 'x', 'y'], ['vm', 'curl', 'mvm-1', '/', '-i'], [],
    ]) {
      assert.deepEqual(separateCommand(argv(...given)), argv(...given), given.join(' '));
    }
  });
});

describe('cocoon vm cp: paths and docker cp rules', () => {
  it('tells microVM paths from local ones', () => {
    assert.deepEqual(parseCopyEnd('mvm-01abc:/etc/hosts'), { kind: 'microvm', microvm: 'mvm-01abc', path: '/etc/hosts' });
    assert.deepEqual(parseCopyEnd('arn:cocoon:local-1:123456789012:microvm/mvm-01abc:/srv/'), { kind: 'microvm', microvm: 'arn:cocoon:local-1:123456789012:microvm/mvm-01abc', path: '/srv/' });
    for (const local of ['./a:b', '/abs/a:b', 'plain', 'dir/file', '.', '../up']) assert.deepEqual(parseCopyEnd(local), { kind: 'local', path: local });
    assert.throws(() => parseCopyEnd('mvm-1:relative'), (e: unknown) => e instanceof UsageError && /absolute: mvm-1:\/relative/.test(e.message));
    assert.throws(() => parseCopyEnd('mvm-1:'), UsageError);
  });

  /** A tree of files under `root`, as {relative path: content | null for folders}. */
  function snapshot(root: string): Record<string, string | null> {
    const out: Record<string, string | null> = {};
    const walk = (dir: string, prefix: string) => {
      for (const name of fs.readdirSync(dir).sort()) {
        const full = path.join(dir, name);
        const rel = prefix ? `${prefix}/${name}` : name;
        const stat = fs.lstatSync(full);
        if (stat.isDirectory()) {
          out[rel] = null;
          walk(full, rel);
        } else if (stat.isFile()) out[rel] = fs.readFileSync(full, 'latin1');
        else out[rel] = `-> ${fs.readlinkSync(full)}`;
      }
    };
    walk(root, '');
    return out;
  }

  it('copies files and folders the way docker cp does (both sides local, same code as with a microVM)', async () => {
    const dir = tempDir('cocoon-cp-');
    try {
      const src = path.join(dir, 'src');
      fs.mkdirSync(path.join(src, 'sub/deeper'), { recursive: true });
      fs.writeFileSync(path.join(src, 'a.txt'), 'alpha');
      fs.writeFileSync(path.join(src, 'run.sh'), '#!/bin/sh\n', { mode: 0o750 });
      fs.writeFileSync(path.join(src, 'sub/deeper/bin'), Buffer.from([0, 1, 2, 255, 254]));
      fs.symlinkSync('/etc/passwd', path.join(src, 'link'));
      const local = localSide();
      const out = (p: string) => path.join(dir, p);
      const warnings: string[] = [];
      const warn = (l: string) => warnings.push(l);

      // A file onto a missing path, onto a file, into a folder; onto a missing folder/: error.
      await copy(local, path.join(src, 'a.txt'), local, out('f1'));
      assert.equal(fs.readFileSync(out('f1'), 'utf8'), 'alpha');
      fs.writeFileSync(out('f2'), 'old and longer');
      await copy(local, path.join(src, 'a.txt'), local, out('f2'));
      assert.equal(fs.readFileSync(out('f2'), 'utf8'), 'alpha');
      fs.mkdirSync(out('into'));
      const into = await copy(local, path.join(src, 'run.sh'), local, out('into'));
      assert.equal(into.target, out('into/run.sh'));
      assert.equal(fs.statSync(out('into/run.sh')).mode & 0o777, 0o750, 'the mode is kept');
      await assert.rejects(copy(local, path.join(src, 'a.txt'), local, out('missing/')), /destination folder does not exist/);

      // A folder onto a missing path → that path; onto a folder → inside it; src/. → merged.
      const made = await copy(local, src, local, out('copy1'), warn);
      assert.deepEqual({ files: made.files, folders: made.folders, bytes: made.bytes }, { files: 3, folders: 3, bytes: 5 + 10 + 5 });
      const expected = snapshot(src);
      delete expected.link;
      assert.deepEqual(snapshot(out('copy1')), expected, 'byte-exact, symlink skipped');
      assert.match(warnings.join('\n'), /skipped .*link: a symbolic link/);
      fs.mkdirSync(out('copy2'));
      await copy(local, src, local, out('copy2'));
      assert.deepEqual(snapshot(out('copy2/src')), expected);
      fs.mkdirSync(out('copy3'));
      fs.writeFileSync(out('copy3/keep'), 'kept');
      await copy(local, `${src}/.`, local, out('copy3'));
      assert.deepEqual(snapshot(out('copy3')), { ...expected, keep: 'kept' });
      await assert.rejects(copy(local, src, local, out('f1')), /cannot copy the folder .* onto the file/);
      await assert.rejects(copy(local, out('nothing'), local, out('x')), /no such file or folder/);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('never follows a symlink planted inside a copied folder on this host', async () => {
    const dir = tempDir('cocoon-cp-');
    try {
      fs.mkdirSync(path.join(dir, 'src'));
      fs.writeFileSync(path.join(dir, 'src/victim'), 'payload');
      fs.mkdirSync(path.join(dir, 'dst/src'), { recursive: true });
      fs.writeFileSync(path.join(dir, 'outside'), 'untouched');
      fs.symlinkSync(path.join(dir, 'outside'), path.join(dir, 'dst/src/victim'));
      await assert.rejects(copy(localSide(), path.join(dir, 'src'), localSide(), path.join(dir, 'dst')), /ELOOP/);
      assert.equal(fs.readFileSync(path.join(dir, 'outside'), 'utf8'), 'untouched');
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('SDK and CLI against a stand-in exec server', () => {
  let fake: FakeExec;
  let root: string;
  let sdk: Cocoon;
  before(async () => {
    root = tempDir('cocoon-fake-exec-');
    fake = await startFakeExec(root);
    sdk = new Cocoon({ apiUrl: fake.url, apiKey: FAKE_KEY });
  });
  after(async () => {
    await fake?.close();
    fs.rmSync(root, { recursive: true, force: true });
  });

  /** bin/cocoon with stdin from `input`. */
  function cli(args: string[], input = ''): Promise<{ code: number; stdout: Buffer; stderr: string }> {
    return new Promise((resolve, reject) => {
      const child = spawn(path.join(repo, 'bin/cocoon'), ['--api-url', fake.url, '--api-key', FAKE_KEY, ...args], { cwd: root, env: { PATH: process.env.PATH, HOME: process.env.HOME } });
      const out: Buffer[] = [];
      let err = '';
      child.stdout.on('data', (d: Buffer) => out.push(d));
      child.stderr.on('data', (d: Buffer) => (err += d));
      child.on('error', reject);
      child.on('close', (code) => resolve({ code: code ?? -1, stdout: Buffer.concat(out), stderr: err }));
      child.stdin.end(input);
    });
  }

  it('run: output through callbacks as it comes, streams apart, the exit code, stdin', async () => {
    const seen: string[] = [];
    const result = await sdk.exec.run(FAKE_VM, ['sh', '-c', 'echo out; echo err >&2; read x; echo "got $x"; exit 3'], {
      stdin: 'line\n',
      env: { A: 'b' },
      onStdout: (text) => void seen.push(`out:${text}`),
      onStderr: (text) => void seen.push(`err:${text}`),
    });
    assert.equal(result.exitCode, 3);
    assert.equal(result.stdout, 'out\ngot line\n');
    assert.equal(result.stderr, 'err\n');
    assert.ok(seen.includes('err:err\n'));
    assert.equal(fake.execBodies.at(-1)?.stdin, 'bGluZQo=');
    const capped = await sdk.exec.run(FAKE_VM, ['sh', '-c', 'head -c 5000 /dev/zero'], { maxOutputBytes: 100 });
    assert.equal(capped.stdout.length, 100);
    assert.equal(capped.truncated, true);
    await assert.rejects(sdk.exec.run(FAKE_VM, 'no-shell-please'), (e: unknown) => e instanceof InvalidRequestError && e.code === 'no_shell');
    await assert.rejects(sdk.exec.run('mvm-other', ['true']), NotFoundError);
  });

  it('background: a handle to write stdin, wait and kill', async () => {
    const cat = await sdk.exec.start(FAKE_VM, ['cat']);
    assert.ok(cat.pid > 0);
    assert.ok((await sdk.exec.list(FAKE_VM)).some((p) => p.pid === cat.pid));
    const waiting = cat.wait();
    await cat.attached;
    await cat.sendStdin('hello ');
    await sdk.exec.writeStdin(FAKE_VM, cat.pid, 'world', { eof: true });
    const done = await waiting;
    assert.equal(done.exitCode, 0);
    assert.equal(done.stdout, 'hello world');
    const sleeper = await sdk.exec.start(FAKE_VM, ['sleep', '60']);
    const slept = sleeper.wait();
    await sleeper.attached;
    await sleeper.kill();
    assert.deepEqual({ ...(await slept), stdout: '' }, { exitCode: null, signal: 'SIGKILL', timedOut: false, pid: sleeper.pid, stdout: '', stderr: '', truncated: false });
  });

  it('files: strings, bytes, streams; stat, list, mkdir, rename, remove', async () => {
    const files = sdk.files;
    await files.mkdir(FAKE_VM, '/d', { mode: 0o750 });
    const stat = await files.write(FAKE_VM, '/d/a.txt', 'héllo', { mode: '600' });
    assert.deepEqual([stat.type, stat.size, stat.mode], ['file', 6, '0600']);
    assert.equal(await files.read(FAKE_VM, '/d/a.txt'), 'héllo');
    const bytes = new Uint8Array(300_000).map((_, i) => i % 251);
    await files.write(FAKE_VM, '/d/b.bin', new Blob([bytes]));
    assert.deepEqual(await files.read(FAKE_VM, '/d/b.bin', { format: 'bytes' }), bytes);
    const stream = await files.read(FAKE_VM, '/d/b.bin', { format: 'stream' });
    let total = 0;
    for await (const chunk of stream) total += chunk.length;
    assert.equal(total, bytes.length);
    await files.write(FAKE_VM, '/d/c.txt', (async function* () {
      yield new TextEncoder().encode('from ');
      yield new TextEncoder().encode('a generator');
    })());
    assert.equal(await files.read(FAKE_VM, '/d/c.txt'), 'from a generator');
    assert.deepEqual((await files.list(FAKE_VM, '/d')).map((f) => f.name).sort(), ['a.txt', 'b.bin', 'c.txt']);
    await files.rename(FAKE_VM, '/d/c.txt', '/d/renamed.txt');
    assert.equal(await files.exists(FAKE_VM, '/d/c.txt'), false);
    assert.equal(await files.exists(FAKE_VM, '/d/renamed.txt'), true);
    await files.remove(FAKE_VM, '/d', { recursive: true });
    assert.equal(await files.exists(FAKE_VM, '/d'), false);
    await assert.rejects(files.read(FAKE_VM, 'relative'), InvalidArgumentError);
    assert.ok(fake.requests.includes('PUT /api/v1/microvms/mvm-fake/files'));
  });

  it('sessions: the platform WebSocket authenticates in the first message, the CLI\'s in a header', async () => {
    for (const webSocket of [undefined, wsFactory]) {
      const client = new Cocoon({ apiUrl: fake.url, apiKey: FAKE_KEY, ...(webSocket ? { webSocket } : {}) });
      let out = '';
      let err = '';
      const session = await client.exec.session(FAKE_VM, { command: ['sh', '-c', 'cat; echo bye >&2'], onStdout: (t) => (out += t), onStderr: (t) => (err += t) });
      assert.ok(session.pid && session.pid > 0);
      assert.equal(fake.lastAuth, webSocket ? 'header' : 'message');
      assert.equal(fake.startMessages.at(-1)?.apiKey, webSocket ? undefined : FAKE_KEY, 'the key is in the message only without a header');
      await session.write('typed\n');
      session.closeStdin();
      assert.deepEqual(await session.wait(), { exitCode: 0, signal: null, timedOut: false });
      assert.equal(out, 'typed\n');
      assert.equal(err, 'bye\n');
    }
    const pty = await sdk.pty.open(FAKE_VM, { command: ['sleep', '30'], cols: 120, rows: 40 });
    assert.deepEqual([fake.startMessages.at(-1)?.tty, fake.startMessages.at(-1)?.cols], [true, 120]);
    pty.resize(100, 20);
    pty.signal('INT');
    assert.equal((await pty.wait()).signal, 'SIGINT');
    assert.deepEqual(fake.controls.slice(-2), [{ type: 'resize', cols: 100, rows: 20 }, { type: 'signal', signal: 'SIGINT' }]);
  });

  it('sessions: a refused handshake or a refusing server is a typed error', async () => {
    const viaHeader = new Cocoon({ apiUrl: fake.url, apiKey: FAKE_KEY, webSocket: wsFactory });
    await assert.rejects(viaHeader.exec.session('mvm-other', { command: ['true'] }), (e: unknown) => e instanceof NotFoundError && /refused: not_found/.test(e.message));
    const wrongKey = new Cocoon({ apiUrl: fake.url, apiKey: 'cocoon_ak_wrong' });
    await assert.rejects(wrongKey.exec.session(FAKE_VM, { command: ['true'] }), AuthenticationError);
    await assert.rejects(sdk.exec.session('mvm-other', { command: ['true'] }), NotFoundError);
  });

  it('cocoon vm exec: the exit code, stdout and stderr apart, -i forwards stdin, --json', async () => {
    const apart = await cli(['vm', 'exec', FAKE_VM, 'sh', '-c', 'echo to-out; echo to-err >&2; exit 7']);
    assert.equal(apart.code, 7);
    assert.equal(apart.stdout.toString(), 'to-out\n');
    assert.equal(apart.stderr, 'to-err\n');
    const options = await cli(['vm', 'exec', FAKE_VM, 'ls', '-a', '/']);
    assert.equal(options.code, 0, options.stderr);
    assert.deepEqual(fake.execBodies.at(-1)?.command, ['ls', '-a', '/'], 'the command keeps its own options');
    const input = Buffer.from(Array.from({ length: 200_000 }, (_, i) => i % 256));
    const piped = await cli(['vm', 'exec', '-i', FAKE_VM, 'sh', '-c', 'cat; echo done >&2'], input as unknown as string);
    assert.equal(piped.code, 0, piped.stderr);
    assert.ok(piped.stdout.equals(input), 'stdin arrives byte-exact and comes back');
    assert.equal(piped.stderr, 'done\n');
    const json = await cli(['--json', 'vm', 'exec', FAKE_VM, 'sh', '-c', 'echo hi; exit 2']);
    assert.equal(json.code, 2);
    assert.deepEqual(JSON.parse(json.stdout.toString()).stdout, 'hi\n');
    const missing = await cli(['vm', 'exec', 'mvm-other', 'true']);
    assert.equal(missing.code, 3, missing.stderr);
    const missingWs = await cli(['vm', 'exec', '-i', 'mvm-other', 'true']);
    assert.equal(missingWs.code, 3, missingWs.stderr);
    assert.match(missingWs.stderr, /refused: not_found/);
    const usage = await cli(['vm', 'exec', FAKE_VM]);
    assert.equal(usage.code, 2);
  });

  it('cocoon vm cp: a file and a folder in and out, byte-exact', async () => {
    const local = tempDir('cocoon-cp-local-');
    try {
      fs.mkdirSync(path.join(local, 'tree/sub'), { recursive: true });
      const blob = Buffer.from(Array.from({ length: 150_000 }, (_, i) => (i * 13) % 256));
      fs.writeFileSync(path.join(local, 'tree/sub/blob.bin'), blob);
      fs.writeFileSync(path.join(local, 'tree/x.sh'), 'echo x\n', { mode: 0o755 });
      fs.mkdirSync(path.join(root, 'srv'));
      const fileIn = await cli(['vm', 'cp', path.join(local, 'tree/sub/blob.bin'), `${FAKE_VM}:/srv/`]);
      assert.equal(fileIn.code, 0, fileIn.stderr);
      assert.match(fileIn.stdout.toString(), /✓ Copied 1 file \(146\.5 KiB\) to mvm-fake:\/srv\/blob\.bin/);
      assert.ok(fs.readFileSync(path.join(root, 'srv/blob.bin')).equals(blob));
      const treeIn = await cli(['vm', 'cp', path.join(local, 'tree'), `${FAKE_VM}:/srv`]);
      assert.equal(treeIn.code, 0, treeIn.stderr);
      assert.ok(fs.readFileSync(path.join(root, 'srv/tree/sub/blob.bin')).equals(blob));
      assert.equal(fs.statSync(path.join(root, 'srv/tree/x.sh')).mode & 0o777, 0o755);
      const treeOut = await cli(['--json', 'vm', 'cp', `${FAKE_VM}:/srv/tree`, path.join(local, 'back')]);
      assert.equal(treeOut.code, 0, treeOut.stderr);
      assert.deepEqual(JSON.parse(treeOut.stdout.toString()), { files: 2, folders: 2, bytes: blob.length + 7, skipped: [], target: path.join(local, 'back') });
      assert.ok(fs.readFileSync(path.join(local, 'back/sub/blob.bin')).equals(blob));
      const fileOut = await cli(['vm', 'cp', `${FAKE_VM}:/srv/blob.bin`, path.join(local, 'out.bin')]);
      assert.equal(fileOut.code, 0, fileOut.stderr);
      assert.ok(fs.readFileSync(path.join(local, 'out.bin')).equals(blob));
      const missing = await cli(['vm', 'cp', `${FAKE_VM}:/nope`, local]);
      assert.equal(missing.code, 3);
      assert.match(missing.stderr, /mvm-fake:\/nope: no such file or folder/);
      const both = await cli(['vm', 'cp', `${FAKE_VM}:/a`, `${FAKE_VM}:/b`]);
      assert.equal(both.code, 2);
    } finally {
      fs.rmSync(local, { recursive: true, force: true });
    }
  });
});
