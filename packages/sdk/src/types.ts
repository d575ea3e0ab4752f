/**
 * The resources of the Cocoon API (docs/contract.md), as the server answers them. The server may add
 * fields; these are the ones it promises.
 */

export type ImageState = 'PENDING' | 'BUILDING' | 'BOOTING' | 'SNAPSHOTTING' | 'READY' | 'FAILED';
export const IMAGE_STATES: readonly ImageState[] = ['PENDING', 'BUILDING', 'BOOTING', 'SNAPSHOTTING', 'READY', 'FAILED'];

export type MicroVMState =
  | 'PENDING' | 'RUNNING' | 'SUSPENDING' | 'SUSPENDED' | 'RESUMING' | 'TERMINATING' | 'TERMINATED' | 'FAILED';
export const MICROVM_STATES: readonly MicroVMState[] = [
  'PENDING', 'RUNNING', 'SUSPENDING', 'SUSPENDED', 'RESUMING', 'TERMINATING', 'TERMINATED', 'FAILED',
];

/** A page of a list; pass `nextCursor` back as `cursor` for the next one (null: last page). */
export interface Page<T> {
  items: T[];
  nextCursor: string | null;
}

export interface PageParams {
  /** 1–1000, default 50. */
  limit?: number;
  cursor?: string | null;
}

export interface Health {
  status: 'ok' | 'starting';
}

export interface Bundle {
  /** Pass as `bundle` to `images.create`. */
  uri: string;
  sha256: string;
  sizeBytes: number;
  format?: 'tar.gz' | 'zip';
  createdAt?: string;
}

export interface Readiness {
  /** GET this path on the app port; ready on a 2xx answer. */
  httpPath?: string | null;
  /** At most 3600. */
  timeoutSeconds?: number;
}

export interface CreateImageInput {
  /** Letters, digits, ".", "_", "-"; part of the ARN. */
  name: string;
  /** A bundle's `uri` (from `bundles.push`) or `s3://bucket/key`. */
  bundle: string;
  /** The app port (default the Dockerfile's EXPOSE, else 8080). */
  port?: number;
  /** 1–16. */
  vcpus?: number;
  /** 128–32768. */
  memoryMiB?: number;
  /** Up to 32768. */
  diskMiB?: number;
  readiness?: Readiness;
  /** Let the guest reach the network (default false). */
  networkEgress?: boolean;
}

export interface Image {
  id: string;
  /** `arn:cocoon:<region>:<account>:microvm-image/<name>:<version>` */
  arn: string;
  name: string;
  version: number;
  state: ImageState;
  /** Why it FAILED. */
  error: string | null;
  vcpus: number;
  memoryMiB: number;
  diskMiB: number;
  port: number;
  createdAt: string;
  bundle?: string;
  bundleSha256?: string | null;
  readiness?: { httpPath: string | null; timeoutSeconds: number };
  networkEgress?: boolean;
  /** Duration of each build phase so far, milliseconds. */
  timings?: Record<string, number>;
  updatedAt?: string;
}

export interface ImageListParams extends PageParams {
  state?: ImageState | ImageState[];
  name?: string;
}

export interface IdlePolicy {
  /** A request wakes a SUSPENDED microVM (default true); otherwise the gateway answers 409. */
  autoResumeEnabled: boolean;
  /** No traffic for this long → SUSPENDED (default 300). */
  maxIdleDurationSeconds: number;
  /** SUSPENDED this long → TERMINATED (null: until the session ends). */
  suspendedDurationSeconds: number | null;
}

export interface StartMicroVMInput {
  /** Image ARN or id. */
  image: string;
  idlePolicy?: Partial<IdlePolicy>;
  /** The session ends after this long, whatever the state (default and maximum 28800). */
  maximumDurationSeconds?: number;
  /** Makes the start idempotent: a retry with the same token returns the same microVM. */
  clientToken?: string;
}

export interface ForkMicroVMInput {
  /** How many forks (1–16, default 1). */
  count?: number;
  /** Default: the source's idle policy. */
  idlePolicy?: Partial<IdlePolicy>;
  /** Each fork's session (default: the source's maximumDurationSeconds, counted from the fork). */
  maximumDurationSeconds?: number;
  /**
   * Leave the forks SUSPENDED (default false): none is started; each wakes on its first request
   * or resume. The answer comes once they are committed.
   */
  suspended?: boolean;
}

export interface ForkedMicroVMs {
  /** The forks, each RUNNING (SUSPENDED with `suspended: true`; FAILED if it failed to start) with its own first token. */
  items: StartedMicroVM[];
  /** How long the source's vCPUs were stopped (0 when it was SUSPENDED). */
  sourcePausedMs: number;
}

export interface CheckpointInput {
  /** The image's name (default: the source image's name, as a new version of it). */
  name?: string;
}

export interface MicroVM {
  id: string;
  /** `arn:cocoon:<region>:<account>:microvm/<id>` */
  arn: string;
  /** The image ARN. */
  image: string;
  imageId?: string | null;
  state: MicroVMState;
  error?: string | null;
  idlePolicy: IdlePolicy;
  maximumDurationSeconds?: number;
  vcpus?: number;
  memoryMiB?: number;
  port?: number;
  /** The microVM through the gateway: send `X-Cocoon-Token` with every request. */
  url: string;
  createdAt: string;
  /** End of the session. */
  expiresAt: string;
  lastActivityAt: string;
  suspendedAt?: string | null;
  terminatedAt?: string | null;
}

/** What `microvms.start` answers: the microVM and a first gateway token (shown once). */
export interface StartedMicroVM extends MicroVM {
  token: string | null;
  tokenId?: string | null;
  tokenExpiresAt: string | null;
}

export interface MicroVMListParams extends PageParams {
  state?: MicroVMState | MicroVMState[];
  /** Image ARN or id. */
  image?: string;
}

/** `http`: web requests to the app; `shell`: a terminal through the gateway (`pty.openWithToken`), nothing else. */
export type TokenScope = 'http' | 'shell';

/** A guest port, or an inclusive range of guest ports. */
export type PortSpec = number | { from: number; to: number };

export interface CreateTokenInput {
  /** 1–60, default 60. */
  expirationMinutes?: number;
  /** Ports and ranges; default: every port (http tokens). */
  allowedPorts?: PortSpec[];
  /** Default `http`. */
  scope?: TokenScope;
}

/** A new gateway token: send `token` as `X-Cocoon-Token` (shown once). */
export interface IssuedToken {
  id: string;
  token: string;
  scope?: TokenScope;
  expiresAt: string;
  allowedPorts: PortSpec[] | null;
}

export interface TokenInfo {
  id: string;
  scope?: TokenScope;
  expiresAt: string;
  allowedPorts: PortSpec[] | null;
  createdAt: string;
  revokedAt: string | null;
}

export interface Tenant {
  id: string;
  name: string;
  accountId: string;
  isAdmin?: boolean;
  createdAt?: string;
}

/** A new tenant and its first API key (shown once). */
export interface CreatedTenant extends Tenant {
  apiKey: string;
}

export interface ApiKey {
  id: string;
  name: string | null;
  /** The key's first characters, to recognise it. */
  prefix: string;
  createdAt: string;
  lastUsedAt: string | null;
  revokedAt: string | null;
}

/** A new API key (the secret `apiKey` is shown once). */
export interface CreatedApiKey extends ApiKey {
  apiKey: string;
}

/** Public facts about a server (no key needed): where its gateway is. */
export interface ServerInfo {
  version: string;
  region: string;
  gateway: { domain: string; port: number | null };
}
