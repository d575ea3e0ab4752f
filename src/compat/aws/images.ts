/**
 * The image operations: an AWS image is a Cocoon image name, its versions are the Cocoon images
 * of that name (1, 2, …), each with one build (buildId = the Cocoon image id). Builds go through
 * Cocoon's ImageService; reads through the store's image queries.
 */
import { listImages, type Image } from '../../store/images.ts';
import type { Tenant } from '../../store/tenants.ts';
import { findTenantImage } from '../../store/images.ts';
import type { AwsRequest, AwsServices } from './context.ts';
import { notFound, validation } from './errors.ts';
import { pageOf, pageParams } from './pagination.ts';
import {
  MANAGED_IMAGES, MANAGED_VERSION, awsImageArn, buildState, epoch, findManagedImage, imageState, managedImageArn,
  parseImageIdentifier, versionState,
} from './shapes.ts';
import { getTags, versionRecords, type VersionRecord, type VersionStatus } from './store.ts';
import { queryString, str } from './validate.ts';
import { awsHooksFrom } from './hooks.ts';

/** Versions of one name read per request at most (a name with more shows its newest ones). */
const MAX_VERSIONS = 1000;
/** Image names of one tenant listed at most. */
const MAX_NAMES = 10_000;
const IDENTIFIER = { required: true, min: 1, max: 256 } as const;
const VERSION = /^[0-9]{1,10}$/;

export interface ResolvedImage {
  name: string;
  /** Oldest first. */
  versions: Image[];
  /** The AWS surface's record of each version (status, spec), by Cocoon image id. */
  records: Map<string, VersionRecord>;
  /** The version the identifier itself named (a Cocoon image id or ARN, or an AWS ARN with `:<version>`). */
  pinned?: Image;
}

export async function versionsOf(services: AwsServices, tenant: Tenant, name: string): Promise<Image[]> {
  return (await listImages(services.db, { tenantId: tenant.id, name, limit: MAX_VERSIONS })).items.reverse();
}

/** An imageIdentifier of this tenant's (another tenant's answers like a missing one). */
export async function resolveImage(services: AwsServices, tenant: Tenant, identifier: string): Promise<ResolvedImage> {
  const ref = parseImageIdentifier(identifier);
  let name: string;
  let pinned: Image | undefined;
  let version: string | undefined;
  if (ref.kind === 'cocoon') {
    pinned = await findTenantImage(services.db, tenant.id, ref.idOrArn);
    if (!pinned) throw notFound('MicrovmImage', identifier);
    name = pinned.name;
  } else {
    if (ref.accountId !== undefined && ref.accountId !== tenant.accountId) throw notFound('MicrovmImage', identifier);
    name = ref.name;
    version = ref.version;
  }
  const versions = await versionsOf(services, tenant, name);
  if (versions.length === 0) throw notFound('MicrovmImage', identifier);
  const records = await versionRecords(services.db, versions.map((v) => v.id));
  if (version !== undefined) {
    pinned = versions.find((v) => String(v.version) === version);
    if (!pinned) throw notFound('MicrovmImageVersion', identifier, `image ${name} has no version ${version}`);
  }
  return { name, versions, records, ...(pinned ? { pinned } : {}) };
}

export function findVersion(image: ResolvedImage, version: string): Image {
  if (!VERSION.test(version)) throw validation(`imageVersion '${version.slice(0, 40)}' is not a version of this image (versions are 1, 2, …)`);
  const found = image.versions.find((v) => String(v.version) === version);
  if (!found) throw notFound('MicrovmImageVersion', `${image.name}:${version}`, `image ${image.name} has no version ${version}`);
  return found;
}

export function statusOf(records: Map<string, VersionRecord>, image: Image): VersionStatus {
  return records.get(image.id)?.status ?? 'ACTIVE';
}

/** The newest version a microVM can run from (READY and ACTIVE), if any. */
export function latestActive(versions: readonly Image[], records: Map<string, VersionRecord>): Image | undefined {
  return [...versions].reverse().find((v) => v.state === 'READY' && statusOf(records, v) === 'ACTIVE');
}

function latestFailed(versions: readonly Image[]): Image | undefined {
  return [...versions].reverse().find((v) => v.state === 'FAILED');
}

export function imageSummary(services: AwsServices, tenant: Tenant, image: ResolvedImage) {
  const { name, versions } = image;
  const active = latestActive(versions, image.records);
  const failed = latestFailed(versions);
  return {
    imageArn: awsImageArn(services.config.region, tenant.accountId, name),
    name,
    state: imageState(versions),
    ...(active ? { latestActiveImageVersion: String(active.version) } : {}),
    ...(failed ? { latestFailedImageVersion: String(failed.version) } : {}),
    createdAt: epoch(versions[0]!.createdAt),
  };
}

export async function imageDetail(services: AwsServices, tenant: Tenant, image: ResolvedImage) {
  return {
    ...imageSummary(services, tenant, image),
    tags: await getTags(services.db, tenant.id, image.name),
    updatedAt: epoch(image.versions.at(-1)!.updatedAt),
  };
}

/**
 * The members an image version was made with: as given through the AWS surface, else what
 * Cocoon knows (images made through Cocoon's own API: the Dockerfile is the base).
 */
export function versionSpecView(services: AwsServices, tenant: Tenant, image: Image, record: VersionRecord | undefined) {
  const spec = record?.spec ?? {};
  const hooks = awsHooksFrom(image.httpHooks);
  return {
    baseImageArn: spec.baseImageArn ?? managedImageArn(services.config.region, 'dockerfile'),
    baseImageVersion: spec.baseImageVersion ?? MANAGED_VERSION,
    buildRoleArn: spec.buildRoleArn ?? `arn:aws:iam::${tenant.accountId}:role/cocoon-builder`,
    ...(spec.description !== undefined ? { description: spec.description } : {}),
    codeArtifact: { uri: image.bundleUri },
    logging: spec.logging ?? { disabled: {} },
    egressNetworkConnectors: [],
    cpuConfigurations: [],
    resources: [{ minimumMemoryInMiB: image.memoryMiB }],
    additionalOsCapabilities: spec.additionalOsCapabilities ?? [],
    ...(hooks ? { hooks } : {}),
    environmentVariables: {},
  };
}

/** An image version as the model shows it. */
export function versionView(services: AwsServices, tenant: Tenant, image: Image, records: Map<string, VersionRecord>, tags: Record<string, string>) {
  return {
    ...versionSpecView(services, tenant, image, records.get(image.id)),
    imageArn: awsImageArn(services.config.region, tenant.accountId, image.name),
    imageVersion: String(image.version),
    state: versionState(image.state),
    status: statusOf(records, image),
    createdAt: epoch(image.createdAt),
    updatedAt: epoch(image.updatedAt),
    ...(image.error ? { stateReason: image.error } : {}),
    tags,
  };
}

export function buildView(services: AwsServices, tenant: Tenant, image: Image) {
  return {
    imageArn: awsImageArn(services.config.region, tenant.accountId, image.name),
    imageVersion: String(image.version),
    buildId: image.id,
    buildState: buildState(image.state),
    // Outside the model's enums (ARM_64, GRAVITON): Cocoon's guests are x86_64 under QEMU.
    architecture: 'X86_64',
    chipset: 'GENERIC',
    chipsetGeneration: 'qemu',
    ...(image.error ? { stateReason: image.error } : {}),
    createdAt: epoch(image.createdAt),
  };
}

// ---- operations --------------------------------------------------------------------------

export async function listManagedMicrovmImages(services: AwsServices, request: AwsRequest) {
  const page = pageOf([...MANAGED_IMAGES].sort((a, b) => (a.name < b.name ? -1 : 1)), (m) => m.name, pageParams(request.query, 'ListManagedMicrovmImages'), 'ListManagedMicrovmImages');
  return {
    body: {
      items: page.items.map((m) => ({ imageArn: managedImageArn(services.config.region, m.name), createdAt: epoch(m.createdAt), updatedAt: epoch(m.createdAt) })),
      ...(page.nextToken ? { nextToken: page.nextToken } : {}),
    },
  };
}

export async function listManagedMicrovmImageVersions(services: AwsServices, request: AwsRequest) {
  const identifier = str(request.params, 'imageIdentifier', IDENTIFIER);
  const managed = findManagedImage(identifier);
  if (!managed) throw notFound('ManagedMicrovmImage', identifier, `no managed image '${identifier}'; ListManagedMicrovmImages lists them`);
  const params = pageParams(request.query, 'ListManagedMicrovmImageVersions');
  const page = pageOf([MANAGED_VERSION], (v) => v, params, 'ListManagedMicrovmImageVersions');
  return {
    body: {
      items: page.items.map((v) => ({
        imageArn: managedImageArn(services.config.region, managed.name), imageVersion: v, status: 'AVAILABLE', createdAt: epoch(managed.createdAt), updatedAt: epoch(managed.createdAt),
      })),
      ...(page.nextToken ? { nextToken: page.nextToken } : {}),
    },
  };
}

export async function listMicrovmImages(services: AwsServices, request: AwsRequest) {
  const params = pageParams(request.query, 'ListMicrovmImages');
  const nameFilter = queryString(request.query, 'nameFilter');
  if (nameFilter !== undefined) str({ nameFilter }, 'nameFilter', { min: 1, max: 2048, pattern: /^[^\s]+$/ });
  // Every name of the tenant (bounded), in order; `nameFilter` keeps the names containing it.
  const rows = await services.db.all<{ name: string }>('SELECT DISTINCT name FROM images WHERE tenant_id = ? ORDER BY name LIMIT ?', [request.tenant.id, MAX_NAMES]);
  const names = rows.map((r) => r.name).filter((n) => nameFilter === undefined || n.includes(nameFilter));
  const page = pageOf(names, (n) => n, params, 'ListMicrovmImages');
  const items = [];
  for (const name of page.items) {
    const versions = await versionsOf(services, request.tenant, name);
    if (versions.length) items.push(imageSummary(services, request.tenant, { name, versions, records: await versionRecords(services.db, versions.map((v) => v.id)) }));
  }
  return { body: { items, ...(page.nextToken ? { nextToken: page.nextToken } : {}) } };
}

export async function getMicrovmImage(services: AwsServices, request: AwsRequest) {
  const image = await resolveImage(services, request.tenant, str(request.params, 'imageIdentifier', IDENTIFIER));
  return { body: await imageDetail(services, request.tenant, image) };
}

export async function listMicrovmImageVersions(services: AwsServices, request: AwsRequest) {
  const image = await resolveImage(services, request.tenant, str(request.params, 'imageIdentifier', IDENTIFIER));
  // Version numbers as fixed-width keys so that they sort as numbers.
  const key = (v: Image) => String(v.version).padStart(10, '0');
  const page = pageOf(image.versions, key, pageParams(request.query, 'ListMicrovmImageVersions'), 'ListMicrovmImageVersions');
  const tags = await getTags(services.db, request.tenant.id, image.name);
  return { body: { items: page.items.map((v) => versionView(services, request.tenant, v, image.records, tags)), ...(page.nextToken ? { nextToken: page.nextToken } : {}) } };
}

export async function getMicrovmImageVersion(services: AwsServices, request: AwsRequest) {
  const image = await resolveImage(services, request.tenant, str(request.params, 'imageIdentifier', IDENTIFIER));
  const version = findVersion(image, str(request.params, 'imageVersion', { required: true, min: 1, max: 2048 }));
  return { body: versionView(services, request.tenant, version, image.records, await getTags(services.db, request.tenant.id, image.name)) };
}

export async function listMicrovmImageBuilds(services: AwsServices, request: AwsRequest) {
  const image = await resolveImage(services, request.tenant, str(request.params, 'imageIdentifier', IDENTIFIER));
  const version = findVersion(image, str(request.params, 'imageVersion', { required: true, min: 1, max: 2048 }));
  const architecture = queryString(request.query, 'architecture');
  const chipset = queryString(request.query, 'chipset');
  const generation = queryString(request.query, 'chipsetGeneration');
  const build = buildView(services, request.tenant, version);
  // Filters for ARM_64 / GRAVITON (the model's only values) match none of Cocoon's x86_64 builds.
  const matches = (architecture === undefined || architecture === build.architecture) && (chipset === undefined || chipset === build.chipset) &&
    (generation === undefined || generation === build.chipsetGeneration);
  const page = pageOf(matches ? [build] : [], (b) => b.buildId, pageParams(request.query, 'ListMicrovmImageBuilds'), 'ListMicrovmImageBuilds');
  return { body: { items: page.items, ...(page.nextToken ? { nextToken: page.nextToken } : {}) } };
}

export async function getMicrovmImageBuild(services: AwsServices, request: AwsRequest) {
  const image = await resolveImage(services, request.tenant, str(request.params, 'imageIdentifier', IDENTIFIER));
  const version = findVersion(image, str(request.params, 'imageVersion', { required: true, min: 1, max: 2048 }));
  const buildId = str(request.params, 'buildId', { required: true, min: 1, max: 2048 });
  if (buildId !== version.id) throw notFound('MicrovmImageBuild', buildId, `version ${version.version} of image ${image.name} has no build '${buildId}' (its build is ${version.id})`);
  return { body: buildView(services, request.tenant, version) };
}
