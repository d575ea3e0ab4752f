/**
 * The SDK against a real server (health, info, tenants, API keys, errors) and against small
 * fake servers for what a real one will not do on demand (hang, stream a log in odd chunks,
 * answer through a proxy's error page). The image and microVM flows are in flow.test.ts.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { Readable } from 'node:stream';
import { after, before, describe, it } from 'node:test';
import {
  AuthenticationError,
  Cocoon,
  CocoonApiError,
  CocoonConnectionError,
  CocoonError,
  CocoonTimeoutError,
  collect,
  ConflictError,
  gatewayTarget,
  InvalidRequestError,
  isCocoonApiError,
  NotFoundError,
  normalizeApiUrl,
  PermissionError,
  UnavailableError,
  type CreatedApiKey,
} from '../../packages/sdk/src/index.ts';
import { gzip, tarStream } from '../../packages/sdk/src/tar.ts';
import { closedPort, fakeServer, repo, run, startTestServer, tempDir, writeTree, type TestServer } from './helpers.ts';

let server: TestServer;
let admin: Cocoon;

before(async () => {
  server = await startTestServer();
  admin = new Cocoon({ apiUrl: server.url, apiKey: server.adminKey });
});
after(async () => {
  await server?.close();
});

describe('SDK against a real server', () => {
  it('checks health and reads public info without a key', async () => {
    const anonymous = new Cocoon({ apiUrl: `${server.url}/api/v1/` });
    assert.equal(anonymous.apiUrl, server.url);
    assert.deepEqual(await anonymous.health(), { status: 'ok' });
    const info = await anonymous.info();
    assert.equal(info.region, 'local-1');
    assert.equal(info.gateway.domain, 'vm.localhost');
    await assert.rejects(anonymous.apiKeys.list(), (e: unknown) => e instanceof CocoonError && /no API key/.test(e.message));
  });

  it('reads its settings from COCOON_API_URL and COCOON_API_KEY', async () => {
    const saved = { url: process.env.COCOON_API_URL, key: process.env.COCOON_API_KEY };
    process.env.COCOON_API_URL = server.url;
    process.env.COCOON_API_KEY = server.adminKey;
    try {
      const fromEnv = new Cocoon();
      assert.equal(fromEnv.apiUrl, server.url);
      const page = await fromEnv.apiKeys.list();
      assert.equal(page.items.length, 1);
    } finally {
      for (const [name, value] of [['COCOON_API_URL', saved.url], ['COCOON_API_KEY', saved.key]] as const) {
        if (value === undefined) delete process.env[name];
        else process.env[name] = value;
      }
    }
  });

  it('creates tenants (admin only) whose keys work, and lists them page by page', async () => {
    const created = await admin.tenants.create({ name: 'sdk-acme' });
    assert.match(created.id, /^tnt-/);
    assert.match(created.apiKey, /^cocoon_ak_/);
    assert.match(created.accountId, /^\d{12}$/);
    const acme = new Cocoon({ apiUrl: server.url, apiKey: created.apiKey });
    assert.equal((await acme.apiKeys.list()).items.length, 1);

    await assert.rejects(acme.tenants.create({ name: 'sneaky' }), (e: unknown) => {
      assert.ok(e instanceof PermissionError);
      assert.equal(e.status, 403);
      assert.equal(e.kind, 'forbidden');
      assert.equal(e.code, 'forbidden');
      return true;
    });
    await assert.rejects(admin.tenants.create({ name: 'sdk-acme' }), (e: unknown) => e instanceof ConflictError && e.code === 'tenant_exists');
    await assert.rejects(admin.tenants.create({ name: 'Bad Name' }), (e: unknown) => {
      assert.ok(e instanceof InvalidRequestError);
      assert.equal(e.code, 'invalid_request');
      assert.equal(e.request, 'POST /api/v1/tenants');
      return true;
    });

    for (const name of ['sdk-b', 'sdk-c', 'sdk-d']) await admin.tenants.create({ name });
    const first = await admin.tenants.list({ limit: 2 });
    assert.equal(first.items.length, 2);
    assert.ok(first.nextCursor);
    const all = await collect(admin.tenants.iterate({ limit: 2 }));
    const names = all.map((t) => t.name);
    assert.equal(new Set(all.map((t) => t.id)).size, all.length, 'no tenant twice across pages');
    for (const name of ['admin', 'sdk-acme', 'sdk-b', 'sdk-c', 'sdk-d']) assert.ok(names.includes(name), name);
    assert.deepEqual(names.slice(0, 3), ['sdk-d', 'sdk-c', 'sdk-b'], 'newest first');
    await assert.rejects(acme.tenants.list(), PermissionError);
  });

  it('manages API keys: create, list, paginate, revoke; a revoked key stops working at once', async () => {
    const tenant = await admin.tenants.create({ name: 'sdk-keys' });
    const client = new Cocoon({ apiUrl: server.url, apiKey: tenant.apiKey });
    const made: CreatedApiKey[] = [];
    for (const name of ['ci', 'laptop', 'notebook']) made.push(await client.apiKeys.create({ name }));
    assert.equal(made[0]!.name, 'ci');
    assert.match(made[0]!.apiKey, /^cocoon_ak_/);
    assert.ok(made[0]!.apiKey.startsWith(made[0]!.prefix));
    const listed = await collect(client.apiKeys.iterate({ limit: 2 }));
    assert.equal(listed.length, 4);
    assert.deepEqual(listed.slice(0, 3).map((k) => k.name), ['notebook', 'laptop', 'ci']);
    assert.ok(listed.every((k) => !('apiKey' in k)), 'lists never show secrets');

    const ci = new Cocoon({ apiUrl: server.url, apiKey: made[0]!.apiKey });
    assert.equal((await ci.apiKeys.list()).items.length, 4);
    await client.apiKeys.revoke(made[0]!.id);
    await assert.rejects(ci.apiKeys.list(), (e: unknown) => e instanceof AuthenticationError && e.status === 401 && e.code === 'unauthenticated');
    await assert.rejects(client.apiKeys.revoke(made[0]!.id), NotFoundError);
    assert.ok((await client.apiKeys.list()).items.find((k) => k.id === made[0]!.id)?.revokedAt);

    // Another tenant's key id is answered like a missing one.
    const other = await admin.tenants.create({ name: 'sdk-keys-other' });
    const otherClient = new Cocoon({ apiUrl: server.url, apiKey: other.apiKey });
    await assert.rejects(otherClient.apiKeys.revoke(made[1]!.id), (e: unknown) => isCocoonApiError(e, 'not_found') && e.code === 'api_key_not_found');

    // The admin makes keys for a tenant; the last active key cannot be revoked.
    const extra = await admin.tenants.createApiKey(other.id, { name: 'from-admin' });
    const extraClient = new Cocoon({ apiUrl: server.url, apiKey: extra.apiKey });
    const otherKeys = (await extraClient.apiKeys.list()).items;
    assert.equal(otherKeys.length, 2);
    await extraClient.apiKeys.revoke(otherKeys.find((k) => k.name === 'initial')!.id);
    await assert.rejects(extraClient.apiKeys.revoke(extra.id), (e: unknown) => e instanceof ConflictError && e.code === 'last_api_key');
    await assert.rejects(admin.tenants.createApiKey('tnt-00000000000000000000000000'), NotFoundError);
    await assert.rejects(extraClient.tenants.createApiKey(other.id), PermissionError);
    await assert.rejects(otherClient.apiKeys.list(), AuthenticationError, "the revoked initial key");
  });

  it('turns a wrong key into AuthenticationError and a bad URL into a clear error', async () => {
    const wrong = new Cocoon({ apiUrl: server.url, apiKey: 'cocoon_ak_thisisnotakey' });
    await assert.rejects(wrong.apiKeys.list(), (e: unknown) => {
      assert.ok(e instanceof AuthenticationError);
      assert.ok(e instanceof CocoonApiError && e instanceof CocoonError && e instanceof Error);
      assert.equal(e.kind, 'unauthenticated');
      assert.match(e.message, /unknown or revoked/);
      return true;
    });
    assert.throws(() => new Cocoon({ apiUrl: 'not a url' }), /not a URL/);
    assert.throws(() => new Cocoon({ apiUrl: 'ftp://x' }), /http/);
  });

  it('answers 404 NotFoundError for unknown ids on every id route the server has', async () => {
    const calls: Array<[string, Promise<unknown>]> = [['api key', admin.apiKeys.revoke('key-00000000000000000000000000')]];
    if (server.has('GET', '/api/v1/images/:id')) {
      calls.push(['image', admin.images.get('img-00000000000000000000000000')]);
      calls.push(['image by arn', admin.images.get('arn:cocoon:local-1:000000000000:microvm-image/none:1')]);
    }
    if (server.has('GET', '/api/v1/microvms/:id')) calls.push(['microvm', admin.microvms.get('mvm-00000000000000000000000000')]);
    for (const [what, call] of calls) await assert.rejects(call, NotFoundError, what);
  });
});

describe('SDK transport', () => {
  it('reports a server that is not there as CocoonConnectionError', async () => {
    const port = await closedPort();
    const client = new Cocoon({ apiUrl: `http://127.0.0.1:${port}`, apiKey: 'cocoon_ak_x' });
    await assert.rejects(client.health(), (e: unknown) => {
      assert.ok(e instanceof CocoonConnectionError);
      assert.match(e.message, /ECONNREFUSED/);
      assert.match(e.message, /is the server running/);
      return true;
    });
  });

  it('times out a request that hangs, and honours an AbortSignal', async () => {
    const hanging = await fakeServer(() => {
      // never answers
    });
    try {
      const client = new Cocoon({ apiUrl: hanging.url, apiKey: 'cocoon_ak_x', timeoutMs: 300 });
      await assert.rejects(client.images.list(), (e: unknown) => e instanceof CocoonTimeoutError && e.timeoutMs === 300 && /GET \/api\/v1\/images/.test(e.message));
      await assert.rejects(client.images.get('img-1', { timeoutMs: 100 }), (e: unknown) => e instanceof CocoonTimeoutError && e.timeoutMs === 100);
      const controller = new AbortController();
      const pending = new Cocoon({ apiUrl: hanging.url, apiKey: 'cocoon_ak_x', timeoutMs: 0 }).images.list({}, { signal: controller.signal });
      setTimeout(() => controller.abort(), 50);
      await assert.rejects(pending, (e: unknown) => (e as Error).name === 'AbortError');
      const reason = new Error('changed my mind');
      await assert.rejects(client.health({ signal: AbortSignal.abort(reason) }), (e: unknown) => e === reason);
    } finally {
      await hanging.close();
    }
  });

  it('maps a non-JSON error page to a typed error with the status', async () => {
    const proxy = await fakeServer((_req, res) => {
      res.writeHead(502, { 'content-type': 'text/html' }).end('<h1>Bad gateway</h1>');
    });
    try {
      const client = new Cocoon({ apiUrl: proxy.url, apiKey: 'cocoon_ak_x' });
      await assert.rejects(client.images.list(), (e: unknown) => {
        assert.ok(e instanceof UnavailableError);
        assert.equal(e.code, 'http_502');
        assert.equal(e.status, 502);
        assert.match(e.message, /Bad gateway/);
        return true;
      });
    } finally {
      await proxy.close();
    }
  });

  it('follows a log as lines, whatever the chunking, and stops when the consumer stops', async () => {
    let closedByClient = false;
    const logs = await fakeServer((req, res) => {
      assert.equal(req.headers.authorization, 'Bearer cocoon_ak_x');
      assert.match(req.url ?? '', /^\/api\/v1\/images\/img-1\/logs\?follow=1$/);
      res.writeHead(200, { 'content-type': 'text/plain; charset=utf-8' });
      const chunks = ['step 1/3: FR', 'OM busybox\nstep 2', '/3: COPY\r\n', 'é ünïcode', ' ✓\n', 'no newline at the end'];
      let i = 0;
      const timer = setInterval(() => {
        if (i < chunks.length) res.write(Buffer.from(chunks[i++]!));
        else if (req.url?.includes('follow')) {
          clearInterval(timer);
          res.end();
        }
      }, 10);
      res.on('close', () => {
        closedByClient = !res.writableFinished;
        clearInterval(timer);
      });
    });
    try {
      const client = new Cocoon({ apiUrl: logs.url, apiKey: 'cocoon_ak_x' });
      const lines = await collect(client.images.logs('img-1', { follow: true }));
      assert.deepEqual(lines, ['step 1/3: FROM busybox', 'step 2/3: COPY', 'é ünïcode ✓', 'no newline at the end']);
      const first = await collect(client.images.logs('img-1', { follow: true }), 1);
      assert.deepEqual(first, ['step 1/3: FROM busybox']);
      await new Promise((r) => setTimeout(r, 100));
      assert.equal(closedByClient, true, 'breaking out of the loop closes the stream');
    } finally {
      await logs.close();
    }
  });

  it('builds gateway targets: *.localhost through 127.0.0.1 with X-Cocoon-MicroVM, real hosts as they are', () => {
    const vm = { id: 'mvm-1', url: 'http://mvm-1.vm.localhost:7071' } as Parameters<typeof gatewayTarget>[0];
    assert.deepEqual(gatewayTarget(vm, '/x?y=1'), { url: 'http://127.0.0.1:7071/x?y=1', microvmHeader: true });
    assert.deepEqual(gatewayTarget({ ...vm, url: 'https://mvm-1.vms.example.com' }, 'a'), { url: 'https://mvm-1.vms.example.com/a', microvmHeader: false });
    assert.deepEqual(gatewayTarget(vm, '/', 'http://gw:81/'), { url: 'http://gw:81/', microvmHeader: true });
    assert.equal(normalizeApiUrl('http://h:7070/api/v1/'), 'http://h:7070');
    assert.equal(normalizeApiUrl('https://h/cocoon/'), 'https://h/cocoon');
  });
});

describe('SDK bundles', () => {
  /** A server that keeps what POST /bundles receives. */
  async function receiver() {
    const received: Array<{ type: string | undefined; body: Buffer }> = [];
    const fake = await fakeServer(async (req, res) => {
      const chunks: Buffer[] = [];
      for await (const chunk of req) chunks.push(chunk as Buffer);
      received.push({ type: req.headers['content-type'], body: Buffer.concat(chunks) });
      res.writeHead(201, { 'content-type': 'application/json' }).end(JSON.stringify({ uri: 'cocoon://bundles/x.tar.gz', sha256: '0'.repeat(64), sizeBytes: 1 }));
    });
    return { ...fake, received };
  }

  function listTar(archive: Buffer): Promise<string> {
    return new Promise((resolve, reject) => {
      const child = execFile('tar', ['-tvzf', '-'], (error, stdout) => (error ? reject(error) : resolve(stdout)));
      child.stdin!.end(archive);
    });
  }

  it('packs a folder into a tar.gz that GNU tar reads back: files, modes, folders, symlinks, long names', async () => {
    const dir = tempDir();
    const out = tempDir();
    const fake = await receiver();
    try {
      const longName = `${'deep/'.repeat(30)}${'n'.repeat(120)}.txt`;
      writeTree(dir, {
        Dockerfile: 'FROM busybox\n',
        'bin/run.sh': { content: '#!/bin/sh\necho hi\n', mode: 0o755 },
        'www/index.html': 'hello',
        'www/link': { symlink: 'index.html' },
        [longName]: 'long',
        'empty/.keep': '',
        'big.bin': 'x'.repeat(700_000),
      });
      const client = new Cocoon({ apiUrl: fake.url, apiKey: 'cocoon_ak_x' });
      const bundle = await client.bundles.push(dir);
      assert.equal(bundle.uri, 'cocoon://bundles/x.tar.gz');
      const sent = fake.received[0]!;
      assert.equal(sent.type, 'application/gzip');
      const listing = await listTar(sent.body);
      assert.match(listing, /-rwxr-xr-x .* bin\/run\.sh/);
      assert.match(listing, /lrwxrwxrwx .* www\/link -> index\.html/);
      assert.match(listing, / 700000 .* big\.bin/);
      assert.ok(listing.includes(longName), 'PAX long name survives');
      await new Promise<void>((resolve, reject) => {
        const child = execFile('tar', ['-xzf', '-', '-C', out], (error) => (error ? reject(error) : resolve()));
        child.stdin!.end(sent.body);
      });
      assert.equal(fs.readFileSync(path.join(out, longName), 'utf8'), 'long');
      assert.equal(fs.readFileSync(path.join(out, 'big.bin'), 'utf8').length, 700_000);
      assert.equal(fs.statSync(path.join(out, 'bin/run.sh')).mode & 0o777, 0o755);
      assert.equal(fs.readlinkSync(path.join(out, 'www/link')), 'index.html');
    } finally {
      await fake.close();
      fs.rmSync(dir, { recursive: true, force: true });
      fs.rmSync(out, { recursive: true, force: true });
    }
  });

  it('sends archives as they are (file, bytes, Blob, stream) with the type their first bytes say', async () => {
    const dir = tempDir();
    const fake = await receiver();
    try {
      writeTree(dir, { 'app/Dockerfile': 'FROM busybox\n' });
      const tgz = path.join(dir, 'app.tar.gz');
      await new Promise<void>((resolve, reject) => execFile('tar', ['-czf', tgz, '-C', path.join(dir, 'app'), '.'], (e) => (e ? reject(e) : resolve())));
      const zip = Buffer.from([0x50, 0x4b, 0x03, 0x04, 1, 2, 3]);
      const client = new Cocoon({ apiUrl: fake.url, apiKey: 'cocoon_ak_x' });
      await client.bundles.push(tgz);
      await client.bundles.push(new Uint8Array(zip));
      await client.bundles.push(new Blob([fs.readFileSync(tgz)]));
      await client.bundles.push(Readable.from([fs.readFileSync(tgz)]), { contentType: 'application/gzip' });
      await client.bundles.push(Readable.from([zip]));
      assert.deepEqual(fake.received.map((r) => r.type), ['application/gzip', 'application/zip', 'application/gzip', 'application/gzip', 'application/octet-stream']);
      assert.deepEqual(fake.received[0]!.body, fs.readFileSync(tgz));
      assert.deepEqual(fake.received[4]!.body, zip);
    } finally {
      await fake.close();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('refuses what is not a bundle before sending anything', async () => {
    const dir = tempDir();
    const fake = await receiver();
    try {
      writeTree(dir, { 'notes.txt': 'hello', 'nodocker/readme': 'x' });
      const client = new Cocoon({ apiUrl: fake.url, apiKey: 'cocoon_ak_x' });
      await assert.rejects(client.bundles.push(path.join(dir, 'notes.txt')), /not a \.tar\.gz or \.zip/);
      await assert.rejects(client.bundles.push(path.join(dir, 'nodocker')), /no Dockerfile/);
      await assert.rejects(client.bundles.push(path.join(dir, 'missing')), /ENOENT/);
      await assert.rejects(client.bundles.push(new Uint8Array([1, 2, 3])), /not a \.tar\.gz or \.zip/);
      assert.equal(fake.received.length, 0);
    } finally {
      await fake.close();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('writes ustar that round-trips through gzip for entries of every kind', async () => {
    const entries = [
      { type: 'directory' as const, name: 'a', mode: 0o755, mtime: 1_700_000_000 },
      { type: 'file' as const, name: 'a/b.txt', mode: 0o644, mtime: 1_700_000_000, size: 3, content: Readable.from([Buffer.from('abc')]) },
    ];
    const chunks: Uint8Array[] = [];
    for await (const chunk of gzip(tarStream(entries))) chunks.push(chunk);
    const listing = await listTar(Buffer.concat(chunks));
    assert.match(listing, /drwxr-xr-x root\/root +0 2023-11-1\d \d\d:\d\d a\//);
    assert.match(listing, /-rw-r--r-- root\/root +3 .* a\/b\.txt/);
    const shrunk = [{ type: 'file' as const, name: 'x', mode: 0o644, mtime: 0, size: 5, content: Readable.from([Buffer.from('abc')]) }];
    await assert.rejects(collect(tarStream(shrunk)), /changed while it was being packed/);
  });
});

describe('SDK package', () => {
  it('compiles on its own into JavaScript and declarations that work without TypeScript', async () => {
    const out = tempDir();
    try {
      const pkg = JSON.parse(fs.readFileSync(path.join(repo, 'packages/sdk/package.json'), 'utf8'));
      assert.equal(pkg.name, '@cocoon/sdk');
      assert.deepEqual(Object.keys(pkg.dependencies ?? {}), [], 'no runtime dependencies');
      await run(path.join(repo, 'node_modules/.bin/tsc'), ['-p', path.join(repo, 'packages/sdk/tsconfig.json'), '--outDir', out]);
      assert.ok(fs.existsSync(path.join(out, 'index.d.ts')));
      fs.writeFileSync(path.join(out, 'package.json'), JSON.stringify({ type: 'module' }));
      const built = await import(path.join(out, 'index.js'));
      const client = new built.Cocoon({ apiUrl: `${server.url}/api/v1` });
      assert.deepEqual(await client.health(), { status: 'ok' });
      assert.match(fs.readFileSync(path.join(out, 'bundles.js'), 'utf8'), /import\("\.\/node-source\.js"\)/, 'relative imports point at .js');
    } finally {
      fs.rmSync(out, { recursive: true, force: true });
    }
  });
});
