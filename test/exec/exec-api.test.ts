/**
 * Exec, files and shell inside a real microVM through the real API and gateway (issue 11),
 * on the busybox test image (one image per file): exit codes, stdout/stderr apart, stdin,
 * env/cwd/user, timeouts, concurrency, 100 MiB up and down with the daemon's memory bounded,
 * wake on exec, a background process across suspend and resume, sessions ended by a suspend,
 * the WebSocket (PTY), shell tokens through the gateway, and tenant isolation.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { execFile } from 'node:child_process';
import http from 'node:http';
import path from 'node:path';
import { promisify } from 'node:util';
import v8 from 'node:v8';
import vmContext from 'node:vm';
import { after, before, describe, test } from 'node:test';
import type { Image } from '../../src/store/images.ts';
import { createToken } from '../../src/store/tokens.ts';
import { createTestImage } from '../support/image.ts';
import { apiClient, gatewayRequest, startTestServer, stopTestServer, type ApiClient, type TestServer } from '../support/server.ts';
import { tempDir } from '../support/vm.ts';
import { apiPort, download, execCall, openWs, patternStream, upload } from './helpers.ts';

const execFileAsync = promisify(execFile);
const here = path.dirname(new URL(import.meta.url).pathname);

describe('exec, files and shell in a microVM', () => {
  const dataDir = tempDir('cocoon-exec-');
  let s: TestServer;
  let image: Image;
  let other: ApiClient;
  let otherKey: string;
  let port: number;
  let vm: string;
  const started: string[] = [];

  async function start(idlePolicy: Record<string, unknown> = { maxIdleDurationSeconds: 600 }): Promise<string> {
    const answer = await s.api('POST', '/microvms', { image: image.arn, idlePolicy });
    assert.equal(answer.status, 201, JSON.stringify(answer.body));
    started.push(answer.body.id);
    await waitState(answer.body.id, 'RUNNING');
    return answer.body.id;
  }
  async function waitState(id: string, state: string): Promise<void> {
    for (let i = 0; i < 1200; i++) {
      const got = await s.api('GET', `/microvms/${id}`);
      if (got.body.state === state) return;
      await new Promise((r) => setTimeout(r, 100));
    }
    assert.fail(`microVM ${id} never became ${state}`);
  }
  const run = (body: unknown, id = vm) => execCall(port, s.adminKey, id, body);

  before(async () => {
    s = await startTestServer({ dataDir });
    port = apiPort(s.server.apiUrl);
    image = await createTestImage({ db: s.server.db, dataDir, tenantId: s.adminTenantId });
    const tenant = await s.api('POST', '/tenants', { name: 'someone-else' });
    otherKey = tenant.body.apiKey;
    other = apiClient(s.server.apiUrl, otherKey);
    vm = await start();
  });
  after(async () => {
    for (const id of started) await s.api('DELETE', `/microvms/${id}`);
    const leaked = await stopTestServer(s, dataDir);
    assert.deepEqual(leaked, [], 'a test left QEMU processes running');
  });

  test('exit codes, stdout and stderr apart, argv and shell strings', async () => {
    const shell = await run({ command: 'echo out; echo err >&2; exit 3' });
    assert.equal(shell.status, 200);
    assert.equal(shell.events[0]!.type, 'start');
    assert.ok(Number(shell.events[0]!.pid) > 1);
    assert.equal(shell.stdout, 'out\n');
    assert.equal(shell.stderr, 'err\n');
    assert.deepEqual(shell.exit, { type: 'exit', exitCode: 3, signal: null, timedOut: false });
    const argv = await run({ command: ['/bin/echo', 'a b', '$HOME'] });
    assert.equal(argv.stdout, 'a b $HOME\n', 'argv is not run through a shell');
    assert.equal(argv.exit?.exitCode, 0);
    const killed = await run({ command: 'kill -TERM $$' });
    assert.deepEqual(killed.exit, { type: 'exit', exitCode: null, signal: 'SIGTERM', timedOut: false });
    const missing = await run({ command: ['/no/such/binary'] });
    assert.equal(missing.status, 400, JSON.stringify(missing));
    assert.equal(missing.error?.code, 'command_not_found');
    const bad = await run({ command: [] });
    assert.equal(bad.status, 400, JSON.stringify(bad));
  });

  test('stdin, env, cwd and user', async () => {
    const stdin = await run({ command: ['/bin/cat'], stdin: Buffer.from('from stdin\n').toString('base64') });
    assert.equal(stdin.stdout, 'from stdin\n');
    assert.equal(stdin.exit?.exitCode, 0);
    const env = await run({ command: 'echo "$FOO $APP"; pwd', env: { FOO: 'bar' }, cwd: '/www' });
    assert.equal(env.stdout, 'bar test\n/www\n', 'request env over the image env; cwd');
    const dflt = await run({ command: 'pwd' });
    assert.equal(dflt.stdout, '/app\n', "the image's WORKDIR by default");
    const asUser = await run({ command: 'echo $$ > /dev/shm/owned-by', user: '1000' });
    assert.equal(asUser.exit?.exitCode, 0);
    const stat = await s.api('GET', `/microvms/${vm}/files/stat?path=/dev/shm/owned-by`);
    assert.equal(stat.body.uid, 1000, 'the file was written as uid 1000');
    const unknown = await run({ command: 'true', user: 'nobody-here' });
    assert.equal(unknown.status, 400);
    assert.equal(unknown.error?.code, 'unknown_user');
    const badCwd = await run({ command: 'pwd', cwd: '/nope' });
    assert.equal(badCwd.error?.code, 'invalid_cwd');
  });

  test('a timeout kills the process with a clear status', async () => {
    const slow = await run({ command: ['/bin/sleep', '60'], timeoutSeconds: 1 });
    assert.deepEqual(slow.exit, { type: 'exit', exitCode: null, signal: 'SIGKILL', timedOut: true });
  });

  test('10 concurrent execs on one microVM', async () => {
    const results = await Promise.all(Array.from({ length: 10 }, (_, i) => run({ command: `sleep 0.$((${i} % 3)); echo job ${i}; exit ${i}` })));
    results.forEach((r, i) => {
      assert.equal(r.stdout, `job ${i}\n`);
      assert.equal(r.exit?.exitCode, i);
    });
  });

  test('files: a 100 MiB file up and down byte-exact, with the daemon memory bounded; no_space on a full disk', async () => {
    const size = 100 * 1024 * 1024;
    // The client runs in a child process: this process is the daemon alone. Its live memory
    // (after a forced GC, so that garbage does not count) must stay far below the file's size.
    v8.setFlagsFromString('--expose-gc');
    const gc = vmContext.runInNewContext('gc') as () => void;
    gc();
    const live = () => {
      const m = process.memoryUsage();
      return m.heapUsed + m.arrayBuffers;
    };
    const liveBefore = live();
    let livePeak = liveBefore;
    const rssBefore = process.memoryUsage().rss;
    let rssPeak = rssBefore;
    const sampler = setInterval(() => {
      gc();
      livePeak = Math.max(livePeak, live());
      rssPeak = Math.max(rssPeak, process.memoryUsage().rss);
    }, 250);
    let result: { up: number; upBody: unknown; sent: string; got: string; bytes: number; length: string };
    try {
      const out = await execFileAsync(process.execPath, [path.join(here, 'transfer-client.ts'), String(port), s.adminKey, vm, '/dev/shm/big', String(size)], { maxBuffer: 1024 * 1024 });
      result = JSON.parse(out.stdout.trim().split('\n').at(-1)!);
    } finally {
      clearInterval(sampler);
    }
    assert.equal(result.up, 201, JSON.stringify(result.upBody));
    assert.equal((result.upBody as { size: number }).size, size);
    assert.equal(result.length, String(size), 'content-length of the download');
    assert.equal(result.bytes, size);
    assert.equal(result.got, result.sent, 'byte-exact both ways');
    const growth = (livePeak - liveBefore) / 2 ** 20;
    const rssGrowth = (rssPeak - rssBefore) / 2 ** 20;
    console.log(`# daemon while streaming 100 MiB up and down: live memory +${growth.toFixed(1)} MiB, RSS +${rssGrowth.toFixed(1)} MiB`);
    assert.ok(growth < 32, `the daemon's live memory (heap + buffers, after GC) grew by ${growth.toFixed(1)} MiB while streaming 100 MiB`);
    assert.ok(rssGrowth < 64, `the daemon's RSS grew by ${rssGrowth.toFixed(1)} MiB while streaming 100 MiB`);
    await run({ command: ['/bin/busybox', 'rm', '/dev/shm/big'] });
    const full = await upload(port, s.adminKey, vm, '/data/too-big', patternStream(100 * 1024 * 1024, 3));
    assert.equal(full.status, 507, JSON.stringify(full.body));
    assert.equal(full.body.error.code, 'no_space');
    const left = await s.api('GET', `/microvms/${vm}/files/list?path=/data`);
    assert.deepEqual(left.body.items, [], 'nothing of the failed upload is left');
  });

  test('files: stat, list, mkdir, rename, chmod, remove, and clear errors', async () => {
    const mk = await s.api('POST', `/microvms/${vm}/files/mkdir`, { path: '/tmp/a/b/c', parents: true, mode: '0750' });
    assert.equal(mk.status, 201, JSON.stringify(mk.body));
    assert.equal(mk.body.type, 'directory');
    assert.equal(mk.body.mode, '0750');
    assert.equal((await upload(port, s.adminKey, vm, '/tmp/a/b/c/f.txt', Buffer.from('hi'))).status, 201);
    const list = await s.api('GET', `/microvms/${vm}/files/list?path=/tmp/a/b/c`);
    assert.deepEqual(list.body.items.map((i: { name: string; size: number }) => [i.name, i.size]), [['f.txt', 2]]);
    const moved = await s.api('POST', `/microvms/${vm}/files/rename`, { from: '/tmp/a/b/c/f.txt', to: '/tmp/a/g.txt' });
    assert.equal(moved.status, 200);
    assert.equal(moved.body.path, '/tmp/a/g.txt');
    const ch = await s.api('POST', `/microvms/${vm}/files/chmod`, { path: '/tmp/a/g.txt', mode: '0600', uid: 1000, gid: 1000 });
    assert.deepEqual([ch.body.mode, ch.body.uid, ch.body.gid], ['0600', 1000, 1000]);
    assert.equal((await s.api('POST', `/microvms/${vm}/files/remove`, { path: '/tmp/a' })).body.error.code, 'directory_not_empty');
    assert.equal((await s.api('POST', `/microvms/${vm}/files/remove`, { path: '/tmp/a', recursive: true })).status, 204);
    const gone = await s.api('GET', `/microvms/${vm}/files/stat?path=/tmp/a`);
    assert.equal(gone.status, 404);
    assert.equal(gone.body.error.code, 'file_not_found');
    const dir = await download(port, s.adminKey, vm, '/tmp');
    dir.resume();
    assert.equal(dir.statusCode, 400);
    for (const bad of ['relative/path', '/a\u0000b', `/${'x'.repeat(5000)}`]) {
      const r = await s.api('GET', `/microvms/${vm}/files/stat?path=${encodeURIComponent(bad)}`);
      assert.equal(r.status, 400, bad.slice(0, 20));
    }
  });

  test('a directory watch reports changes as they happen', async () => {
    assert.equal((await s.api('POST', `/microvms/${vm}/files/mkdir`, { path: '/tmp/watched' })).status, 201);
    const res = await new Promise<import('node:http').IncomingMessage>((resolve, reject) => {
      const req = http.request({ host: '127.0.0.1', port, path: `/api/v1/microvms/${vm}/files/watch?path=/tmp/watched`, headers: { authorization: `Bearer ${s.adminKey}` }, agent: false }, resolve);
      req.on('error', reject);
      req.end();
    });
    assert.equal(res.statusCode, 200);
    const events: Array<{ type: string; name?: string }> = [];
    let buffer = '';
    res.on('data', (chunk: Buffer) => {
      buffer += chunk.toString();
      let nl: number;
      while ((nl = buffer.indexOf('\n')) >= 0) {
        events.push(JSON.parse(buffer.slice(0, nl)));
        buffer = buffer.slice(nl + 1);
      }
    });
    const seen = (type: string, name: string) => events.some((e) => e.type === type && e.name === name);
    const until = async (type: string, name: string) => {
      for (let i = 0; i < 300 && !seen(type, name); i++) await new Promise((r) => setTimeout(r, 100));
      assert.ok(seen(type, name), `no ${type} ${name}: ${JSON.stringify(events)}`);
    };
    await new Promise((r) => setTimeout(r, 200));
    assert.equal((await upload(port, s.adminKey, vm, '/tmp/watched/f.txt', Buffer.from('x'))).status, 201);
    await until('rename_to', 'f.txt');
    await run({ command: '/bin/busybox rm /tmp/watched/f.txt; /bin/busybox mkdir /tmp/watched/sub' });
    await until('remove', 'f.txt');
    await until('create', 'sub');
    assert.ok(events.some((e) => e.type === 'create' && e.name === 'sub' && (e as { isDir?: boolean }).isDir));
    res.destroy();
  });

  test("another tenant's microVM answers 404 to exec, files and the WebSocket", async () => {
    const e = await execCall(port, otherKey, vm, { command: 'true' });
    assert.equal(e.status, 404);
    assert.equal((await other('GET', `/microvms/${vm}/files/stat?path=/`)).status, 404);
    assert.equal((await other('GET', `/microvms/${vm}/processes`)).status, 404);
    const up = await upload(port, otherKey, vm, '/tmp/x', Buffer.from('x'));
    assert.equal(up.status, 404);
    const ws = await openWs(`ws://127.0.0.1:${port}/api/v1/microvms/${vm}/exec/ws`, { headers: { authorization: `Bearer ${otherKey}` }, start: { command: 'echo hi' } });
    await ws.closed;
    assert.equal(ws.messages[0]?.type, 'error');
    assert.equal((ws.messages[0]?.error as { code: string }).code, 'microvm_not_found');
  });

  test('the WebSocket: stdin, a PTY of the asked size, resize, Ctrl-C, exit status', async () => {
    const ws = await openWs(`ws://127.0.0.1:${port}/api/v1/microvms/${vm}/exec/ws`, { start: { apiKey: s.adminKey, command: ['/bin/sh'], tty: true, cols: 100, rows: 30 } });
    ws.send('/bin/busybox stty size\n');
    await ws.waitFor(/30 100/);
    ws.ws.send(JSON.stringify({ type: 'resize', cols: 120, rows: 40 }));
    ws.send('/bin/busybox stty size\n');
    await ws.waitFor(/40 120/);
    ws.send('sleep 60; echo slept\n');
    await new Promise((r) => setTimeout(r, 500));
    ws.send('\u0003'); // Ctrl-C interrupts the sleep in the guest
    ws.send('echo after $((6*7))\n');
    await ws.waitFor(/after 42/);
    assert.doesNotMatch(ws.output(), /\r\nslept\r\n/, 'the sleep was interrupted');
    ws.send('exit 5\n');
    const closed = await ws.closed;
    assert.equal(closed.code, 1000);
    assert.deepEqual(ws.messages.at(-1), { type: 'exit', exitCode: 5, signal: null, timedOut: false });
    // Pipes, not a PTY: stdout and stderr apart, stdin closed with eof.
    const pipes = await openWs(`ws://127.0.0.1:${port}/api/v1/microvms/${vm}/exec/ws`, { headers: { authorization: `Bearer ${s.adminKey}` }, start: { command: 'cat; echo e >&2' } });
    pipes.send('typed\n');
    await pipes.waitFor(/typed/);
    pipes.ws.send(JSON.stringify({ type: 'eof' }));
    await pipes.closed;
    assert.equal(pipes.messages.at(-1)?.exitCode, 0);
  });

  test('a shell token opens a PTY through the gateway; http, expired and revoked tokens are refused', async () => {
    const issued = await s.api('POST', `/microvms/${vm}/tokens`, { scope: 'shell', expirationMinutes: 5 });
    assert.equal(issued.status, 201);
    assert.equal(issued.body.scope, 'shell');
    const url = `ws://127.0.0.1:${s.gatewayPort}/.cocoon/shell`;
    const host = `${vm}.vm.localhost:${s.gatewayPort}`;
    const shell = await openWs(url, { headers: { host, 'x-cocoon-token': issued.body.token }, start: { cols: 90, rows: 20 } });
    shell.send('echo $((6*7)); /bin/busybox stty size\n');
    await shell.waitFor(/42[\s\S]*20 90/);
    shell.send('exit\n');
    await shell.closed;
    // A browser: the token as a subprotocol.
    const browser = await openWs(url, { headers: { 'x-cocoon-microvm': vm }, protocols: [`cocoon.token.${issued.body.token}`], start: { command: ['/bin/echo', 'via subprotocol'] } });
    await browser.closed;
    assert.match(browser.output(), /via subprotocol/);
    // A shell token makes no app requests; an http token opens no shell.
    const app = await gatewayRequest(s.gatewayPort, vm, issued.body.token, '/');
    assert.equal(app.status, 403);
    assert.equal(JSON.parse(app.body).error.code, 'token_scope');
    const http = await s.api('POST', `/microvms/${vm}/tokens`, {});
    await assert.rejects(openWs(url, { headers: { host, 'x-cocoon-token': http.body.token }, start: {} }), (e: { status?: number }) => e.status === 403);
    // Revoked and expired.
    assert.equal((await s.api('DELETE', `/microvms/${vm}/tokens/${issued.body.id}`)).status, 204);
    await assert.rejects(openWs(url, { headers: { host, 'x-cocoon-token': issued.body.token }, start: {} }), (e: { status?: number }) => e.status === 401);
    const old = await createToken(s.server.db, { microvmId: vm, tenantId: s.adminTenantId, scope: 'shell', expirationMinutes: 1, now: new Date(Date.now() - 120_000) });
    await assert.rejects(openWs(url, { headers: { host, 'x-cocoon-token': old.secret }, start: {} }), (e: { status?: number }) => e.status === 401);
    // Another tenant's microVM: its own tokens only (a token for vm names vm; the other tenant cannot issue one).
    assert.equal((await other('POST', `/microvms/${vm}/tokens`, { scope: 'shell' })).status, 404);
  });

  test('a background process survives suspend and resume with its state; exec on a SUSPENDED microVM wakes it; a suspend ends open sessions', async () => {
    const id = await start({ maxIdleDurationSeconds: 600 });
    const bg = await execCall(port, s.adminKey, id, { command: 'i=0; while true; do i=$((i+1)); echo $i > /tmp/ticks; sleep 0.1; done', background: true });
    assert.equal(bg.status, 201);
    const pid = (await s.api('GET', `/microvms/${id}/processes`)).body.items[0].pid;
    assert.ok(pid > 1);
    const before = Number((await execCall(port, s.adminKey, id, { command: 'sleep 0.5; cat /tmp/ticks' })).stdout);
    assert.ok(before > 0);
    // An open foreground session ends with reason "suspended" when the microVM is suspended.
    let sawStart!: () => void;
    const startedP = new Promise<void>((r) => (sawStart = r));
    const open = execCall(port, s.adminKey, id, { command: ['/bin/sleep', '120'] }, (e) => e.type === 'start' && sawStart());
    await startedP;
    const suspended = await s.api('POST', `/microvms/${id}/suspend`);
    assert.equal(suspended.status, 200, JSON.stringify(suspended.body));
    await waitState(id, 'SUSPENDED');
    const ended = await open;
    assert.deepEqual(ended.exit, { type: 'exit', exitCode: null, signal: null, timedOut: false, reason: 'suspended' });
    // exec wakes it, and the background process is the same one, still counting.
    const after = await execCall(port, s.adminKey, id, { command: 'sleep 0.5; cat /tmp/ticks' });
    assert.equal(after.status, 200);
    assert.ok(Number(after.stdout) > before, `ticks went on after the resume: ${before} → ${after.stdout}`);
    const list = await s.api('GET', `/microvms/${id}/processes`);
    assert.deepEqual(list.body.items.map((p: { pid: number }) => p.pid), [pid], 'the same background process, listed (the killed sleep is gone)');
    assert.equal((await s.api('GET', `/microvms/${id}`)).body.state, 'RUNNING');
    // Its output can be attached, its stdin written, and it can be signalled.
    assert.equal((await s.api('POST', `/microvms/${id}/processes/${pid}/signal`, { signal: 'SIGKILL' })).status, 204);
    await new Promise((r) => setTimeout(r, 300));
    assert.deepEqual((await s.api('GET', `/microvms/${id}/processes`)).body.items, []);
  });

  test('an open session keeps idle suspend away; the microVM suspends once it ends', async () => {
    const id = await start({ maxIdleDurationSeconds: 1 });
    const r = await execCall(port, s.adminKey, id, { command: ['/bin/sleep', '4'] });
    assert.deepEqual(r.exit, { type: 'exit', exitCode: 0, signal: null, timedOut: false }, 'not cut by the idle timer');
    await waitState(id, 'SUSPENDED');
  });

  test('a guest that kills its agent and floods the channel with garbage loses only its own exec; the daemon and other microVMs go on', async () => {
    const hostile = await start();
    // As root in the guest: kill the agent (the parent of this shell) and write random bytes
    // into the agent's port for as long as the port is held.
    const script = [
      'for d in /sys/class/virtio-ports/*; do [ "$(cat $d/name)" = cocoon.agent ] && dev=/dev/${d##*/}; done',
      'kill -9 $PPID',
      'exec cat /dev/urandom > $dev',
    ].join('; ');
    const flood = await execCall(port, s.adminKey, hostile, { command: script, background: true });
    assert.equal(flood.status, 201, JSON.stringify(flood));
    await new Promise((r) => setTimeout(r, 1000));
    const answer = await execCall(port, s.adminKey, hostile, { command: 'echo hi' });
    assert.ok(answer.status >= 500 || answer.error !== undefined, `the hostile microVM's exec fails cleanly: ${JSON.stringify(answer)}`);
    assert.match(answer.error?.code ?? '', /^agent_/);
    // Everyone else is served as before.
    const ok = await run({ command: 'echo still here' });
    assert.equal(ok.stdout, 'still here\n');
    assert.equal((await s.api('GET', '/health')).status, 200);
    assert.equal((await s.api('GET', `/microvms/${hostile}`)).body.state, 'RUNNING');
  });

  test('an unknown microVM is a 404', async () => {
    const r = await execCall(port, s.adminKey, 'mvm-nope', { command: 'true' });
    assert.equal(r.status, 404);
    assert.equal(r.error?.code, 'microvm_not_found');
  });
});
