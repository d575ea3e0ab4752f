/**
 * The AWS surface without VMs: the unmodified @aws-sdk/client-lambda-microvms against a real
 * Cocoon server (API, gateway, image service, real SQLite), with image rows walked to their
 * states in the store. Covers SigV4 (bad signature, expired, unknown key, a key that cannot
 * sign), the error classes the client raises, read operations, pagination and tenant isolation.
 * The whole flow with builds and microVMs is in aws-sdk-js.test.ts.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import {
  ConflictException, CreateMicrovmAuthTokenCommand, CreateMicrovmImageCommand, DeleteMicrovmImageCommand, DeleteMicrovmImageVersionCommand,
  ListTagsCommand, RunMicrovmCommand, TagResourceCommand, UntagResourceCommand, UpdateMicrovmImageVersionCommand,
  GetMicrovmCommand, GetMicrovmImageBuildCommand, GetMicrovmImageCommand, GetMicrovmImageVersionCommand, LambdaMicrovmsClient,
  ListManagedMicrovmImageVersionsCommand, ListManagedMicrovmImagesCommand, ListMicrovmImageBuildsCommand, ListMicrovmImageVersionsCommand,
  ListMicrovmImagesCommand, ListMicrovmsCommand, ResourceNotFoundException, ValidationException, paginateListMicrovmImages,
} from '@aws-sdk/client-lambda-microvms';
import { awsModule } from '../../src/compat/aws/module.ts';
import { loadConfig } from '../../src/config/config.ts';
import { imagesModule } from '../../src/wiring/images.ts';
import { microvmModule } from '../../src/wiring/microvms.ts';
import { startServer, type RunningServer } from '../../src/server.ts';
import { createApiKey } from '../../src/store/api-keys.ts';
import { createImage, transitionImage, type Image } from '../../src/store/images.ts';
import { findTenantByName } from '../../src/store/tenants.ts';
import { client as apiClient } from '../images/helpers.ts';
import { request } from '../support/server.ts';
import { cleanupDir, tempDir } from '../support/vm.ts';

interface Credentials {
  accessKeyId: string;
  secretAccessKey: string;
}

describe('the AWS Lambda MicroVMs surface (no VMs)', () => {
  const dataDir = tempDir('cocoon-aws-surface-');
  let server: RunningServer;
  let admin: Credentials;
  let other: Credentials;
  let adminAccount: string;
  const images: Image[] = [];

  const lmv = (credentials: Credentials, extra: Partial<ConstructorParameters<typeof LambdaMicrovmsClient>[0]> = {}) =>
    new LambdaMicrovmsClient({ endpoint: server.apiUrl, region: 'us-east-1', credentials, maxAttempts: 1, ...extra });

  async function walk(image: Image, to: 'READY' | 'FAILED' | 'BUILDING'): Promise<Image> {
    await transitionImage(server.db, image.id, 'PENDING', 'BUILDING');
    if (to === 'BUILDING') return image;
    if (to === 'FAILED') {
      await transitionImage(server.db, image.id, 'BUILDING', 'FAILED', { error: 'build_failed: the Dockerfile failed' });
      return image;
    }
    await transitionImage(server.db, image.id, 'BUILDING', 'BOOTING');
    await transitionImage(server.db, image.id, 'BOOTING', 'SNAPSHOTTING');
    await transitionImage(server.db, image.id, 'SNAPSHOTTING', 'READY', { artifacts: { snapshot: 'none' } });
    return image;
  }

  before(async () => {
    const microvms = microvmModule();
    const imgs = imagesModule();
    server = await startServer({ ...loadConfig({ COCOON_DATA_DIR: dataDir }), apiPort: 0, gatewayPort: 0 }, [imgs, microvms, awsModule(imgs, microvms)]);
    const adminKey = fs.readFileSync(path.join(dataDir, 'admin-api-key'), 'utf8').trim();
    const api = apiClient(server.apiUrl, adminKey);
    const keys = await api.get('/api-keys');
    admin = { accessKeyId: keys.body.items[0].id, secretAccessKey: adminKey };
    const tenant = await api.post('/tenants', { name: 'other' });
    assert.equal(tenant.status, 201, tenant.text);
    const otherKeys = await apiClient(server.apiUrl, tenant.body.apiKey).get('/api-keys');
    other = { accessKeyId: otherKeys.body.items[0].id, secretAccessKey: tenant.body.apiKey };
    const adminTenant = (await findTenantByName(server.db, 'admin'))!;
    adminAccount = adminTenant.accountId;
    const input = (name: string) => ({
      tenantId: adminTenant.id, region: server.config.region, name, bundleUri: `cocoon://bundles/${'0'.repeat(64)}.tar.gz`,
      vcpus: 1, memoryMiB: 256, diskMiB: 64, port: 8080, readiness: { httpPath: null, timeoutSeconds: 60 },
    });
    // web: v1 READY, v2 FAILED, v3 building; then 6 more names, READY.
    images.push(await walk(await createImage(server.db, input('web')), 'READY'));
    images.push(await walk(await createImage(server.db, input('web')), 'FAILED'));
    images.push(await walk(await createImage(server.db, input('web')), 'BUILDING'));
    for (let i = 0; i < 6; i++) images.push(await walk(await createImage(server.db, input(`app-${i}`)), 'READY'));
  });

  after(async () => {
    await server?.close();
    cleanupDir(dataDir);
  });

  test('managed images: the base images a Dockerfile can start from', async () => {
    const managed = await lmv(admin).send(new ListManagedMicrovmImagesCommand({}));
    const arns = managed.items!.map((i) => i.imageArn);
    assert.deepEqual(arns, ['busybox', 'debian-bookworm-slim', 'dockerfile'].map((n) => `arn:cocoon:lambda:${server.config.region}:cocoon:microvm-image:${n}`));
    assert.ok(managed.items![0]!.createdAt instanceof Date, 'epoch seconds parse into Dates');
    const versions = await lmv(admin).send(new ListManagedMicrovmImageVersionsCommand({ imageIdentifier: arns[0]! }));
    assert.deepEqual(versions.items!.map((v) => [v.imageVersion, v.status]), [['1', 'AVAILABLE']]);
    await assert.rejects(lmv(admin).send(new ListManagedMicrovmImageVersionsCommand({ imageIdentifier: 'al2023-1' })), ResourceNotFoundException);
  });

  test('an image is a name; its versions are Cocoon images; states and versions map', async () => {
    const web = await lmv(admin).send(new GetMicrovmImageCommand({ imageIdentifier: 'web' }));
    assert.equal(web.imageArn, `arn:cocoon:lambda:${server.config.region}:${adminAccount}:microvm-image:web`);
    assert.equal(web.state, 'UPDATING', 'the newest of three versions is building');
    assert.equal(web.latestActiveImageVersion, '1');
    assert.equal(web.latestFailedImageVersion, '2');
    assert.ok(web.createdAt instanceof Date && Math.abs(web.createdAt.getTime() - Date.parse(images[0]!.createdAt)) < 1000);
    // The same image by its ARN, and by a Cocoon image id (which names one version).
    assert.equal((await lmv(admin).send(new GetMicrovmImageCommand({ imageIdentifier: web.imageArn! }))).name, 'web');
    assert.equal((await lmv(admin).send(new GetMicrovmImageCommand({ imageIdentifier: images[1]!.id }))).name, 'web');

    const versions = await lmv(admin).send(new ListMicrovmImageVersionsCommand({ imageIdentifier: 'web' }));
    assert.deepEqual(versions.items!.map((v) => [v.imageVersion, v.state]), [['1', 'SUCCESSFUL'], ['2', 'FAILED'], ['3', 'IN_PROGRESS']]);
    const failed = await lmv(admin).send(new GetMicrovmImageVersionCommand({ imageIdentifier: 'web', imageVersion: '2' }));
    assert.equal(failed.state, 'FAILED');
    assert.match(failed.stateReason!, /build_failed/);
    assert.equal(failed.codeArtifact?.uri, images[1]!.bundleUri);
    assert.deepEqual(failed.resources, [{ minimumMemoryInMiB: 256 }]);

    const builds = await lmv(admin).send(new ListMicrovmImageBuildsCommand({ imageIdentifier: 'web', imageVersion: '1' }));
    assert.deepEqual(builds.items!.map((b) => [b.buildId, b.buildState, b.architecture]), [[images[0]!.id, 'SUCCESSFUL', 'X86_64']]);
    const arm = await lmv(admin).send(new ListMicrovmImageBuildsCommand({ imageIdentifier: 'web', imageVersion: '1', architecture: 'ARM_64' }));
    assert.deepEqual(arm.items, [], 'no ARM_64 builds: guests are x86_64');
    const build = await lmv(admin).send(new GetMicrovmImageBuildCommand({ imageIdentifier: 'web', imageVersion: '1', buildId: images[0]!.id }));
    assert.equal(build.buildState, 'SUCCESSFUL');

    await assert.rejects(lmv(admin).send(new GetMicrovmImageVersionCommand({ imageIdentifier: 'web', imageVersion: '9' })), ResourceNotFoundException);
    await assert.rejects(lmv(admin).send(new GetMicrovmImageBuildCommand({ imageIdentifier: 'web', imageVersion: '1', buildId: images[1]!.id })), ResourceNotFoundException);
    await assert.rejects(lmv(admin).send(new GetMicrovmImageCommand({ imageIdentifier: 'nope' })), (e: unknown) => {
      assert.ok(e instanceof ResourceNotFoundException);
      assert.equal(e.$metadata.httpStatusCode, 404);
      assert.match(e.message, /nope/);
      return true;
    });
  });

  test('ListMicrovmImages pages with nextToken and maxResults (the paginator too)', async () => {
    const first = await lmv(admin).send(new ListMicrovmImagesCommand({ maxResults: 3 }));
    assert.deepEqual(first.items!.map((i) => i.name), ['app-0', 'app-1', 'app-2']);
    assert.ok(first.nextToken);
    const second = await lmv(admin).send(new ListMicrovmImagesCommand({ maxResults: 3, nextToken: first.nextToken }));
    assert.deepEqual(second.items!.map((i) => i.name), ['app-3', 'app-4', 'app-5']);
    const names: string[] = [];
    let pages = 0;
    for await (const page of paginateListMicrovmImages({ client: lmv(admin), pageSize: 2 }, {})) {
      pages++;
      names.push(...page.items!.map((i) => i.name!));
    }
    assert.equal(pages, 4);
    assert.deepEqual(names, ['app-0', 'app-1', 'app-2', 'app-3', 'app-4', 'app-5', 'web']);
    const filtered = await lmv(admin).send(new ListMicrovmImagesCommand({ nameFilter: 'we' }));
    assert.deepEqual(filtered.items!.map((i) => [i.name, i.state]), [['web', 'UPDATING']]);
    await assert.rejects(lmv(admin).send(new ListMicrovmImagesCommand({ nextToken: 'garbage' })), ValidationException);
    await assert.rejects(lmv(admin).send(new ListMicrovmImagesCommand({ maxResults: 51 })), (e: unknown) => {
      assert.ok(e instanceof ValidationException);
      assert.match(e.message, /maxResults/);
      return true;
    });
    // A token of another list is refused.
    const versions = await lmv(admin).send(new ListMicrovmImageVersionsCommand({ imageIdentifier: 'web', maxResults: 1 }));
    await assert.rejects(lmv(admin).send(new ListMicrovmImagesCommand({ nextToken: versions.nextToken })), ValidationException);
  });

  test("another tenant's images and microVMs answer like missing ones", async () => {
    assert.deepEqual((await lmv(other).send(new ListMicrovmImagesCommand({}))).items, []);
    assert.deepEqual((await lmv(other).send(new ListMicrovmsCommand({}))).items, []);
    for (const identifier of ['web', images[0]!.id, images[0]!.arn, `arn:cocoon:lambda:${server.config.region}:${adminAccount}:microvm-image:web`]) {
      await assert.rejects(lmv(other).send(new GetMicrovmImageCommand({ imageIdentifier: identifier })), ResourceNotFoundException, identifier);
    }
    await assert.rejects(lmv(other).send(new GetMicrovmCommand({ microvmIdentifier: 'mvm-00000000000000000000000000' })), ResourceNotFoundException);
  });

  test('CreateMicrovmImage: what cannot map is refused with the reason; a missing bundle is not found', async () => {
    const base = {
      name: 'refused', baseImageArn: `arn:aws:lambda:us-east-1:aws:microvm-image:busybox`, buildRoleArn: 'arn:aws:iam::123456789012:role/build',
      codeArtifact: { uri: `cocoon://bundles/${'1'.repeat(64)}.tar.gz` },
    };
    const refused = async (input: Record<string, unknown>, message: RegExp) => {
      await assert.rejects(lmv(admin).send(new CreateMicrovmImageCommand({ ...base, ...input } as never)), (e: unknown) => {
        assert.ok(e instanceof ValidationException, String(e));
        assert.match(e.message, message);
        return true;
      });
    };
    await refused({ cpuConfigurations: [{ architecture: 'ARM_64' }] }, /x86_64/);
    await refused({ logging: { cloudWatch: { logGroup: 'g' } } }, /CloudWatch logging is not available/);
    await refused({ egressNetworkConnectors: ['arn:aws:lambda:us-east-1:123456789012:network-connector:vpc'] }, /network connectors are not available/);
    await refused({ environmentVariables: { A: 'b' } }, /Dockerfile/);
    await refused({ baseImageArn: 'arn:aws:lambda:us-east-1:aws:microvm-image:al2023-1' }, /ListManagedMicrovmImages lists them/);
    await refused({ buildRoleArn: 'not-a-role-arn-at-all' }, /buildRoleArn/);
    await refused({ resources: [{ minimumMemoryInMiB: 64 }] }, /minimumMemoryInMiB/);
    await refused({ hooks: { microvmHooks: { run: 'ENABLED' } } }, /hooks.port is required/);
    await refused({ hooks: { port: 9000, microvmHooks: { run: 'ENABLED', runTimeoutInSeconds: 61 } } }, /runTimeoutInSeconds/);
    await refused({ name: 'bad name' }, /name/);
    await assert.rejects(lmv(admin).send(new CreateMicrovmImageCommand(base)), ResourceNotFoundException, 'no such bundle');
    await assert.rejects(lmv(admin).send(new CreateMicrovmImageCommand({ ...base, name: 'web' })), ConflictException, 'exists: UpdateMicrovmImage');
  });

  test('RunMicrovm and tokens: limits and states are checked before anything starts', async () => {
    const run = (input: Record<string, unknown>) => lmv(admin).send(new RunMicrovmCommand({ imageIdentifier: 'app-0', ...input } as never));
    await assert.rejects(run({ maximumDurationInSeconds: 28_801 }), /maximumDurationInSeconds/);
    await assert.rejects(run({ idlePolicy: { maxIdleDurationSeconds: 59, suspendedDurationSeconds: 0, autoResumeEnabled: true } }), ValidationException);
    await assert.rejects(run({ idlePolicy: { maxIdleDurationSeconds: 60 } }), /suspendedDurationSeconds/);
    await assert.rejects(run({ runHookPayload: 'x'.repeat(4097) }), ValidationException);
    await assert.rejects(run({ egressNetworkConnectors: ['vpc-1'] }), /network connectors/);
    await assert.rejects(run({ imageIdentifier: 'web', imageVersion: '2' }), ConflictException, 'a FAILED version');
    await assert.rejects(run({ imageIdentifier: 'nope' }), ResourceNotFoundException);
    await assert.rejects(lmv(other).send(new RunMicrovmCommand({ imageIdentifier: 'app-0' })), ResourceNotFoundException, "another tenant's image");
    // An INACTIVE version runs nothing; the image's latest active version moves back.
    const inactive = await lmv(admin).send(new UpdateMicrovmImageVersionCommand({ imageIdentifier: 'app-1', imageVersion: '1', status: 'INACTIVE' }));
    assert.equal(inactive.status, 'INACTIVE');
    assert.equal((await lmv(admin).send(new GetMicrovmImageCommand({ imageIdentifier: 'app-1' }))).latestActiveImageVersion, undefined);
    await assert.rejects(run({ imageIdentifier: 'app-1' }), ConflictException);
    await assert.rejects(run({ imageIdentifier: 'app-1', imageVersion: '1' }), /INACTIVE/);
    const token = (input: Record<string, unknown>) => lmv(admin).send(new CreateMicrovmAuthTokenCommand({ microvmIdentifier: 'mvm-00000000000000000000000000', expirationInMinutes: 5, allowedPorts: [{ allPorts: {} }], ...input } as never));
    await assert.rejects(token({ expirationInMinutes: 61 }), /expirationInMinutes/);
    await assert.rejects(token({ allowedPorts: [] }), /allowedPorts/);
    await assert.rejects(token({ allowedPorts: [{ range: { startPort: 9, endPort: 8 } }] }), /startPort/);
    await assert.rejects(token({}), ResourceNotFoundException);
  });

  test('tags on images; deleting versions and images is idempotent', async () => {
    const arn = `arn:cocoon:lambda:${server.config.region}:${adminAccount}:microvm-image:app-2`;
    await lmv(admin).send(new TagResourceCommand({ Resource: arn, Tags: { team: 'a', 'cost:center': '42' } }));
    await lmv(admin).send(new TagResourceCommand({ Resource: arn, Tags: { team: 'b' } }));
    assert.deepEqual((await lmv(admin).send(new ListTagsCommand({ Resource: arn }))).Tags, { team: 'b', 'cost:center': '42' });
    await lmv(admin).send(new UntagResourceCommand({ Resource: arn, TagKeys: ['team', 'absent'] }));
    assert.deepEqual((await lmv(admin).send(new ListTagsCommand({ Resource: arn }))).Tags, { 'cost:center': '42' });
    assert.deepEqual((await lmv(admin).send(new GetMicrovmImageCommand({ imageIdentifier: 'app-2' }))).tags, { 'cost:center': '42' });
    await assert.rejects(lmv(other).send(new ListTagsCommand({ Resource: arn })), ResourceNotFoundException);
    // Cocoon's own image ARN (with a '/', sent encoded) names the same image.
    const native = images.find((i) => i.name === 'app-2')!.arn;
    assert.deepEqual((await lmv(admin).send(new ListTagsCommand({ Resource: native }))).Tags, { 'cost:center': '42' });
    await assert.rejects(lmv(admin).send(new ListTagsCommand({ Resource: 'arn:cocoon:local-1:1:microvm/mvm-x' })), ValidationException);

    const version = await lmv(admin).send(new DeleteMicrovmImageVersionCommand({ imageIdentifier: 'web', imageVersion: '3' }));
    assert.equal(version.state, 'DELETED');
    assert.equal((await lmv(admin).send(new DeleteMicrovmImageVersionCommand({ imageIdentifier: 'web', imageVersion: '3' }))).state, 'DELETED', 'again');
    await assert.rejects(lmv(admin).send(new DeleteMicrovmImageVersionCommand({ imageIdentifier: 'web', imageVersion: '7' })), ResourceNotFoundException);
    assert.deepEqual((await lmv(admin).send(new ListMicrovmImageVersionsCommand({ imageIdentifier: 'web' }))).items!.map((v) => v.imageVersion), ['1', '2']);

    assert.equal((await lmv(admin).send(new DeleteMicrovmImageCommand({ imageIdentifier: 'app-2' }))).state, 'DELETED');
    assert.equal((await lmv(admin).send(new DeleteMicrovmImageCommand({ imageIdentifier: 'app-2' }))).state, 'DELETED', 'again');
    await assert.rejects(lmv(admin).send(new GetMicrovmImageCommand({ imageIdentifier: 'app-2' })), ResourceNotFoundException);
    await assert.rejects(lmv(admin).send(new DeleteMicrovmImageCommand({ imageIdentifier: 'never-was' })), ResourceNotFoundException);
    await assert.rejects(lmv(other).send(new DeleteMicrovmImageCommand({ imageIdentifier: 'app-3' })), ResourceNotFoundException);
  });

  test('SigV4: bad signature, unknown key, expired and future requests, keys that cannot sign', async () => {
    const isNamed = (name: string, message: RegExp) => (e: unknown) => {
      const error = e as { name: string; message: string; $metadata: { httpStatusCode: number } };
      assert.equal(error.name, name);
      assert.equal(error.$metadata.httpStatusCode, 403);
      assert.match(error.message, message);
      return true;
    };
    const list = new ListMicrovmImagesCommand({});
    await assert.rejects(lmv({ ...admin, secretAccessKey: `${admin.secretAccessKey}x` }).send(list), isNamed('InvalidSignatureException', /signature we calculated does not match/));
    await assert.rejects(lmv({ ...admin, accessKeyId: 'key-00000000000000000000000000' }).send(list), isNamed('UnrecognizedClientException', /security token/));
    await assert.rejects(lmv(admin, { systemClockOffset: -20 * 60_000 }).send(list), isNamed('InvalidSignatureException', /Signature expired/));
    await assert.rejects(lmv(admin, { systemClockOffset: 20 * 60_000 }).send(list), isNamed('InvalidSignatureException', /not yet current/));
    // With retries (the default), the client corrects its clock from the answer's Date header.
    const skewed = lmv(admin, { systemClockOffset: -20 * 60_000, maxAttempts: 3 });
    assert.ok((await skewed.send(list)).items!.length > 0);
    // Any region signs.
    assert.ok((await lmv(admin, { region: 'eu-west-3' }).send(list)).items!.length > 0);
    // A key made without a sealed copy (as before store migration 5) cannot sign; the message says what to do.
    const adminTenant = (await findTenantByName(server.db, 'admin'))!;
    const old = await createApiKey(server.db, adminTenant.id, { name: 'old' });
    await assert.rejects(lmv({ accessKeyId: old.apiKey.id, secretAccessKey: old.secret }).send(list), isNamed('UnrecognizedClientException', /Create a new API key/));
  });

  test('raw HTTP: no or foreign Authorization, unknown routes; every error in rest-json form', async () => {
    const port = Number(new URL(server.apiUrl).port);
    const noAuth = await request(port, { path: '/2025-09-09/microvm-images' });
    assert.equal(noAuth.status, 403);
    assert.equal(noAuth.headers['x-amzn-errortype'], 'MissingAuthenticationTokenException');
    assert.equal(JSON.parse(noAuth.body).__type, 'MissingAuthenticationTokenException');
    assert.ok(noAuth.headers['x-amzn-requestid']);
    const bearer = await request(port, { path: '/2025-09-09/microvm-images', headers: { authorization: `Bearer ${admin.secretAccessKey}` } });
    assert.equal(bearer.status, 400);
    assert.equal(bearer.headers['x-amzn-errortype'], 'IncompleteSignatureException');
    const unknown = await request(port, { path: '/2025-09-09/nothing-here' });
    assert.equal(unknown.status, 404);
    assert.equal(unknown.headers['x-amzn-errortype'], 'UnknownOperationException');
    // Cocoon's own API is unchanged beside it.
    assert.equal((await request(port, { path: '/api/v1/health' })).status, 200);
  });
});
