/**
 * The real AWS clients for Python against a real Cocoon (issue 14, docs/aws.md): boto3 1.43.107
 * with botocore's own `lambda-microvms` 2025-09-09 model, and the AWS CLI with that model through
 * AWS_DATA_PATH, both from scripts/setup-aws-clients.sh (.cache/venv, .cache/aws-data). The boto3
 * flow lives in test/compat/aws_boto3_flow.py (one step a subtest here); the CLI flow runs `aws`
 * as a shell would. One server, two tenants and one image build (made by boto3) for the file.
 */
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { promisify } from 'node:util';
import { after, before, describe, test } from 'node:test';
import { loadConfig } from '../../src/config/config.ts';
import { awsModule } from '../../src/compat/aws/module.ts';
import { imagesModule } from '../../src/wiring/images.ts';
import { microvmModule } from '../../src/wiring/microvms.ts';
import { startServer, type RunningServer } from '../../src/server.ts';
import { client, type Client } from '../images/helpers.ts';
import { buildTestApp } from '../support/testapp.ts';
import { cleanupDir, tempDir } from '../support/vm.ts';

const run = promisify(execFile);
const ROOT = path.resolve(import.meta.dirname, '../..');
const PYTHON = path.join(ROOT, '.cache/venv/bin/python');
const AWS_DATA_PATH = path.join(ROOT, '.cache/aws-data');
const DRIVER = path.join(import.meta.dirname, 'aws_boto3_flow.py');
const SLOW = { timeout: 1_500_000 };
const APP_PORT = 8080;
const OTHER_PORT = 8081;
const PAYLOAD = '{"hello":"from boto3","n":42}';

/**
 * Steps that need a part of issue 14 that is not on main yet, each with the reason: reported as
 * TODO (they still run and show their outcome), not failed. Empty once everything has landed.
 */
const KNOWN_GAPS: Record<string, string> = {};

interface Credentials {
  keyId: string;
  key: string;
}

/** A tenant with its API key and that key's id (the AWS access key id). */
async function tenant(admin: Client, url: string, name: string): Promise<Credentials & { api: Client }> {
  const created = await admin.post('/tenants', { name });
  assert.equal(created.status, 201, created.text);
  const api = client(url, created.body.apiKey);
  const keys = await api.get('/api-keys');
  assert.equal(keys.status, 200, keys.text);
  const items = Array.isArray(keys.body) ? keys.body : keys.body.items;
  assert.equal(items.length, 1, keys.text);
  return { api, keyId: items[0].id, key: created.body.apiKey };
}

/** A GET with exactly these headers (fetch would not send our Host: the endpoint's host picks the microVM). */
function gatewayGet(url: string, headers: Record<string, string>): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const request = http.get(url, { headers }, (response) => {
      let body = '';
      response.setEncoding('utf8');
      response.on('data', (chunk) => (body += chunk));
      response.on('end', () => resolve({ status: response.statusCode ?? 0, body }));
      response.on('error', reject);
    });
    request.on('error', reject);
  });
}

/** The environment of the outside clients: nothing of this machine's AWS setup leaks in. */
function awsEnv(extra: Record<string, string>): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!/^AWS_|proxy$/i.test(k)) env[k] = v;
  return {
    ...env,
    AWS_CONFIG_FILE: '/nonexistent/aws-config',
    AWS_SHARED_CREDENTIALS_FILE: '/nonexistent/aws-credentials',
    AWS_EC2_METADATA_DISABLED: 'true',
    NO_PROXY: '*',
    PYTHONDONTWRITEBYTECODE: '1',
    ...extra,
  };
}

describe('boto3 and the AWS CLI drive Cocoon through the Lambda MicroVMs API', () => {
  const dataDir = tempDir('cocoon-aws-py-');
  let server: RunningServer;
  let gatewayUrl: string;
  let me: Credentials & { api: Client };
  let other: Credentials & { api: Client };
  let bundleUri: string;
  let facts: Record<string, any> = {};

  before(async () => {
    assert.ok(fs.existsSync(PYTHON), `${PYTHON} (made by npm run setup)`);
    const images = imagesModule();
    const microvms = microvmModule();
    server = await startServer({ ...loadConfig({ COCOON_DATA_DIR: dataDir }), apiPort: 0, gatewayPort: 0 }, [images, microvms, awsModule(images, microvms)]);
    gatewayUrl = `http://127.0.0.1:${microvms.gatewayPort}`;
    const admin = client(server.apiUrl, fs.readFileSync(path.join(dataDir, 'admin-api-key'), 'utf8').trim());
    me = await tenant(admin, server.apiUrl, 'py');
    other = await tenant(admin, server.apiUrl, 'other');
    // The code artifact: the C test app twice (the app port and a second port), answering AWS's
    // hooks on the app port (it logs them at GET /aws-hooks).
    const app = path.join(dataDir, 'app');
    fs.mkdirSync(app);
    fs.copyFileSync(buildTestApp(path.join(dataDir, 'testapp-build')), path.join(app, 'testapp'));
    fs.writeFileSync(
      path.join(app, 'Dockerfile'),
      ['FROM busybox', 'COPY testapp /testapp', `EXPOSE ${APP_PORT}`, `CMD ["/bin/sh", "-c", "/testapp ${OTHER_PORT} & exec /testapp ${APP_PORT}"]`, ''].join('\n'),
    );
    await run('tar', ['-czf', path.join(dataDir, 'app.tar.gz'), '-C', app, '.']);
    const upload = await me.api.uploadBundle(fs.readFileSync(path.join(dataDir, 'app.tar.gz')));
    assert.equal(upload.status, 201, upload.text);
    bundleUri = upload.body.uri;
  }, SLOW);

  after(async () => {
    await server?.close();
    assert.deepEqual(cleanupDir(dataDir), [], 'no QEMU left');
  });

  test('boto3: image from a bundle, run, tokens, gateway, suspend and wake, pages, tags, hooks, refusals, terminate', SLOW, async (t) => {
    const input = {
      api: server.apiUrl,
      gateway: gatewayUrl,
      keyId: me.keyId,
      key: me.key,
      otherKeyId: other.keyId,
      otherKey: other.key,
      bundleUri,
      imageName: 'boto3-flow',
      appPort: APP_PORT,
      otherPort: OTHER_PORT,
      hooksPort: APP_PORT,
      payload: PAYLOAD,
    };
    const child = spawn(PYTHON, [DRIVER], { env: awsEnv({ COCOON_AWS_FLOW: JSON.stringify(input) }), stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => {
      stderr += d;
      process.stderr.write(d); // progress, step by step
    });
    const killer = setTimeout(() => child.kill('SIGKILL'), SLOW.timeout - 60_000);
    const code = await new Promise<number | null>((resolve) => child.on('close', resolve));
    clearTimeout(killer);
    const line = stdout.split('\n').find((l) => l.startsWith('RESULT '));
    assert.ok(line, `the driver ended without a result (exit ${code}):\n${stderr.slice(-4000)}`);
    const result = JSON.parse(line.slice('RESULT '.length)) as { steps: Record<string, string>; facts: Record<string, any> };
    facts = result.facts;
    t.diagnostic(`driver facts: ${JSON.stringify(facts)}`);
    for (const [name, outcome] of Object.entries(result.steps)) {
      await t.test(name, KNOWN_GAPS[name] ? { todo: KNOWN_GAPS[name] } : {}, (st) => {
        if (outcome.startsWith('skipped')) return st.skip(outcome);
        assert.equal(outcome, 'ok');
      });
    }
    assert.ok(Object.keys(result.steps).length >= 18, 'every step ran or was reported');
    const failed = Object.entries(result.steps).filter(([name, outcome]) => outcome.startsWith('FAILED') && !KNOWN_GAPS[name]);
    assert.deepEqual(failed, [], 'every step passed (known gaps aside)');
    if (Object.keys(KNOWN_GAPS).length === 0) assert.equal(code, 0, 'the driver passed');
    assert.ok(facts.pages >= 3, `several pages (${facts.pages})`);
  });

  test('the AWS CLI (model through AWS_DATA_PATH): run-microvm, get, list, auth token, gateway, suspend, terminate', SLOW, async (t) => {
    assert.ok(facts.imageArn, 'the image boto3 built');
    // As docs/aws.md documents it: credentials and the model path in the environment.
    const env = awsEnv({
      AWS_DATA_PATH,
      AWS_ACCESS_KEY_ID: me.keyId,
      AWS_SECRET_ACCESS_KEY: me.key,
      AWS_DEFAULT_REGION: 'us-west-2',
      AWS_PAGER: '',
      AWS_MAX_ATTEMPTS: '1',
    });
    const aws = async (...args: string[]): Promise<any> => {
      const { stdout } = await run('aws', ['lambda-microvms', ...args, '--endpoint-url', server.apiUrl, '--output', 'json'], { env, timeout: 300_000 });
      return stdout.trim() ? JSON.parse(stdout) : {};
    };

    const help = await run('aws', ['lambda-microvms', 'help'], { env: { ...env, PAGER: 'cat', MANPAGER: 'cat' } });
    assert.match(help.stdout, /run-microvm/);

    const started = await aws(
      'run-microvm',
      '--image-identifier',
      facts.imageArn,
      '--idle-policy',
      'maxIdleDurationSeconds=600,suspendedDurationSeconds=600,autoResumeEnabled=true',
      '--run-hook-payload',
      'from the cli',
    );
    const id: string = started.microvmId;
    assert.ok(id);
    assert.ok(['PENDING', 'RUNNING'].includes(started.state), started.state);
    try {
      let state = started.state;
      for (let i = 0; i < 600 && state !== 'RUNNING'; i++) {
        await new Promise((r) => setTimeout(r, 500));
        state = (await aws('get-microvm', '--microvm-identifier', id)).state;
      }
      assert.equal(state, 'RUNNING');

      // The CLI walks every page itself; --page-size 1 makes it ask one item at a time.
      const listed = await aws('list-microvms', '--page-size', '1');
      assert.ok(listed.items.some((item: any) => item.microvmId === id), 'listed over pages');
      const firstPage = await aws('list-microvms', '--max-items', '1', '--page-size', '1');
      assert.equal(firstPage.items.length, 1);
      assert.ok(firstPage.NextToken, 'a token for the rest');

      const token = await aws('create-microvm-auth-token', '--microvm-identifier', id, '--expiration-in-minutes', '5', '--allowed-ports', 'port=8080');
      const value = token.authToken['X-aws-proxy-auth'];
      assert.ok(value);
      const name = 'CLI: the token through the gateway';
      await t.test(name, KNOWN_GAPS[name] ? { todo: KNOWN_GAPS[name] } : {}, async () => {
        const host = new URL(started.endpoint.includes('://') ? started.endpoint : `http://${started.endpoint}`).hostname;
        const call = (p: string) => gatewayGet(`${gatewayUrl}${p}`, { host, 'x-aws-proxy-auth': value, 'x-aws-proxy-port': String(APP_PORT) });
        assert.deepEqual(await call('/'), { status: 200, body: 'hello from testapp\n' });
        const hooks = await call('/aws-hooks');
        assert.match(hooks.body, /^run from the cli$/m, 'the run hook got --run-hook-payload');
      });

      await aws('suspend-microvm', '--microvm-identifier', id);
      for (let i = 0; i < 600 && state !== 'SUSPENDED'; i++) {
        state = (await aws('get-microvm', '--microvm-identifier', id)).state;
        if (state !== 'SUSPENDED') await new Promise((r) => setTimeout(r, 500));
      }
      assert.equal(state, 'SUSPENDED');
      await aws('resume-microvm', '--microvm-identifier', id);
      assert.ok(['PENDING', 'RUNNING'].includes((await aws('get-microvm', '--microvm-identifier', id)).state));
    } finally {
      await aws('terminate-microvm', '--microvm-identifier', id);
    }
    let final = '';
    for (let i = 0; i < 600 && final !== 'TERMINATED'; i++) {
      final = (await aws('get-microvm', '--microvm-identifier', id)).state;
      if (final !== 'TERMINATED') await new Promise((r) => setTimeout(r, 500));
    }
    assert.equal(final, 'TERMINATED');

    // A wrong secret: the CLI fails (254 on CLI v2, 255 on v1) with AWS's error code on stderr.
    await assert.rejects(
      run('aws', ['lambda-microvms', 'list-microvms', '--endpoint-url', server.apiUrl], { env: { ...env, AWS_SECRET_ACCESS_KEY: `${me.key}x` } }),
      (error: any) => {
        assert.ok([254, 255].includes(error.code), `exit ${error.code}: ${error.stderr}`);
        assert.match(error.stderr, /InvalidSignatureException/);
        return true;
      },
    );
  });
});
