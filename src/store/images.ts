import { CocoonError } from '../common/errors.ts';
import { imageArn, isArn } from './arn.ts';
import { appendEvent } from './events.ts';
import { newId } from './ids.ts';
import { decodeCursor, pageLimit, toPage, type Page, type PageRequest } from './pagination.ts';
import type { Db, SqlParam } from './sql.ts';
import { boolColumn, insertRow, jsonColumn, rowMapper } from './rows.ts';
import { invalid, iso, jsonObject, placeholders, statesFilter } from './values.ts';

export const IMAGE_STATES = ['PENDING', 'BUILDING', 'BOOTING', 'SNAPSHOTTING', 'READY', 'FAILED'] as const;
export type ImageState = (typeof IMAGE_STATES)[number];

/** Image names become part of ARNs: no ':' or '/', and short. */
export const IMAGE_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

/** Guest hooks, as AWS Lambda MicroVMs names them; cocoon-init runs them inside the guest. */
export const HOOK_NAMES = ['run', 'suspend', 'resume', 'terminate'] as const;
export type HookName = (typeof HOOK_NAMES)[number];
export const MAX_HOOK_TIMEOUT_SECONDS = 60;

export interface ImageHook {
  /** A shell command (`/bin/sh -c`), written into the image's workload file by the builder. */
  command: string;
  /** 1–60 seconds; the lifecycle waits at most this long for the hook. */
  timeoutSeconds: number;
}

export type ImageHooks = Partial<Record<HookName, ImageHook>>;

/**
 * AWS Lambda MicroVMs' HTTP hooks: Cocoon POSTs `/aws/lambda-microvms/runtime/v1/<name>` to
 * `port` inside the guest (src/guest/http-hooks.ts). `ready` and `validate` run during the image
 * build (before the snapshot); the others at the same points as the command hooks above. A
 * present key = the hook is enabled.
 */
export const HTTP_BUILD_HOOK_NAMES = ['ready', 'validate'] as const;
export type HttpBuildHookName = (typeof HTTP_BUILD_HOOK_NAMES)[number];
export type HttpHookName = HttpBuildHookName | HookName;
export const MAX_HTTP_BUILD_HOOK_TIMEOUT_SECONDS = 3600;

export interface HttpHooks {
  /** The guest port the hooks listener answers on (forwarded like the app port). */
  port: number;
  ready?: { timeoutSeconds: number };
  validate?: { timeoutSeconds: number };
  run?: { timeoutSeconds: number };
  resume?: { timeoutSeconds: number };
  suspend?: { timeoutSeconds: number };
  terminate?: { timeoutSeconds: number };
}

export interface Readiness {
  /** Path of an HTTP GET that must answer 2xx; null: any complete HTTP answer on the port. */
  httpPath: string | null;
  timeoutSeconds: number;
}

export interface Image {
  id: string;
  tenantId: string;
  arn: string;
  name: string;
  /** 1, 2, 3… per tenant and name; never reused, even after a delete. */
  version: number;
  state: ImageState;
  error: string | null;
  bundleUri: string;
  /** Known once the bundle was fetched (or at once for cocoon:// bundles). */
  bundleSha256: string | null;
  vcpus: number;
  memoryMiB: number;
  diskMiB: number;
  port: number;
  /** false: an image with `"port": null` (no app port; `port` is a placeholder), ready once its workload started. */
  hasAppPort: boolean;
  readiness: Readiness;
  networkEgress: boolean;
  /** Guest hooks by name ({} when the image defines none). */
  hooks: ImageHooks;
  /** AWS-style HTTP hooks (null when the image has none). */
  httpHooks: HttpHooks | null;
  buildLogPath: string | null;
  /** Where the builder put what it made (root disk, snapshot…): object keys or paths by name. */
  artifacts: Record<string, string>;
  createdAt: string;
  updatedAt: string;
}

export interface NewImage {
  tenantId: string;
  /** The server's region, for the ARN. */
  region: string;
  name: string;
  bundleUri: string;
  bundleSha256?: string | null;
  vcpus: number;
  memoryMiB: number;
  diskMiB: number;
  port: number;
  /** Default true; false: no app port (`port` is then a placeholder). */
  hasAppPort?: boolean;
  readiness: Readiness;
  networkEgress?: boolean;
  /** Optional guest hooks (commands ≤ 4000 characters without newlines, timeouts 1–60 s). */
  hooks?: ImageHooks;
  /** Optional AWS-style HTTP hooks (timeouts filled in: build hooks 1–3600 s, the others 1–60 s). */
  httpHooks?: HttpHooks | null;
  now?: Date;
}

interface ImageRow {
  id: string;
  tenant_id: string;
  name: string;
  version: number;
  arn: string;
  state: ImageState;
  error: string | null;
  bundle_uri: string;
  bundle_sha256: string | null;
  vcpus: number;
  memory_mib: number;
  disk_mib: number;
  port: number;
  readiness_http_path: string | null;
  readiness_timeout_seconds: number;
  network_egress: number;
  hooks: string;
  http_hooks?: string | null;
  has_app_port?: number;
  build_log_path: string | null;
  artifacts: string;
  created_at: string;
  updated_at: string;
}

const toImage = rowMapper<ImageRow, Image>({
  id: 'id', tenantId: 'tenant_id', arn: 'arn', name: 'name', version: 'version', state: 'state', error: 'error',
  bundleUri: 'bundle_uri', bundleSha256: 'bundle_sha256',
  vcpus: 'vcpus', memoryMiB: 'memory_mib', diskMiB: 'disk_mib', port: 'port',
  hasAppPort: (row) => row.has_app_port !== 0,
  readiness: (row) => ({ httpPath: row.readiness_http_path, timeoutSeconds: row.readiness_timeout_seconds }),
  networkEgress: boolColumn('network_egress'),
  hooks: jsonColumn<ImageRow, ImageHooks>('hooks'),
  httpHooks: (row) => (row.http_hooks ? (jsonObject(row.http_hooks) as unknown as HttpHooks) : null),
  buildLogPath: 'build_log_path',
  artifacts: jsonColumn<ImageRow, Record<string, string>>('artifacts'),
  createdAt: 'created_at', updatedAt: 'updated_at',
});

function checkInt(value: unknown, min: number, max: number, what: string): void {
  if (!Number.isInteger(value) || (value as number) < min || (value as number) > max) {
    throw invalid(`${what} must be an integer from ${min} to ${max}`);
  }
}

function checkNewImage(input: NewImage): void {
  if (typeof input.name !== 'string' || !IMAGE_NAME.test(input.name)) {
    throw invalid('an image name is 1–64 letters, digits, ".", "_" or "-", starting with a letter or digit');
  }
  if (typeof input.bundleUri !== 'string' || input.bundleUri.length === 0 || input.bundleUri.length > 1100) {
    throw invalid('the bundle URI is missing or too long');
  }
  checkInt(input.vcpus, 1, 16, 'vcpus');
  checkInt(input.memoryMiB, 128, 32768, 'memoryMiB');
  checkInt(input.diskMiB, 1, 32768, 'diskMiB');
  checkInt(input.port, 1, 65535, 'port');
  if (typeof input.readiness !== 'object' || input.readiness === null) throw invalid('readiness is required');
  checkInt(input.readiness.timeoutSeconds, 1, 3600, 'readiness.timeoutSeconds');
  const path = input.readiness.httpPath;
  if (path !== null && (typeof path !== 'string' || !/^\/[\x21-\x7e]{0,1023}$/.test(path))) {
    throw invalid('readiness.httpPath must start with "/" and hold only visible ASCII characters');
  }
  checkHooks(input.hooks);
  checkHttpHooks(input.httpHooks);
}

export function checkHttpHooks(hooks: unknown): void {
  if (hooks === undefined || hooks === null) return;
  if (typeof hooks !== 'object' || Array.isArray(hooks)) throw invalid('httpHooks must be an object');
  const names: readonly string[] = [...HTTP_BUILD_HOOK_NAMES, ...HOOK_NAMES];
  for (const [name, hook] of Object.entries(hooks)) {
    if (name === 'port') {
      checkInt(hook, 1, 65535, 'httpHooks.port');
      continue;
    }
    if (!names.includes(name)) throw invalid(`unknown HTTP hook '${name}'; HTTP hooks are ${names.join(', ')} (and port)`);
    if (typeof hook !== 'object' || hook === null) throw invalid(`httpHooks.${name} must be an object`);
    const max = (HTTP_BUILD_HOOK_NAMES as readonly string[]).includes(name) ? MAX_HTTP_BUILD_HOOK_TIMEOUT_SECONDS : MAX_HOOK_TIMEOUT_SECONDS;
    checkInt((hook as { timeoutSeconds?: unknown }).timeoutSeconds, 1, max, `httpHooks.${name}.timeoutSeconds`);
  }
  if ((hooks as { port?: unknown }).port === undefined) throw invalid('httpHooks.port is required: the guest port the hooks listener answers on');
}

export function checkHooks(hooks: unknown): void {
  if (hooks === undefined) return;
  if (typeof hooks !== 'object' || hooks === null || Array.isArray(hooks)) throw invalid('hooks must be an object');
  for (const [name, hook] of Object.entries(hooks)) {
    if (!(HOOK_NAMES as readonly string[]).includes(name)) throw invalid(`unknown hook '${name}'; hooks are ${HOOK_NAMES.join(', ')}`);
    const { command, timeoutSeconds } = (hook ?? {}) as Partial<ImageHook>;
    if (typeof command !== 'string' || command.length === 0 || command.length > 4000 || /[\n\r\0]/.test(command)) {
      throw invalid(`hooks.${name}.command must be 1–4000 characters on one line`);
    }
    checkInt(timeoutSeconds, 1, MAX_HOOK_TIMEOUT_SECONDS, `hooks.${name}.timeoutSeconds`);
  }
}

/**
 * Creates an image in state PENDING with the next version for its name. The version counter
 * lives in `image_versions` and only ever grows, so an ARN is never handed out twice.
 */
export async function createImage(db: Db, input: NewImage): Promise<Image> {
  checkNewImage(input);
  const now = input.now ?? new Date();
  return db.transaction(async (tx) => {
    const tenant = await tx.get<{ account_id: string }>('SELECT account_id FROM tenants WHERE id = ?', [input.tenantId]);
    if (tenant === undefined) throw new CocoonError('tenant_not_found', `no tenant '${input.tenantId}'`, { status: 404 });
    const counter = await tx.get<{ last_version: number }>(
      `INSERT INTO image_versions (tenant_id, name, last_version) VALUES (?, ?, 1)
       ON CONFLICT (tenant_id, name) DO UPDATE SET last_version = image_versions.last_version + 1
       RETURNING last_version`,
      [input.tenantId, input.name],
    );
    const version = (counter as { last_version: number }).last_version;
    const row: ImageRow = {
      id: newId('image', now.getTime()),
      tenant_id: input.tenantId,
      name: input.name,
      version,
      arn: imageArn(input.region, tenant.account_id, input.name, version),
      state: 'PENDING',
      error: null,
      bundle_uri: input.bundleUri,
      bundle_sha256: input.bundleSha256 ?? null,
      vcpus: input.vcpus,
      memory_mib: input.memoryMiB,
      disk_mib: input.diskMiB,
      port: input.port,
      readiness_http_path: input.readiness.httpPath,
      readiness_timeout_seconds: input.readiness.timeoutSeconds,
      network_egress: input.networkEgress ? 1 : 0,
      hooks: JSON.stringify(input.hooks ?? {}),
      ...(input.httpHooks ? { http_hooks: JSON.stringify(input.httpHooks) } : {}),
      has_app_port: input.hasAppPort === false ? 0 : 1,
      build_log_path: null,
      artifacts: '{}',
      created_at: iso(now),
      updated_at: iso(now),
    };
    await insertRow(tx, 'images', row);
    await appendEvent(tx, {
      tenantId: row.tenant_id, resourceType: 'image', resourceId: row.id, type: 'created', toState: 'PENDING', now,
    });
    return toImage(row);
  });
}

/** Any tenant's image by id (for the builder and lifecycle, which act for the platform). */
export async function getImage(db: Db, id: string): Promise<Image | undefined> {
  const row = await db.get<ImageRow>('SELECT * FROM images WHERE id = ?', [id]);
  return row && toImage(row);
}

/** A tenant's image by id or ARN (what `GET /images/{id or arn}` accepts). */
export async function findTenantImage(db: Db, tenantId: string, idOrArn: string): Promise<Image | undefined> {
  const column = isArn(idOrArn) ? 'arn' : 'id';
  const row = await db.get<ImageRow>(`SELECT * FROM images WHERE tenant_id = ? AND ${column} = ?`, [tenantId, idOrArn]);
  return row && toImage(row);
}

export interface ImageQuery extends PageRequest {
  tenantId: string;
  state?: ImageState | readonly ImageState[];
  name?: string;
}

/** A tenant's images, newest first, with keyset pagination. */
export async function listImages(db: Db, query: ImageQuery): Promise<Page<Image>> {
  const limit = pageLimit(query.limit);
  const cursor = decodeCursor(query.cursor);
  const states = statesFilter(query.state, IMAGE_STATES, 'image state');
  const where = ['tenant_id = ?'];
  const params: SqlParam[] = [query.tenantId];
  if (states) { where.push(`state IN ${placeholders(states.length)}`); params.push(...states); }
  if (query.name !== undefined) { where.push('name = ?'); params.push(query.name); }
  if (cursor) { where.push('id < ?'); params.push(cursor); }
  const rows = await db.all<ImageRow>(
    `SELECT * FROM images WHERE ${where.join(' AND ')} ORDER BY id DESC LIMIT ?`,
    [...params, limit + 1],
  );
  return toPage(rows.map(toImage), limit);
}

/** Every image in one of `states`, any tenant (the builder resumes its queue after a restart). */
export async function listImagesInStates(db: Db, states: readonly ImageState[]): Promise<Image[]> {
  const list = statesFilter(states, IMAGE_STATES, 'image state') as ImageState[];
  const rows = await db.all<ImageRow>(`SELECT * FROM images WHERE state IN ${placeholders(list.length)} ORDER BY id`, list);
  return rows.map(toImage);
}

export interface ImageTransition {
  /** Why it FAILED, for the user (cleared on any other transition). */
  error?: string | null;
  /** Merged into the artifacts already recorded. */
  artifacts?: Record<string, string>;
  bundleSha256?: string;
  now?: Date;
}

/**
 * Compare-and-set: moves the image to `to` only if it is in `from` (one state or several).
 * Returns whether it moved; when it did, the change is in the event log too. Callers that
 * lose the race (false) re-read and decide again instead of overwriting.
 */
export async function transitionImage(
  db: Db,
  id: string,
  from: ImageState | readonly ImageState[],
  to: ImageState,
  patch: ImageTransition = {},
): Promise<boolean> {
  const fromStates = statesFilter(from, IMAGE_STATES, 'image state') as ImageState[];
  statesFilter(to, IMAGE_STATES, 'image state');
  const now = patch.now ?? new Date();
  return db.transaction(async (tx) => {
    const current = await tx.get<{ state: ImageState; tenant_id: string; artifacts: string }>(
      'SELECT state, tenant_id, artifacts FROM images WHERE id = ?',
      [id],
    );
    if (current === undefined || !fromStates.includes(current.state)) return false;
    const error = to === 'FAILED' ? (patch.error ?? 'the build failed') : null;
    const artifacts = patch.artifacts ? JSON.stringify({ ...jsonObject(current.artifacts), ...patch.artifacts }) : current.artifacts;
    const result = await tx.run(
      `UPDATE images SET state = ?, error = ?, artifacts = ?, bundle_sha256 = COALESCE(?, bundle_sha256), updated_at = ?
        WHERE id = ? AND state = ?`,
      [to, error, artifacts, patch.bundleSha256 ?? null, iso(now), id, current.state],
    );
    if (result.changes !== 1) return false;
    await appendEvent(tx, {
      tenantId: current.tenant_id, resourceType: 'image', resourceId: id, type: 'state_changed',
      fromState: current.state, toState: to, message: error, now,
    });
    return true;
  });
}

/** Records where the build log is written (a file the API can stream and follow). */
export async function setImageBuildLogPath(db: Db, id: string, path: string, now: Date = new Date()): Promise<boolean> {
  const result = await db.run('UPDATE images SET build_log_path = ?, updated_at = ? WHERE id = ?', [path, iso(now), id]);
  return result.changes === 1;
}

export type DeleteImageResult = 'deleted' | 'not_found' | 'in_use';

/**
 * Deletes a tenant's image unless a microVM that is not TERMINATED or FAILED still uses it
 * (`in_use`: the API answers 409). Check and delete happen in one transaction.
 */
export async function deleteImage(db: Db, tenantId: string, id: string): Promise<DeleteImageResult> {
  return db.transaction(async (tx) => {
    const image = await tx.get<{ id: string }>('SELECT id FROM images WHERE id = ? AND tenant_id = ?', [id, tenantId]);
    if (image === undefined) return 'not_found';
    const user = await tx.get(
      "SELECT 1 FROM microvms WHERE image_id = ? AND state NOT IN ('TERMINATED', 'FAILED') LIMIT 1",
      [id],
    );
    if (user !== undefined) return 'in_use';
    await tx.run('DELETE FROM images WHERE id = ?', [id]);
    await appendEvent(tx, { tenantId, resourceType: 'image', resourceId: id, type: 'deleted' });
    return 'deleted';
  });
}
