/**
 * `cocoon` run as a user runs it (bin/cocoon, a child process, a clean environment) against a
 * real server: configuration from flags, environment and the data directory; tenants and API
 * keys; `--json` output; error exits (bad key, unknown id, invalid input, unreachable server,
 * no key). The image and microVM subcommands are driven in flow.test.ts.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { busyboxFolder, closedPort, cocoon, imageRoutesMissing, startTestServer, tempDir, type TestServer } from './helpers.ts';

let server: TestServer;
let flags: string[];

before(async () => {
  server = await startTestServer();
  flags = ['--api-url', server.url, '--api-key', server.adminKey];
});
after(async () => {
  await server?.close();
});

const EXIT = { ok: 0, failure: 1, usage: 2, notFound: 3, auth: 4, conflict: 5, unreachable: 6, timeout: 7 };

describe('cocoon CLI: configuration', () => {
  it('prints help with the exit codes, for every command (exit 0)', async () => {
    const top = await cocoon(['--help']);
    assert.equal(top.code, 0);
    assert.match(top.stdout, /Exit codes: 0 ok, 1 failure, 2 usage/);
    for (const command of ['serve', 'health', 'bundle', 'bundle push', 'image', 'image create', 'image list', 'image get', 'image logs',
      'image delete', 'vm', 'vm start', 'vm list', 'vm get', 'vm suspend', 'vm resume', 'vm fork', 'vm checkpoint', 'vm terminate', 'vm token', 'vm curl', 'vm logs', 'vm exec', 'vm cp', 'vm shell',
      'tenant create', 'tenant list', 'apikey create', 'apikey list', 'apikey revoke']) {
      const help = await cocoon([...command.split(' '), '--help']);
      assert.equal(help.code, 0, command);
      assert.match(help.stdout, /Usage: cocoon /, command);
    }
  });

  it('finds the server and the admin key from flags, environment, or the data directory', async () => {
    const byFlags = await cocoon([...flags, 'apikey', 'list', '--json']);
    assert.equal(byFlags.code, 0, byFlags.stderr);
    assert.equal(byFlags.json.items[0].name, 'admin');

    const byEnv = await cocoon(['apikey', 'list', '--json'], { env: { COCOON_API_URL: server.url, COCOON_API_KEY: server.adminKey } });
    assert.equal(byEnv.code, 0, byEnv.stderr);

    // The server wrote its URL next to the admin key: a data directory is enough.
    const byDataDir = await cocoon(['--data-dir', server.dataDir, 'apikey', 'list', '--json']);
    assert.equal(byDataDir.code, 0, byDataDir.stderr);
    const byDataDirEnv = await cocoon(['apikey', 'list', '--json'], { env: { COCOON_DATA_DIR: server.dataDir } });
    assert.equal(byDataDirEnv.code, 0, byDataDirEnv.stderr);

    // ./.cocoon in the working directory, as after `npm start` in a checkout.
    const cwd = tempDir();
    try {
      fs.symlinkSync(server.dataDir, path.join(cwd, '.cocoon'));
      const local = await cocoon(['health'], { cwd });
      assert.equal(local.code, 0, local.stderr);
      assert.match(local.stdout, /status: +ok/);
      assert.match(local.stdout, new RegExp(`api key: +from ${cwd.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}/.cocoon/admin-api-key`));
    } finally {
      fs.rmSync(cwd, { recursive: true, force: true });
    }

    // Flags beat the environment.
    const mixed = await cocoon([...flags, 'apikey', 'list', '--json'], { env: { COCOON_API_URL: 'http://127.0.0.1:9', COCOON_API_KEY: 'cocoon_ak_wrong' } });
    assert.equal(mixed.code, 0, mixed.stderr);
  });

  it('reports health as text and as JSON', async () => {
    const text = await cocoon(['--api-url', server.url, 'health']);
    assert.equal(text.code, 0);
    assert.match(text.stdout, /status: +ok/);
    assert.match(text.stdout, /api key: +none found/);
    const json = await cocoon(['--api-url', server.url, 'health', '--json']);
    assert.equal(json.code, 0);
    assert.equal(json.json.status, 'ok');
    assert.equal(json.json.apiUrl, server.url);
    assert.equal(json.json.info.gateway.domain, 'vm.localhost');
  });
});

describe('cocoon CLI: tenants and API keys', () => {
  it('creates a tenant whose key then manages its own keys', async () => {
    const human = await cocoon([...flags, 'tenant', 'create', 'cli-acme']);
    assert.equal(human.code, 0, human.stderr);
    assert.match(human.stdout, /✓ Tenant cli-acme \(tnt-/);
    const key = /API key \(shown once, keep it safe\): (cocoon_ak_\S+)/.exec(human.stdout)?.[1];
    assert.ok(key, human.stdout);
    assert.match(human.stdout, /COCOON_API_KEY=cocoon_ak_\S+ cocoon image list/, 'says what to do next');

    const json = await cocoon([...flags, 'tenant', 'create', 'cli-globex', '--json']);
    assert.equal(json.code, 0);
    assert.equal(json.json.name, 'cli-globex');
    assert.match(json.json.apiKey, /^cocoon_ak_/);

    const listed = await cocoon([...flags, 'tenant', 'list', '--json']);
    assert.deepEqual(listed.json.items.map((t: { name: string }) => t.name).slice(0, 2), ['cli-globex', 'cli-acme']);
    const table = await cocoon([...flags, 'tenant', 'list']);
    assert.match(table.stdout, /^ID +NAME +ACCOUNT +ADMIN +CREATED$/m);
    assert.match(table.stdout, /cli-acme/);

    const tenant = ['--api-url', server.url, '--api-key', key!];
    const made = await cocoon([...tenant, 'apikey', 'create', '--name', 'ci', '--json']);
    assert.equal(made.code, 0, made.stderr);
    assert.equal(made.json.name, 'ci');
    const keys = await cocoon([...tenant, 'apikey', 'list', '--json']);
    assert.deepEqual(keys.json.items.map((k: { name: string }) => k.name), ['ci', 'initial']);
    const keyTable = await cocoon([...tenant, 'apikey', 'ls']);
    assert.match(keyTable.stdout, /ci +cocoon_ak_[\w-]+… .* active/);
    const revoked = await cocoon([...tenant, 'apikey', 'revoke', made.json.id]);
    assert.equal(revoked.code, 0, revoked.stderr);
    assert.match(revoked.stdout, /Revoked API key key-/);
    const gone = await cocoon(['--api-url', server.url, '--api-key', made.json.apiKey, 'apikey', 'list']);
    assert.equal(gone.code, EXIT.auth);

    const forAcme = await cocoon([...flags, 'apikey', 'create', '--tenant', json.json.id, '--name', 'from-admin', '--json']);
    assert.equal(forAcme.code, 0, forAcme.stderr);
    const notAdmin = await cocoon([...tenant, 'tenant', 'list']);
    assert.equal(notAdmin.code, EXIT.auth);
    assert.match(notAdmin.stderr, /only the admin API key/);
    assert.match(notAdmin.stderr, /→ this needs the admin API key/);
    const exists = await cocoon([...flags, 'tenant', 'create', 'cli-acme', '--json']);
    assert.equal(exists.code, EXIT.conflict);
    assert.equal(exists.error.code, 'tenant_exists');
    const last = await cocoon([...tenant, 'apikey', 'revoke', keys.json.items[1].id, '--json']);
    assert.equal(last.code, EXIT.conflict, 'the last active key stays');
    assert.equal(last.error.code, 'last_api_key');
  });
});

describe('cocoon CLI: error exits', () => {
  it('a bad key exits 4 and says where the key came from', async () => {
    const human = await cocoon(['--api-url', server.url, '--api-key', 'cocoon_ak_nope', 'apikey', 'list']);
    assert.equal(human.code, EXIT.auth);
    assert.equal(human.stdout, '');
    assert.match(human.stderr, /^cocoon: this API key is unknown or revoked\n/);
    assert.match(human.stderr, /→ check the API key \(from --api-key\)/);
    const json = await cocoon(['--api-url', server.url, '--api-key', 'cocoon_ak_nope', 'image', 'list', '--json']);
    assert.equal(json.code, EXIT.auth);
    assert.deepEqual({ code: json.error.code, status: json.error.status, exitCode: json.error.exitCode }, { code: 'unauthenticated', status: 401, exitCode: 4 });
    const none = await cocoon(['--api-url', server.url, 'apikey', 'list', '--json']);
    assert.equal(none.code, EXIT.auth);
    assert.equal(none.error.code, 'no_api_key');
    assert.match(none.error.hint, /--api-key, set COCOON_API_KEY/);
  });

  it('an unknown id exits 3', async () => {
    const key = await cocoon([...flags, 'apikey', 'revoke', 'key-00000000000000000000000000', '--json']);
    assert.equal(key.code, EXIT.notFound);
    assert.equal(key.error.status, 404);
    const image = await cocoon([...flags, 'image', 'get', 'img-00000000000000000000000000']);
    assert.equal(image.code, EXIT.notFound, image.stderr);
    const vm = await cocoon([...flags, 'vm', 'get', 'mvm-00000000000000000000000000', '--json']);
    assert.equal(vm.code, EXIT.notFound, vm.stderr);
    if (server.has('GET', '/api/v1/microvms/:id')) assert.match(vm.error.hint, /cocoon vm list/);
    const token = await cocoon([...flags, 'vm', 'token', 'mvm-00000000000000000000000000']);
    assert.equal(token.code, EXIT.notFound, token.stderr);
  });

  it('invalid input exits 2: flags, values, arguments, and 400 answers', async () => {
    const cases: Array<[string[], RegExp]> = [
      [['image', 'create', 'x', './app', '--vcpus', '0'], /'--vcpus <n>' argument '0' is invalid/],
      [['image', 'create', 'x', './app', '--memory', 'lots'], /expected a whole number/],
      [['image', 'create', 'x'], /say what to build/],
      [['image', 'create', 'x', './a', '--bundle', 'cocoon://bundles/y'], /either \[source\] or --bundle/],
      [['image', 'list', '--state', 'SLEEPING'], /unknown image state SLEEPING/],
      [['vm', 'start'], /missing required argument 'image'/],
      [['vm', 'start', 'img-1', '--max-duration', '28801'], /from 1 to 28800/],
      [['vm', 'curl', 'mvm-1', '/', '-H', 'no colon'], /a header is 'Name: value'/],
      [['vm', 'token', 'mvm-1', '--expiration-minutes', '61'], /from 1 to 60/],
      [['vm', 'token', 'mvm-1', '--list', '--revoke', 'tok'], /--list or --revoke/],
      [['frobnicate'], /unknown command 'frobnicate'/],
      [['image', 'list', '--colour'], /unknown option '--colour'/],
      [['tenant', 'create', 'Not Valid!'], /name/],
    ];
    for (const [args, message] of cases) {
      const result = await cocoon([...flags, ...args]);
      assert.equal(result.code, EXIT.usage, `${args.join(' ')}: ${result.stderr}`);
      assert.match(result.stderr, message, args.join(' '));
    }
    const json = await cocoon([...flags, 'tenant', 'create', 'Not Valid!', '--json']);
    assert.equal(json.code, EXIT.usage);
    assert.equal(json.error.code, 'invalid_request');
  });

  it('an unreachable server exits 6 with what to do', async () => {
    const port = await closedPort();
    const result = await cocoon(['--api-url', `http://127.0.0.1:${port}`, '--api-key', 'cocoon_ak_x', 'image', 'list']);
    assert.equal(result.code, EXIT.unreachable);
    assert.match(result.stderr, /cannot reach the Cocoon API at http:\/\/127\.0\.0\.1:\d+ \(ECONNREFUSED\)/);
    assert.match(result.stderr, /→ start a server with `npm start`/);
    const health = await cocoon(['--api-url', `http://127.0.0.1:${port}`, 'health', '--json']);
    assert.equal(health.code, EXIT.unreachable);
    assert.equal(health.error.code, 'unreachable');
  });
});

describe('cocoon CLI: bundles', () => {
  it('pushes a folder and a .tar.gz, printing the URI for `image create`', async (t) => {
    if (!server.has('POST', '/api/v1/bundles')) {
      t.skip(imageRoutesMissing(server) ?? 'no POST /bundles');
      return;
    }
    const folder = busyboxFolder();
    try {
      const human = await cocoon([...flags, 'bundle', 'push', folder]);
      assert.equal(human.code, 0, human.stderr);
      assert.match(human.stdout, /Uploading .*…\nBundle checked and stored: cocoon:\/\/bundles\/[0-9a-f]{64}\.tar\.gz \(\d+ KiB\)/);
      assert.match(human.stdout, /Next: cocoon image create <name> cocoon:\/\//);
      const json = await cocoon([...flags, 'bundle', 'push', folder, '--json']);
      assert.equal(json.code, 0);
      assert.match(json.json.uri, /^cocoon:\/\/bundles\//);
      assert.match(json.json.sha256, /^[0-9a-f]{64}$/);
      const empty = tempDir();
      try {
        const refused = await cocoon([...flags, 'bundle', 'push', empty, '--json']);
        assert.equal(refused.code, EXIT.usage);
        assert.match(refused.error.message, /no Dockerfile/);
      } finally {
        fs.rmSync(empty, { recursive: true, force: true });
      }
    } finally {
      fs.rmSync(folder, { recursive: true, force: true });
    }
  });
});
