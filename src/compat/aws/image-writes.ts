/**
 * The image operations that change something: CreateMicrovmImage and UpdateMicrovmImage (a new
 * version of a name, built by Cocoon's ImageService from the bundle at codeArtifact.uri),
 * DeleteMicrovmImage(Version) (ImageService.delete), UpdateMicrovmImageVersion (ACTIVE/INACTIVE).
 * What cannot map is refused here with the reason (docs/aws.md lists them).
 */
import { createHash } from 'node:crypto';
import type { HttpHooksInput } from '../../images/image-service.ts';
import type { Image } from '../../store/images.ts';
import type { Tenant } from '../../store/tenants.ts';
import type { AwsRequest, AwsServices } from './context.ts';
import { conflict, notFound, validation } from './errors.ts';
import { httpHooksFromAws } from './hooks.ts';
import { findVersion, imageSummary, resolveImage, versionSpecView, versionView, versionsOf } from './images.ts';
import { MANAGED_IMAGES, MANAGED_VERSION, epoch, findManagedImage } from './shapes.ts';
import { findVersionByClientToken, getTags, recordVersion, setTags, setVersionStatus, versionRecords, type VersionSpec } from './store.ts';
import { parseTags } from './tags.ts';
import { isObject, list, oneOf, onlyMembers, str, stringList, stringMap, struct, int, type Json } from './validate.ts';

const SPEC_MEMBERS = [
  'baseImageArn', 'baseImageVersion', 'buildRoleArn', 'description', 'codeArtifact', 'logging', 'egressNetworkConnectors',
  'cpuConfigurations', 'resources', 'additionalOsCapabilities', 'hooks', 'environmentVariables',
] as const;
const ROLE_ARN = /^arn:aws[a-z-]*:iam::[0-9]{12}:role\/?[a-zA-Z_0-9+=,.@\-/]+$/;
const NON_BLANK = /^[^\s]+$/;
const IMAGE_NAME = /^[a-zA-Z0-9_-]+$/;
const IDENTIFIER = { required: true, min: 1, max: 256 } as const;

interface ParsedSpec {
  /** What Cocoon's ImageService builds from. */
  input: { bundle: string; memoryMiB?: number; httpHooks?: HttpHooksInput };
  /** The AWS-only members, kept as given. */
  spec: VersionSpec;
}

/** CreateMicrovmImage's and UpdateMicrovmImage's common members, checked against the model and mapped. */
export function parseSpec(body: Json): ParsedSpec {
  const baseImageArn = str(body, 'baseImageArn', { required: true, min: 1, max: 2048, pattern: NON_BLANK });
  if (!findManagedImage(baseImageArn)) {
    throw validation(`baseImageArn '${baseImageArn}' is not a base image of Cocoon's; ListManagedMicrovmImages lists them (${MANAGED_IMAGES.map((m) => m.name).join(', ')}). The bundle's Dockerfile is what is built.`);
  }
  const baseImageVersion = str(body, 'baseImageVersion', { min: 1, max: 2048, pattern: NON_BLANK });
  if (baseImageVersion !== undefined && baseImageVersion !== MANAGED_VERSION) throw validation(`baseImageVersion must be '${MANAGED_VERSION}' (the only version of Cocoon's base images)`);
  const buildRoleArn = str(body, 'buildRoleArn', { required: true, min: 20, max: 2048, pattern: ROLE_ARN });
  const description = str(body, 'description', { max: 4096 });
  const codeArtifact = struct(body, 'codeArtifact', { required: true }) as Json;
  onlyMembers(codeArtifact, ['uri'], 'codeArtifact');
  const bundle = str(codeArtifact, 'uri', { required: true, min: 1, max: 2048, pattern: NON_BLANK }, 'codeArtifact.uri');

  const logging = struct(body, 'logging');
  if (logging !== undefined) {
    onlyMembers(logging, ['disabled', 'cloudWatch'], 'logging');
    if (Object.keys(logging).length !== 1) throw validation('logging takes exactly one of disabled, cloudWatch');
    if (logging.cloudWatch !== undefined) {
      throw validation('CloudWatch logging is not available in Cocoon: omit logging or send {"disabled": {}}. Build logs: GET /api/v1/images/{id}/logs; microVM logs: GET /api/v1/microvms/{id}/logs');
    }
    if (!isObject(logging.disabled) || Object.keys(logging.disabled).length) throw validation('logging.disabled must be {}');
  }
  const egress = stringList(body, 'egressNetworkConnectors', { max: 1, item: { min: 1, max: 2048 } });
  if (egress?.length) throw validation('VPC network connectors are not available in Cocoon: guests have no network egress unless an image enables it through Cocoon\'s API (networkEgress)');
  const cpus = list(body, 'cpuConfigurations');
  cpus?.forEach((cpu, i) => {
    if (!isObject(cpu)) throw validation(`cpuConfigurations.${i + 1} must be a structure`);
    onlyMembers(cpu, ['architecture'], `cpuConfigurations.${i + 1}`);
    oneOf(cpu, 'architecture', ['ARM_64'], { required: true }, `cpuConfigurations.${i + 1}.architecture`);
  });
  if (cpus?.length) throw validation('cpuConfigurations: ARM_64 is not available: Cocoon\'s guests are x86_64; omit cpuConfigurations');
  let memoryMiB: number | undefined;
  const resources = list(body, 'resources', { max: 1 });
  if (resources?.length) {
    const r = resources[0];
    if (!isObject(r)) throw validation('resources.1 must be a structure');
    onlyMembers(r, ['minimumMemoryInMiB'], 'resources.1');
    memoryMiB = int(r, 'minimumMemoryInMiB', { required: true, min: 128, max: 32768 }, 'resources.1.minimumMemoryInMiB');
  }
  const capabilities = list(body, 'additionalOsCapabilities');
  const additionalOsCapabilities = capabilities?.map((c, i) => oneOf({ c }, 'c', ['ALL'], { required: true }, `additionalOsCapabilities.${i + 1}`) as string);
  const httpHooks = httpHooksFromAws(body);
  const env = stringMap(body, 'environmentVariables', { maxEntries: 50, key: { min: 1, max: 256, pattern: NON_BLANK }, value: { max: 4096 } });
  if (env && Object.keys(env).length) {
    throw validation("environmentVariables are not set by Cocoon's AWS surface: put them in the bundle's Dockerfile (ENV NAME=value)");
  }
  const spec: VersionSpec = {
    baseImageArn,
    ...(baseImageVersion !== undefined ? { baseImageVersion } : {}),
    buildRoleArn,
    ...(description !== undefined ? { description } : {}),
    ...(logging !== undefined ? { logging } : {}),
    ...(additionalOsCapabilities !== undefined ? { additionalOsCapabilities } : {}),
  };
  return { input: { bundle, ...(memoryMiB !== undefined ? { memoryMiB } : {}), ...(httpHooks ? { httpHooks } : {}) }, spec };
}

/** The idempotency key of a clientToken (namespaced, so that it never meets a Cocoon-API one). */
function tokenKey(clientToken: string): string {
  return `aws-${createHash('sha256').update(clientToken).digest('base64url')}`;
}

function digest(parts: unknown[]): string {
  return createHash('sha256').update(JSON.stringify(parts)).digest('hex');
}

async function imageAnswer(services: AwsServices, tenant: Tenant, name: string, version: Image) {
  const versions = await versionsOf(services, tenant, name);
  const records = await versionRecords(services.db, versions.map((v) => v.id));
  return {
    ...imageSummary(services, tenant, { name, versions, records }),
    ...versionSpecView(services, tenant, version, records.get(version.id)),
    tags: await getTags(services.db, tenant.id, name),
    updatedAt: epoch(version.updatedAt),
    imageVersion: String(version.version),
  };
}

/** A new version of `name`, built by Cocoon; replays of a clientToken answer the first version. */
async function buildVersion(services: AwsServices, tenant: Tenant, name: string, parsed: ParsedSpec, clientToken: string | undefined, parts: unknown[]): Promise<{ image: Image; replay: boolean }> {
  const key = clientToken === undefined ? null : tokenKey(clientToken);
  const requestHash = digest(parts);
  const replay = async (): Promise<Image | undefined> => {
    if (key === null) return undefined;
    const existing = await findVersionByClientToken(services.db, tenant.id, key);
    if (!existing) return undefined;
    if (existing.requestHash !== requestHash) throw conflict('this clientToken was used for a request with other parameters; use a new clientToken');
    const image = (await versionsOf(services, tenant, name)).find((v) => v.id === existing.imageId);
    if (!image) throw conflict('this clientToken was used for another image; use a new clientToken');
    return image;
  };
  const earlier = await replay();
  if (earlier) return { image: earlier, replay: true };
  const image = await services.images().create(tenant.id, { name, ...parsed.input });
  try {
    await recordVersion(services.db, { imageId: image.id, tenantId: tenant.id, spec: parsed.spec, clientToken: key, requestHash });
  } catch (error) {
    // The same clientToken raced in: keep the first version, drop this one.
    await services.images().delete(tenant.id, image.id).catch(() => undefined);
    const first = await replay();
    if (first) return { image: first, replay: true };
    throw error;
  }
  return { image, replay: false };
}

export async function createMicrovmImage(services: AwsServices, request: AwsRequest) {
  const body = request.body;
  onlyMembers(body, [...SPEC_MEMBERS, 'name', 'tags', 'clientToken']);
  const name = str(body, 'name', { required: true, min: 1, max: 64, pattern: IMAGE_NAME });
  const parsed = parseSpec(body);
  const tags = parseTags(body, 'tags');
  const clientToken = str(body, 'clientToken', { min: 1, max: 128 });
  const parts = ['CreateMicrovmImage', name, parsed, tags ?? {}];
  if (clientToken === undefined || !(await findVersionByClientToken(services.db, request.tenant.id, tokenKey(clientToken)))) {
    const existing = await versionsOf(services, request.tenant, name);
    if (existing.length) throw conflict(`image '${name}' already exists; UpdateMicrovmImage makes a new version of it`, 'MicrovmImage', name);
  }
  const { image, replay } = await buildVersion(services, request.tenant, name, parsed, clientToken, parts);
  if (!replay && tags) await setTags(services.db, request.tenant.id, name, tags);
  return { status: 201, body: await imageAnswer(services, request.tenant, name, image) };
}

export async function updateMicrovmImage(services: AwsServices, request: AwsRequest) {
  const body = request.body;
  onlyMembers(body, [...SPEC_MEMBERS, 'clientToken']);
  const resolved = await resolveImage(services, request.tenant, str(request.params, 'imageIdentifier', IDENTIFIER));
  const parsed = parseSpec(body);
  const clientToken = str(body, 'clientToken', { min: 1, max: 128 });
  const { image } = await buildVersion(services, request.tenant, resolved.name, parsed, clientToken, ['UpdateMicrovmImage', resolved.name, parsed]);
  return { body: await imageAnswer(services, request.tenant, resolved.name, image) };
}

/** Whether this tenant ever had an image of this name (Cocoon never reuses a name's versions). */
async function lastVersionOf(services: AwsServices, tenant: Tenant, name: string): Promise<number | undefined> {
  const row = await services.db.get<{ last_version: number }>('SELECT last_version FROM image_versions WHERE tenant_id = ? AND name = ?', [tenant.id, name]);
  return row?.last_version;
}

async function deleteVersions(services: AwsServices, tenant: Tenant, versions: Image[]): Promise<void> {
  for (const version of versions) {
    const result = await services.images().delete(tenant.id, version.id);
    if (result === 'in_use') {
      throw conflict(`version ${version.version} of image ${version.name} is used by microVMs that are not terminated; terminate them first`, 'MicrovmImageVersion', `${version.name}:${version.version}`);
    }
  }
}

/** Idempotent: an image deleted before answers DELETED again; one that never was, ResourceNotFoundException. */
export async function deleteMicrovmImage(services: AwsServices, request: AwsRequest) {
  const identifier = str(request.params, 'imageIdentifier', IDENTIFIER);
  let resolved;
  try {
    resolved = await resolveImage(services, request.tenant, identifier);
  } catch (error) {
    const name = /^[a-zA-Z0-9_-]{1,64}$/.test(identifier) ? identifier : /:microvm-image:([A-Za-z0-9_-]{1,64})$/.exec(identifier)?.[1];
    if (name && (await lastVersionOf(services, request.tenant, name)) !== undefined) return { body: { imageIdentifier: identifier, state: 'DELETED' } };
    throw error;
  }
  await deleteVersions(services, request.tenant, resolved.versions);
  await setTags(services.db, request.tenant.id, resolved.name, {});
  return { body: { imageIdentifier: identifier, state: 'DELETED' } };
}

export async function deleteMicrovmImageVersion(services: AwsServices, request: AwsRequest) {
  const identifier = str(request.params, 'imageIdentifier', IDENTIFIER);
  const imageVersion = str(request.params, 'imageVersion', { required: true, min: 1, max: 2048 });
  const resolved = await resolveImage(services, request.tenant, identifier).catch(async (error: unknown) => {
    const name = /^[a-zA-Z0-9_-]{1,64}$/.test(identifier) ? identifier : undefined;
    const last = name === undefined ? undefined : await lastVersionOf(services, request.tenant, name);
    if (last !== undefined && /^\d{1,10}$/.test(imageVersion) && Number(imageVersion) <= last) return undefined;
    throw error;
  });
  if (resolved) {
    const found = resolved.versions.find((v) => String(v.version) === imageVersion);
    if (found) {
      await deleteVersions(services, request.tenant, [found]);
      if (resolved.versions.length === 1) await setTags(services.db, request.tenant.id, resolved.name, {});
    } else {
      const last = await lastVersionOf(services, request.tenant, resolved.name);
      if (!/^\d{1,10}$/.test(imageVersion) || last === undefined || Number(imageVersion) > last) findVersion(resolved, imageVersion);
    }
  }
  return { body: { imageIdentifier: identifier, imageVersion, state: 'DELETED' } };
}

export async function updateMicrovmImageVersion(services: AwsServices, request: AwsRequest) {
  onlyMembers(request.body, ['status']);
  const resolved = await resolveImage(services, request.tenant, str(request.params, 'imageIdentifier', IDENTIFIER));
  const version = findVersion(resolved, str(request.params, 'imageVersion', { required: true, min: 1, max: 2048 }));
  const status = oneOf(request.body, 'status', ['ACTIVE', 'INACTIVE'], { required: true }) as 'ACTIVE' | 'INACTIVE';
  await setVersionStatus(services.db, request.tenant.id, version.id, status);
  const records = await versionRecords(services.db, resolved.versions.map((v) => v.id));
  if (!records.get(version.id)) throw notFound('MicrovmImageVersion', `${resolved.name}:${version.version}`);
  return { body: versionView(services, request.tenant, version, records, await getTags(services.db, request.tenant.id, resolved.name)) };
}
