/**
 * The unmodified AWS SDK for JavaScript v3 (@aws-sdk/client-lambda-microvms, pinned in
 * devDependencies) drives a real Cocoon through the Lambda MicroVMs API: an image built from a
 * bundle by the real pipeline (buildah, FROM busybox, real QEMU), microVMs run, suspended, woken
 * by a request through the real gateway with X-aws-proxy-auth / X-aws-proxy-port, listed page by
 * page, terminated; AWS's HTTP hooks called in the guest with the run payload; another tenant's
 * ids refused. One server and one image build for the file. The guest runs the C test app on
 * 8080 (the app: /count keeps a counter in memory) and on 9000 (the hooks listener, /aws-hooks
 * shows the calls).
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { after, before, describe, test } from 'node:test';
import {
  ConflictException, CreateMicrovmAuthTokenCommand, CreateMicrovmImageCommand, CreateMicrovmShellAuthTokenCommand, DeleteMicrovmImageCommand,
  GetMicrovmCommand, GetMicrovmImageCommand, GetMicrovmImageVersionCommand, LambdaMicrovmsClient, ListMicrovmsCommand, ListTagsCommand,
  ResourceNotFoundException, ResumeMicrovmCommand, RunMicrovmCommand, SuspendMicrovmCommand, TerminateMicrovmCommand, paginateListMicrovms,
  type GetMicrovmCommandOutput,
} from '@aws-sdk/client-lambda-microvms';
import { awsModule } from '../../src/compat/aws/module.ts';
import type { RunningServer } from '../../src/server.ts';
import type { MicrovmModule } from '../../src/wiring/microvms.ts';
import { client, type Client } from '../images/helpers.ts';
import { startPlatform, stopPlatform, testAppBundle, type Platform } from '../support/fixtures.ts';
import { request } from '../support/server.ts';
import { tempDir } from '../support/vm.ts';

const SLOW = { timeout: 900_000 };
const HOOKS_PORT = 9000;
const PAYLOAD = '{"session": "s-42", "user": "ada"}';

interface Credentials {
  accessKeyId: string;
  secretAccessKey: string;
}

describe('the AWS SDK for JavaScript drives Cocoon through the Lambda MicroVMs API', () => {
  const dataDir = tempDir('cocoon-aws-js-');
  const scratch = tempDir('cocoon-aws-js-bundle-');
  let server: RunningServer;
  let platform: Platform | undefined;
  let microvms: MicrovmModule;
  let api: Client;
  let admin: Credentials;
  let other: Credentials;
  let lmv: LambdaMicrovmsClient;
  let imageArn: string;
  const started: string[] = [];

  const clientFor = (credentials: Credentials) => new LambdaMicrovmsClient({ endpoint: server.apiUrl, region: 'us-west-2', credentials, maxAttempts: 1 });

  /** A request through the gateway as an AWS client sends it: Host = the endpoint, the token in X-aws-proxy-auth. */
  function proxied(endpoint: string, route: string, headers: Record<string, string> = {}) {
    return request(microvms.gatewayPort, { path: route, headers: { host: endpoint, ...headers } });
  }

  async function waitFor(id: string, state: string): Promise<GetMicrovmCommandOutput> {
    for (let i = 0; i < 3000; i++) {
      const vm = await lmv.send(new GetMicrovmCommand({ microvmIdentifier: id }));
      if (vm.state === state) return vm;
      if (vm.state === 'TERMINATED') assert.fail(`microVM ${id} is TERMINATED: ${vm.stateReason}`);
      await new Promise((r) => setTimeout(r, 100));
    }
    assert.fail(`microVM ${id} never reached ${state}`);
  }

  async function run(input: Partial<ConstructorParameters<typeof RunMicrovmCommand>[0]> = {}) {
    const vm = await lmv.send(new RunMicrovmCommand({ imageIdentifier: imageArn, ...input }));
    started.push(vm.microvmId!);
    return vm;
  }

  before(async () => {
    platform = await startPlatform({ dataDir, surfaces: (images, modules) => [awsModule(images, modules)] });
    ({ server, microvms, api } = platform);
    const key = platform.adminKey;
    admin = { accessKeyId: (await api.get('/api-keys')).body.items[0].id, secretAccessKey: key };
    const tenant = await api.post('/tenants', { name: 'other' });
    assert.equal(tenant.status, 201, tenant.text);
    other = { accessKeyId: (await client(server.apiUrl, tenant.body.apiKey).get('/api-keys')).body.items[0].id, secretAccessKey: tenant.body.apiKey };
    lmv = clientFor(admin);

    // The bundle goes up through Cocoon's API (AWS would take an S3 URI); its URI is the code artifact.
    const upload = await api.uploadBundle(testAppBundle(scratch, { secondPort: HOOKS_PORT }));
    assert.equal(upload.status, 201, upload.text);
    const input = {
      name: 'counter',
      baseImageArn: 'arn:aws:lambda:us-west-2:aws:microvm-image:busybox',
      buildRoleArn: 'arn:aws:iam::123456789012:role/builder',
      description: 'the C test app',
      codeArtifact: { uri: upload.body.uri },
      resources: [{ minimumMemoryInMiB: 256 }],
      hooks: {
        port: HOOKS_PORT,
        microvmImageHooks: { ready: 'ENABLED' as const, readyTimeoutInSeconds: 120, validate: 'DISABLED' as const },
        microvmHooks: { run: 'ENABLED' as const, suspend: 'ENABLED' as const, resume: 'ENABLED' as const, terminate: 'ENABLED' as const, terminateTimeoutInSeconds: 5 },
      },
      tags: { project: 'cocoon' },
      clientToken: 'create-counter-1',
    };
    const created = await lmv.send(new CreateMicrovmImageCommand(input));
    assert.equal(created.state, 'CREATING');
    assert.equal(created.imageVersion, '1');
    assert.equal(created.name, 'counter');
    assert.deepEqual(created.hooks?.microvmHooks?.run, 'ENABLED');
    imageArn = created.imageArn!;
    // A retry with the same clientToken answers the same version; another request with it is a conflict.
    assert.equal((await lmv.send(new CreateMicrovmImageCommand(input))).imageVersion, '1');
    await assert.rejects(lmv.send(new CreateMicrovmImageCommand({ ...input, description: 'other' })), ConflictException);

    for (let i = 0; ; i++) {
      const image = await lmv.send(new GetMicrovmImageCommand({ imageIdentifier: imageArn }));
      if (image.state === 'CREATED') break;
      if (image.state !== 'CREATING') {
        const version = await lmv.send(new GetMicrovmImageVersionCommand({ imageIdentifier: imageArn, imageVersion: '1' }));
        assert.fail(`image is ${image.state}: ${version.stateReason}`);
      }
      assert.ok(i < 8500, 'the image builds within 850 s');
      await new Promise((r) => setTimeout(r, 100));
    }
  }, SLOW);

  after(async () => {
    for (const id of started) await microvms?.engine.terminate(id).catch(() => undefined);
    const leaked = await stopPlatform(platform, dataDir);
    fs.rmSync(scratch, { recursive: true, force: true });
    assert.deepEqual(leaked, [], 'no QEMU left');
  });

  test('the image: CREATED, its version SUCCESSFUL with what was asked, tags kept', async () => {
    const image = await lmv.send(new GetMicrovmImageCommand({ imageIdentifier: 'counter' }));
    assert.equal(image.latestActiveImageVersion, '1');
    assert.deepEqual(image.tags, { project: 'cocoon' });
    assert.ok(image.createdAt instanceof Date);
    const version = await lmv.send(new GetMicrovmImageVersionCommand({ imageIdentifier: imageArn, imageVersion: '1' }));
    assert.equal(version.state, 'SUCCESSFUL');
    assert.equal(version.status, 'ACTIVE');
    assert.equal(version.description, 'the C test app');
    assert.equal(version.buildRoleArn, 'arn:aws:iam::123456789012:role/builder');
    assert.deepEqual(version.resources, [{ minimumMemoryInMiB: 256 }]);
    assert.deepEqual(version.hooks?.microvmImageHooks, { ready: 'ENABLED', readyTimeoutInSeconds: 120, validate: 'DISABLED' });
    assert.deepEqual((await lmv.send(new ListTagsCommand({ Resource: imageArn }))).Tags, { project: 'cocoon' });
  });

  test('run, auth token, requests through the gateway, suspend, a request that wakes it with state kept, hooks with the payload', SLOW, async () => {
    const vm = await run({
      runHookPayload: PAYLOAD,
      idlePolicy: { maxIdleDurationSeconds: 600, suspendedDurationSeconds: 3600, autoResumeEnabled: true },
      maximumDurationInSeconds: 3600,
      clientToken: 'run-1',
    });
    assert.ok(vm.state === 'PENDING' || vm.state === 'RUNNING', vm.state);
    assert.equal(vm.imageArn, imageArn);
    assert.equal(vm.imageVersion, '1');
    assert.equal(vm.maximumDurationInSeconds, 3600);
    assert.deepEqual(vm.idlePolicy, { maxIdleDurationSeconds: 600, suspendedDurationSeconds: 3600, autoResumeEnabled: true });
    assert.equal(vm.endpoint, `${vm.microvmId}.vm.localhost:${microvms.gatewayPort}`);
    assert.ok(vm.startedAt instanceof Date);
    // The same clientToken again: the same microVM, nothing new started.
    assert.equal((await lmv.send(new RunMicrovmCommand({
      imageIdentifier: imageArn, runHookPayload: PAYLOAD, maximumDurationInSeconds: 3600, clientToken: 'run-1',
      idlePolicy: { maxIdleDurationSeconds: 600, suspendedDurationSeconds: 3600, autoResumeEnabled: true },
    }))).microvmId, vm.microvmId);
    const id = vm.microvmId!;
    await waitFor(id, 'RUNNING');

    const app = (await lmv.send(new CreateMicrovmAuthTokenCommand({ microvmIdentifier: id, expirationInMinutes: 10, allowedPorts: [{ port: 8080 }] }))).authToken!;
    assert.deepEqual(Object.keys(app), ['X-aws-proxy-auth']);
    const token = app['X-aws-proxy-auth']!;
    assert.equal((await proxied(vm.endpoint!, '/count', { 'x-aws-proxy-auth': token })).body.trim(), '1');
    assert.equal((await proxied(vm.endpoint!, '/count', { 'x-aws-proxy-auth': token, 'x-aws-proxy-port': '8080' })).body.trim(), '2');
    // The guest never sees the x-aws-proxy-* headers.
    const seen = await proxied(vm.endpoint!, '/headers', { 'x-aws-proxy-auth': token, 'x-aws-proxy-extra': 'secret' });
    assert.equal(seen.status, 200);
    assert.doesNotMatch(seen.body.toLowerCase(), /x-aws-proxy|cocoon_tk_/);
    // A port the token does not allow, a missing and a wrong token: 403, nothing reaches the guest.
    assert.equal((await proxied(vm.endpoint!, '/count', { 'x-aws-proxy-auth': token, 'x-aws-proxy-port': String(HOOKS_PORT) })).status, 403);
    assert.equal((await proxied(vm.endpoint!, '/count', { 'x-aws-proxy-auth': `${token}x` })).status, 403);

    // A token for a range of ports reaches the hooks listener: ready (build), then run with the payload.
    const hooks = (await lmv.send(new CreateMicrovmAuthTokenCommand({
      microvmIdentifier: id, expirationInMinutes: 5, allowedPorts: [{ range: { startPort: 9000, endPort: 9001 } }],
    }))).authToken!['X-aws-proxy-auth']!;
    const hookLog = async () => (await proxied(vm.endpoint!, '/aws-hooks', { 'x-aws-proxy-auth': hooks, 'x-aws-proxy-port': String(HOOKS_PORT) })).body.split('\n').filter(Boolean);
    assert.deepEqual(await hookLog(), ['ready ', `run ${PAYLOAD}`]);

    await lmv.send(new SuspendMicrovmCommand({ microvmIdentifier: id }));
    assert.equal((await waitFor(id, 'SUSPENDED')).state, 'SUSPENDED');
    // A request wakes it: memory as it was (the counter goes on).
    assert.equal((await proxied(vm.endpoint!, '/count', { 'x-aws-proxy-auth': token })).body.trim(), '3');
    assert.equal((await lmv.send(new GetMicrovmCommand({ microvmIdentifier: id }))).state, 'RUNNING');
    assert.deepEqual(await hookLog(), ['ready ', `run ${PAYLOAD}`, 'suspend ', 'resume ']);
    // Suspend and resume through the API.
    await lmv.send(new SuspendMicrovmCommand({ microvmIdentifier: id }));
    await waitFor(id, 'SUSPENDED');
    await lmv.send(new ResumeMicrovmCommand({ microvmIdentifier: id }));
    await waitFor(id, 'RUNNING');
    assert.equal((await proxied(vm.endpoint!, '/count', { 'x-aws-proxy-auth': token })).body.trim(), '4');

    const shell = await lmv.send(new CreateMicrovmShellAuthTokenCommand({ microvmIdentifier: id, expirationInMinutes: 5 }));
    assert.match(shell.authToken!['X-aws-proxy-auth']!, /^cocoon_tk_/);
  });

  test("another tenant's microVM answers ResourceNotFoundException to every operation", async () => {
    const id = started[0]!;
    const stranger = clientFor(other);
    for (const command of [
      new GetMicrovmCommand({ microvmIdentifier: id }),
      new SuspendMicrovmCommand({ microvmIdentifier: id }),
      new TerminateMicrovmCommand({ microvmIdentifier: id }),
      new CreateMicrovmAuthTokenCommand({ microvmIdentifier: id, expirationInMinutes: 1, allowedPorts: [{ allPorts: {} }] }),
      new RunMicrovmCommand({ imageIdentifier: imageArn }),
    ]) {
      await assert.rejects(stranger.send(command as never), ResourceNotFoundException, command.constructor.name);
    }
    assert.deepEqual((await stranger.send(new ListMicrovmsCommand({}))).items, []);
    assert.equal((await lmv.send(new GetMicrovmCommand({ microvmIdentifier: id }))).state, 'RUNNING', 'untouched');
  });

  test('ListMicrovms: several pages with maxResults, the paginator, the image filter', SLOW, async () => {
    await run();
    await run({ imageVersion: '1' });
    const ids = new Set(started);
    const first = await lmv.send(new ListMicrovmsCommand({ maxResults: 1 }));
    assert.equal(first.items!.length, 1);
    assert.ok(first.nextToken);
    const pages: string[][] = [];
    for await (const page of paginateListMicrovms({ client: lmv, pageSize: 1 }, {})) pages.push(page.items!.map((i) => i.microvmId!));
    assert.equal(pages.length, 3);
    assert.deepEqual(new Set(pages.flat()), ids);
    assert.deepEqual(pages.flat(), [...started].reverse(), 'newest first');
    const filtered = await lmv.send(new ListMicrovmsCommand({ imageIdentifier: 'counter', imageVersion: '1' }));
    assert.deepEqual(new Set(filtered.items!.map((i) => i.microvmId)), ids);
    assert.deepEqual((await lmv.send(new ListMicrovmsCommand({ imageIdentifier: 'counter', imageVersion: '2' }))).items, []);
  });

  test('terminate (idempotent); the image is deleted once nothing uses it', SLOW, async () => {
    await assert.rejects(lmv.send(new DeleteMicrovmImageCommand({ imageIdentifier: imageArn })), ConflictException, 'in use');
    for (const id of started) await lmv.send(new TerminateMicrovmCommand({ microvmIdentifier: id }));
    for (const id of started) {
      const vm = await waitFor(id, 'TERMINATED');
      assert.ok(vm.terminatedAt instanceof Date);
    }
    await lmv.send(new TerminateMicrovmCommand({ microvmIdentifier: started[0]! }));
    const token = await lmv.send(new CreateMicrovmAuthTokenCommand({ microvmIdentifier: started[0]!, expirationInMinutes: 1, allowedPorts: [{ allPorts: {} }] })).catch((e: unknown) => e);
    assert.ok(token instanceof ConflictException, 'a terminated microVM takes no tokens');
    assert.equal((await lmv.send(new DeleteMicrovmImageCommand({ imageIdentifier: imageArn }))).state, 'DELETED');
    await assert.rejects(lmv.send(new GetMicrovmImageCommand({ imageIdentifier: imageArn })), ResourceNotFoundException);
  });
});
