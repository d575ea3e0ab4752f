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
import { str } from './validate.ts';
import { queryString } from './validate.ts';

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
  /** The version the identifier itself named (a Cocoon image id or ARN, or an AWS ARN with `:<version>`). */
  pinned?: Image;
}

export async function versionsOf(services: AwsServices, tenant: Tenant, name: string): Promise<Image[]> {
  return (await listImages(services.db, { tenantId: tenant.id, name, limit: MAX_VERSIONS })).items.reverse();
}

/** An imageIdentifier of this tenant's (another tenant's answers like a missing one). */
export async function resolveImage(services: AwsServices, tenant: Tenant, identifier: string): Promise<ResolvedImage> {
  const ref = parseImageIdentifier(identifier);
  if (ref.kind === 'cocoon') {
    const image = await findTenantImage(services.db, tenant.id, ref.idOrArn);
    if (!image) throw notFound('MicrovmImage', identifier);
    return { name: image.name, versions: await versionsOf(services, tenant, image.name), pinned: image };
  }
  if (ref.accountId !== undefined && ref.accountId !== tenant.accountId) throw notFound('MicrovmImage', identifier);
  const versions = await versionsOf(services, tenant, ref.name);
  if (versions.length === 0) throw notFound('MicrovmImage', identifier);
  if (ref.version === undefined) return { name: ref.name, versions };
  const pinned = versions.find((v) => String(v.version) === ref.version);
  if (!pinned) throw notFound('MicrovmImageVersion', identifier, `image ${ref.name} has no version ${ref.version}`);
  return { name: ref.name, versions, pinned };
}

export function findVersion(image: ResolvedImage, version: string): Image {
  if (!VERSION.test(version)) throw validation(`imageVersion '${version.slice(0, 40)}' is not a version of this image (versions are 1, 2, …)`);
  const found = image.versions.find((v) => String(v.version) === version);
  if (!found) throw notFound('MicrovmImageVersion', `${image.name}:${version}`, `image ${image.name} has no version ${version}`);
  return found;
}

/** The newest version a microVM can run from (READY), if any. */
export function latestActive(versions: readonly Image[]): Image | undefined {
  return [...versions].reverse().find((v) => v.state === 'READY');
}

function latestFailed(versions: readonly Image[]): Image | undefined {
  return [...versions].reverse().find((v) => v.state === 'FAILED');
}

export function imageSummary(services: AwsServices, tenant: Tenant, name: string, versions: Image[]) {
  const active = latestActive(versions);
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

export function imageDetail(services: AwsServices, tenant: Tenant, name: string, versions: Image[]) {
  return {
    ...imageSummary(services, tenant, name, versions),
    tags: {},
    updatedAt: epoch(versions.at(-1)!.updatedAt),
  };
}

/** An image version as the model shows it; images made through Cocoon's own API show what Cocoon knows. */
export function versionView(services: AwsServices, tenant: Tenant, image: Image) {
  return {
    baseImageArn: managedImageArn(services.config.region, 'dockerfile'),
    baseImageVersion: MANAGED_VERSION,
    buildRoleArn: `arn:aws:iam::${tenant.accountId}:role/cocoon-builder`,
    codeArtifact: { uri: image.bundleUri },
    logging: { disabled: {} },
    egressNetworkConnectors: [],
    cpuConfigurations: [],
    resources: [{ minimumMemoryInMiB: image.memoryMiB }],
    additionalOsCapabilities: [],
    environmentVariables: {},
    imageArn: awsImageArn(services.config.region, tenant.accountId, image.name),
    imageVersion: String(image.version),
    state: versionState(image.state),
    status: 'ACTIVE',
    createdAt: epoch(image.createdAt),
    updatedAt: epoch(image.updatedAt),
    ...(image.error ? { stateReason: image.error } : {}),
    tags: {},
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
    if (versions.length) items.push(imageSummary(services, request.tenant, name, versions));
  }
  return { body: { items, ...(page.nextToken ? { nextToken: page.nextToken } : {}) } };
}

export async function getMicrovmImage(services: AwsServices, request: AwsRequest) {
  const image = await resolveImage(services, request.tenant, str(request.params, 'imageIdentifier', IDENTIFIER));
  return { body: imageDetail(services, request.tenant, image.name, image.versions) };
}

export async function listMicrovmImageVersions(services: AwsServices, request: AwsRequest) {
  const image = await resolveImage(services, request.tenant, str(request.params, 'imageIdentifier', IDENTIFIER));
  // Version numbers as fixed-width keys so that they sort as numbers.
  const key = (v: Image) => String(v.version).padStart(10, '0');
  const page = pageOf(image.versions, key, pageParams(request.query, 'ListMicrovmImageVersions'), 'ListMicrovmImageVersions');
  return { body: { items: page.items.map((v) => versionView(services, request.tenant, v)), ...(page.nextToken ? { nextToken: page.nextToken } : {}) } };
}

export async function getMicrovmImageVersion(services: AwsServices, request: AwsRequest) {
  const image = await resolveImage(services, request.tenant, str(request.params, 'imageIdentifier', IDENTIFIER));
  const version = findVersion(image, str(request.params, 'imageVersion', { required: true, min: 1, max: 2048 }));
  return { body: versionView(services, request.tenant, version) };
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
