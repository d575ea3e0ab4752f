/**
 * How Cocoon's records read in the Lambda MicroVMs model: states, epoch-second timestamps
 * (rest-json's default; the JS client refuses ISO strings), ARNs, and the managed base images.
 *
 * An AWS *image* is a Cocoon image name (all its versions); an AWS *image version* is one Cocoon
 * image (one build of that name: version 1, 2, …); its one *build* is that image's build, with
 * the Cocoon image id as buildId.
 */
import type { Image, ImageState } from '../../store/images.ts';
import type { Microvm, MicrovmState } from '../../store/microvms.ts';

export type AwsMicrovmState = 'PENDING' | 'RUNNING' | 'SUSPENDING' | 'SUSPENDED' | 'TERMINATING' | 'TERMINATED';
export type AwsImageState = 'CREATING' | 'CREATED' | 'CREATE_FAILED' | 'UPDATING' | 'UPDATED' | 'UPDATE_FAILED' | 'DELETING' | 'DELETED';
export type AwsVersionState = 'PENDING' | 'IN_PROGRESS' | 'SUCCESSFUL' | 'FAILED' | 'DELETING' | 'DELETED';
export type AwsBuildState = 'PENDING' | 'IN_PROGRESS' | 'SUCCESSFUL' | 'FAILED';

/** Seconds since the epoch, with milliseconds as a fraction. */
export function epoch(iso: string): number;
export function epoch(iso: string | null): number | undefined;
export function epoch(iso: string | null): number | undefined {
  return iso === null ? undefined : Date.parse(iso) / 1000;
}

/** The model has no RESUMING (a resuming microVM is PENDING again) and no FAILED (TERMINATED with a stateReason). */
export function microvmState(state: MicrovmState): AwsMicrovmState {
  switch (state) {
    case 'RESUMING':
      return 'PENDING';
    case 'FAILED':
      return 'TERMINATED';
    default:
      return state;
  }
}

export function microvmStateReason(microvm: Microvm): string | undefined {
  if (microvm.state === 'FAILED') return `FAILED: ${microvm.error ?? 'the microVM failed'}`;
  return microvm.error ?? undefined;
}

export function versionState(state: ImageState): AwsVersionState {
  switch (state) {
    case 'PENDING':
      return 'PENDING';
    case 'READY':
      return 'SUCCESSFUL';
    case 'FAILED':
      return 'FAILED';
    default:
      return 'IN_PROGRESS';
  }
}

export function buildState(state: ImageState): AwsBuildState {
  return versionState(state) as AwsBuildState;
}

/**
 * The state of an image (a name) from its versions, oldest first: the newest version decides;
 * CREATE* while it is the only one, UPDATE* once there were others.
 */
export function imageState(versions: readonly Image[]): AwsImageState {
  const latest = versions.at(-1);
  if (!latest) return 'DELETED';
  const first = versions.length === 1;
  switch (versionState(latest.state)) {
    case 'SUCCESSFUL':
      return first ? 'CREATED' : 'UPDATED';
    case 'FAILED':
      return first ? 'CREATE_FAILED' : 'UPDATE_FAILED';
    default:
      return first ? 'CREATING' : 'UPDATING';
  }
}

/** `arn:cocoon:lambda:<region>:<account>:microvm-image:<name>` (the model's MicrovmImageArn form, Cocoon's partition). */
export function awsImageArn(region: string, accountId: string, name: string): string {
  return `arn:cocoon:lambda:${region}:${accountId}:microvm-image:${name}`;
}

/** What an image identifier names: an image (name) and maybe one version of it. */
export type ImageRef =
  | { kind: 'name'; name: string; version?: string; accountId?: string }
  | { kind: 'cocoon'; idOrArn: string };

const AWS_IMAGE_ARN = /^arn:[a-z0-9-]+:lambda:[a-z0-9-]*:([a-z0-9]*):microvm-image:([A-Za-z0-9._-]{1,64})(?::([0-9]{1,10}))?$/;

/** Parses an imageIdentifier: a name, an AWS-form image ARN (optionally `:<version>`), or a Cocoon image id or ARN. */
export function parseImageIdentifier(identifier: string): ImageRef {
  const aws = AWS_IMAGE_ARN.exec(identifier);
  if (aws) {
    return { kind: 'name', name: aws[2]!, ...(aws[3] ? { version: aws[3] } : {}), accountId: aws[1]! };
  }
  if (identifier.startsWith('arn:cocoon:') || /^img-[0-9a-z]{26}$/.test(identifier)) return { kind: 'cocoon', idOrArn: identifier };
  return { kind: 'name', name: identifier };
}

/**
 * The base images a bundle's Dockerfile can start FROM offline (the builder seeds them), listed
 * by ListManagedMicrovmImages. `dockerfile` stands for "whatever the Dockerfile says" (images
 * made through Cocoon's own API show it).
 */
export const MANAGED_IMAGES = [
  { name: 'dockerfile', description: "the bundle's Dockerfile decides (FROM)", createdAt: '2026-12-01T00:00:00.000Z' },
  { name: 'busybox', description: 'FROM busybox', createdAt: '2026-12-01T00:00:00.000Z' },
  { name: 'debian-bookworm-slim', description: 'FROM debian:bookworm-slim', createdAt: '2026-12-01T00:00:00.000Z' },
] as const;
export const MANAGED_VERSION = '1';
export const MANAGED_ACCOUNT = 'cocoon';

export function managedImageArn(region: string, name: string): string {
  return `arn:cocoon:lambda:${region}:${MANAGED_ACCOUNT}:microvm-image:${name}`;
}

/** The managed image an ARN (of any region and of partition aws or cocoon) or bare name names, or undefined. */
export function findManagedImage(identifier: string): (typeof MANAGED_IMAGES)[number] | undefined {
  const m = /^arn:[a-z0-9-]+:lambda:[a-z0-9-]*:(?:aws|cocoon):microvm-image:([A-Za-z0-9._-]+)$/.exec(identifier);
  const name = m ? m[1] : identifier;
  return MANAGED_IMAGES.find((image) => image.name === name);
}

/** The image of a microVM's ARN name and version, from the Cocoon image ARN it keeps (…:microvm-image/<name>:<version>). */
export function imageNameAndVersion(cocoonImageArn: string): { name: string; version: string } {
  const m = /microvm-image\/([^:]+):(\d+)$/.exec(cocoonImageArn);
  return m ? { name: m[1]!, version: m[2]! } : { name: cocoonImageArn, version: '0' };
}
