/**
 * E2B sandboxes as Cocoon microVMs: one E2B sandbox is one microVM with the same id, plus a row
 * in `e2b_sandboxes` (store.ts). This file maps E2B's lifecycle onto Cocoon's and owns E2B's
 * timeout timers; the routes (control.ts) and envd (envd.ts) only call it.
 *
 * Mapping (docs/e2b.md):
 * - template: an image name (its newest READY version), an image id or an ARN.
 * - timeout: E2B's end of life, a timer here: at `end_at` the microVM is terminated, or
 *   suspended and marked paused when the sandbox was created with autoPause (onTimeout pause).
 *   Cocoon's own session limit (maximumDurationSeconds, 8 h) stays the outer bound.
 * - pause / connect: Cocoon suspend / resume (memory, disk and processes kept).
 * - Cocoon's idle suspend stays invisible: the microVM's idle policy auto-resumes, the sandbox
 *   is reported `running`, and the next call wakes it. Only a pause through E2B makes it
 *   `paused`; envd calls then answer 502 unless the sandbox has autoResume.
 * - envd access token: HMAC-SHA256 of the sandbox id under a per-server key (no table holds
 *   it; checked in constant time).
 */
import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { log as rootLog } from '../../common/log.ts';
import { MAX_FORKS, type MicrovmService } from '../../lifecycle/service.ts';
import { isArn } from '../../store/arn.ts';
import { findTenantImage, getImage, type Image } from '../../store/images.ts';
import {
  FINAL_MICROVM_STATES,
  MAX_SESSION_SECONDS,
  createMicrovm,
  getMicrovm,
  type Microvm,
} from '../../store/microvms.ts';
import type { Db } from '../../store/sql.ts';
import { E2bError } from './errors.ts';
import {
  getSandbox,
  getTenantSandbox,
  insertSandbox,
  listAllSandboxes,
  listTenantSandboxes,
  setSandboxEnd,
  setSandboxPaused,
  type E2bSandbox,
} from './store.ts';

/**
 * The envd version reported to clients. The SDK turns features on by it (stdin 0.3.0, default
 * user 0.4.0, closeStdin 0.5.2, octet-stream upload 0.5.7, file metadata 0.6.2, watch entries
 * 0.6.3): 0.5.7 is the newest whose every feature is served here, so file metadata and watch
 * entries are refused by the SDK itself with a clear message instead of failing half-way.
 */
export const ENVD_VERSION = '0.5.7';
export const DEFAULT_TIMEOUT_SECONDS = 300;
/** E2B's default idle policy for the underlying microVM: idle suspend is invisible to clients. */
const IDLE_SECONDS = 300;
const OPERATION_WAIT_MS = 60_000;
const KEY_FILE = 'e2b-token-key';
const MAX_METADATA_ENTRIES = 64;
const MAX_ENV_ENTRIES = 256;

const log = rootLog.child({ component: 'e2b' });

export type SandboxState = 'running' | 'paused';

export interface SandboxView {
  sandbox: E2bSandbox;
  microvm: Microvm;
  image: Image | undefined;
  state: SandboxState;
}

export interface CreateInput {
  template: string;
  timeoutSeconds?: number;
  metadata?: Record<string, string>;
  envs?: Record<string, string>;
  autoPause?: boolean;
  autoResume?: boolean;
}

async function withDeadline(work: Promise<unknown>, ms: number): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  try {
    await Promise.race([work.then(() => undefined), new Promise<void>((resolve) => (timer = setTimeout(resolve, ms)))]);
  } finally {
    clearTimeout(timer);
  }
}

function checkStrings(what: string, value: Record<string, string> | undefined, max: number): Record<string, string> {
  if (value === undefined || value === null) return {};
  if (typeof value !== 'object' || Array.isArray(value)) throw new E2bError(400, `${what} must be an object of strings`);
  const entries = Object.entries(value);
  if (entries.length > max) throw new E2bError(400, `${what} has more than ${max} entries`);
  for (const [k, v] of entries) {
    if (typeof v !== 'string' || k.length === 0 || k.length > 256 || v.length > 4096 || k.includes('\0') || v.includes('\0')) {
      throw new E2bError(400, `${what}: every key (1-256 characters) and value (≤ 4096 characters) must be a string without NUL`);
    }
  }
  return Object.fromEntries(entries);
}

export class E2bSandboxes {
  readonly #db: Db;
  readonly #microvms: () => MicrovmService;
  readonly #region: string;
  readonly #key: Buffer;
  readonly #timers = new Map<string, NodeJS.Timeout>();

  constructor(options: { db: Db; microvms: () => MicrovmService; region: string; dataDir: string }) {
    this.#db = options.db;
    this.#microvms = options.microvms;
    this.#region = options.region;
    this.#key = loadKey(options.dataDir);
  }

  // ---- access tokens ------------------------------------------------------------------------

  accessToken(microvmId: string): string {
    return createHmac('sha256', this.#key).update(`envd:${microvmId}`).digest('base64url');
  }

  checkAccessToken(microvmId: string, presented: string | undefined): boolean {
    if (typeof presented !== 'string' || presented.length > 200) return false;
    const expected = Buffer.from(this.accessToken(microvmId));
    const given = Buffer.from(presented);
    // Compared over the expected length whatever was sent, so the timing says nothing.
    const padded = Buffer.alloc(expected.length);
    given.copy(padded, 0, 0, expected.length);
    return timingSafeEqual(padded, expected) && given.length === expected.length;
  }

  // ---- lookups ------------------------------------------------------------------------------

  async #view(sandbox: E2bSandbox): Promise<SandboxView | undefined> {
    const microvm = await getMicrovm(this.#db, sandbox.microvmId);
    if (!microvm || FINAL_MICROVM_STATES.includes(microvm.state) || microvm.state === 'TERMINATING') return undefined;
    const image = microvm.imageId ? await getImage(this.#db, microvm.imageId) : undefined;
    return { sandbox, microvm, image, state: sandbox.paused ? 'paused' : 'running' };
  }

  /** A tenant's live sandbox, or 404 in E2B's shape (another tenant's reads as missing). */
  async get(tenantId: string, sandboxId: string): Promise<SandboxView> {
    const sandbox = await getTenantSandbox(this.#db, tenantId, sandboxId);
    const view = sandbox && (await this.#view(sandbox));
    if (!view) throw new E2bError(404, `sandbox ${sandboxId} not found`);
    return view;
  }

  /** For envd: the sandbox by id alone (the access token, checked by the caller, proves ownership). */
  async find(sandboxId: string): Promise<SandboxView | undefined> {
    const sandbox = await getSandbox(this.#db, sandboxId);
    return sandbox && this.#view(sandbox);
  }

  async list(tenantId: string): Promise<SandboxView[]> {
    const views: SandboxView[] = [];
    for (const sandbox of await listTenantSandboxes(this.#db, tenantId)) {
      const view = await this.#view(sandbox);
      if (view) views.push(view);
    }
    return views;
  }

  // ---- template → image ----------------------------------------------------------------------

  /** The READY image a template names (a Cocoon image name, id or ARN). */
  async template(tenantId: string, template: string): Promise<Image> {
    if (typeof template !== 'string' || template.length === 0 || template.length > 300) throw new E2bError(400, 'templateID must be a template name, id or ARN');
    let image: Image | undefined;
    if (isArn(template) || /^img-/.test(template)) image = await findTenantImage(this.#db, tenantId, template);
    if (!image) {
      // A name (an E2B tag suffix such as ":latest" is accepted and ignored): its newest READY version.
      const name = template.replace(/:latest$/, '');
      const row = await this.#db.get<{ id: string }>(
        "SELECT id FROM images WHERE tenant_id = ? AND name = ? AND state = 'READY' ORDER BY version DESC LIMIT 1",
        [tenantId, name],
      );
      image = row ? await getImage(this.#db, row.id) : undefined;
    }
    if (!image) throw new E2bError(404, `template '${template}' not found (a Cocoon image name, id or ARN with a READY version)`);
    if (image.state !== 'READY') throw new E2bError(400, `template '${template}' is ${image.state}, not READY`);
    return image;
  }

  #timeout(seconds: number | undefined): number {
    if (seconds === undefined || seconds === null) return DEFAULT_TIMEOUT_SECONDS;
    if (!Number.isInteger(seconds) || seconds < 0) throw new E2bError(400, 'timeout must be a whole number of seconds');
    if (seconds > MAX_SESSION_SECONDS) throw new E2bError(400, `timeout is at most ${MAX_SESSION_SECONDS} seconds here (Cocoon's session limit)`);
    return Math.max(seconds, 1);
  }

  // ---- lifecycle ------------------------------------------------------------------------------

  async create(tenantId: string, input: CreateInput): Promise<SandboxView> {
    const image = await this.template(tenantId, input.template);
    const timeout = this.#timeout(input.timeoutSeconds);
    const metadata = checkStrings('metadata', input.metadata, MAX_METADATA_ENTRIES);
    const envs = checkStrings('envVars', input.envs, MAX_ENV_ENTRIES);
    const autoPause = input.autoPause === true;
    const autoResume = input.autoResume === true;
    if (autoResume && !autoPause) throw new E2bError(400, 'autoResume needs autoPause (onTimeout: pause)');
    // A data directory too full for its memory: refused now (507 no_space, in E2B's error body:
    // the SDKs raise SandboxError "507: no_space: …"), before a sandbox exists that would only fail.
    await this.#microvms().assertRoomToLaunch(image);
    const { microvm } = await createMicrovm(this.#db, {
      tenantId,
      region: this.#region,
      imageId: image.id,
      idlePolicy: { autoResumeEnabled: true, maxIdleDurationSeconds: IDLE_SECONDS, suspendedDurationSeconds: null },
      maximumDurationSeconds: MAX_SESSION_SECONDS,
    });
    const now = new Date();
    const sandbox: E2bSandbox = {
      microvmId: microvm.id,
      tenantId,
      templateId: input.template,
      alias: image.name,
      metadata,
      envs,
      autoPause,
      autoResume,
      paused: false,
      startedAt: now.toISOString(),
      endAt: new Date(now.getTime() + timeout * 1000).toISOString(),
    };
    await insertSandbox(this.#db, sandbox);
    await this.#microvms().launch(microvm);
    this.#schedule(sandbox);
    return { sandbox, microvm, image, state: 'running' };
  }

  async kill(tenantId: string, sandboxId: string): Promise<void> {
    const view = await this.get(tenantId, sandboxId);
    this.#unschedule(sandboxId);
    await withDeadline(this.#microvms().terminate(view.microvm.id, 'killed through the E2B API'), OPERATION_WAIT_MS);
  }

  async setTimeout(tenantId: string, sandboxId: string, seconds: number): Promise<void> {
    const view = await this.get(tenantId, sandboxId);
    const endAt = new Date(Date.now() + this.#timeout(seconds) * 1000).toISOString();
    await setSandboxEnd(this.#db, view.sandbox.microvmId, endAt);
    if (!view.sandbox.paused) this.#schedule({ ...view.sandbox, endAt });
  }

  /** Suspends the microVM and marks the sandbox paused; false when it already was. */
  async pause(tenantId: string, sandboxId: string): Promise<boolean> {
    const view = await this.get(tenantId, sandboxId);
    if (view.sandbox.paused) return false;
    this.#unschedule(sandboxId);
    await setSandboxPaused(this.#db, sandboxId, true);
    await this.#microvms().suspend(view.microvm.id);
    return true;
  }

  /**
   * Connect (and 1.x resume): a paused sandbox is resumed (201), a running one answered as it is
   * (200). The timeout is set anew when given (a running sandbox's end only moves later).
   */
  async connect(tenantId: string, sandboxId: string, timeoutSeconds: number | undefined): Promise<{ view: SandboxView; resumed: boolean }> {
    const view = await this.get(tenantId, sandboxId);
    const resumed = view.sandbox.paused;
    const now = Date.now();
    let endAt = view.sandbox.endAt;
    if (resumed) {
      endAt = new Date(now + this.#timeout(timeoutSeconds) * 1000).toISOString();
    } else if (timeoutSeconds !== undefined) {
      const wanted = now + this.#timeout(timeoutSeconds) * 1000;
      if (wanted > Date.parse(endAt)) endAt = new Date(wanted).toISOString();
    }
    if (endAt !== view.sandbox.endAt) await setSandboxEnd(this.#db, sandboxId, endAt);
    if (resumed) await this.#wake(view);
    const sandbox = { ...view.sandbox, endAt, paused: false };
    this.#schedule(sandbox);
    return { view: { ...view, sandbox, state: 'running' }, resumed };
  }

  /** Resumes a paused sandbox (connect, or envd traffic with autoResume). */
  async #wake(view: SandboxView): Promise<void> {
    await setSandboxPaused(this.#db, view.sandbox.microvmId, false);
    try {
      await withDeadline(this.#microvms().resume(view.microvm.id), OPERATION_WAIT_MS);
    } catch (error) {
      // Not woken (507 no_space, a failed restore: its microVM stays SUSPENDED): the sandbox
      // stays paused too, as E2B lists it and as its timeout and envd traffic treat it.
      if ((await getMicrovm(this.#db, view.microvm.id))?.state === 'SUSPENDED') await setSandboxPaused(this.#db, view.sandbox.microvmId, true);
      throw error;
    }
  }

  /** envd traffic for a paused sandbox: resumed when it has autoResume (answers whether it may go on). */
  async admitTraffic(view: SandboxView): Promise<boolean> {
    if (!view.sandbox.paused) return true;
    if (!view.sandbox.autoResume) return false;
    await this.#wake(view);
    const endAt = new Date(Date.now() + DEFAULT_TIMEOUT_SECONDS * 1000).toISOString();
    await setSandboxEnd(this.#db, view.sandbox.microvmId, endAt);
    this.#schedule({ ...view.sandbox, paused: false, endAt });
    return true;
  }

  async fork(tenantId: string, sandboxId: string, count: number | undefined, timeoutSeconds: number | undefined): Promise<SandboxView[]> {
    const view = await this.get(tenantId, sandboxId);
    const n = count ?? 1;
    if (!Number.isInteger(n) || n < 1 || n > MAX_FORKS) throw new E2bError(400, `count must be from 1 to ${MAX_FORKS}`);
    const timeout = this.#timeout(timeoutSeconds);
    const { forks } = await this.#microvms().fork(view.microvm, { count: n });
    const views: SandboxView[] = [];
    const now = new Date();
    for (const fork of forks) {
      const sandbox: E2bSandbox = {
        ...view.sandbox,
        microvmId: fork.id,
        paused: false,
        startedAt: now.toISOString(),
        endAt: new Date(now.getTime() + timeout * 1000).toISOString(),
      };
      await insertSandbox(this.#db, sandbox);
      this.#schedule(sandbox);
      views.push({ sandbox, microvm: (await getMicrovm(this.#db, fork.id)) ?? fork, image: view.image, state: 'running' });
    }
    return views;
  }

  /** A snapshot is a Cocoon checkpoint: a new image version, usable as a template by its name. */
  async snapshot(tenantId: string, sandboxId: string, name: string | undefined): Promise<Image> {
    const view = await this.get(tenantId, sandboxId);
    const { image, done } = await this.#microvms().checkpoint(view.microvm, name);
    await withDeadline(done, OPERATION_WAIT_MS);
    return (await getImage(this.#db, image.id)) ?? image;
  }

  // ---- E2B timeouts ---------------------------------------------------------------------------

  /** Arms the timers of every live sandbox (at start-up). */
  async start(): Promise<void> {
    for (const sandbox of await listAllSandboxes(this.#db)) {
      const microvm = await getMicrovm(this.#db, sandbox.microvmId);
      if (microvm && !FINAL_MICROVM_STATES.includes(microvm.state) && !sandbox.paused) this.#schedule(sandbox);
    }
  }

  stop(): void {
    for (const timer of this.#timers.values()) clearTimeout(timer);
    this.#timers.clear();
  }

  #unschedule(id: string): void {
    clearTimeout(this.#timers.get(id));
    this.#timers.delete(id);
  }

  #schedule(sandbox: E2bSandbox): void {
    this.#unschedule(sandbox.microvmId);
    const delay = Math.max(0, Math.min(Date.parse(sandbox.endAt) - Date.now(), 2 ** 31 - 1));
    const timer = setTimeout(() => {
      this.#timers.delete(sandbox.microvmId);
      void this.#expire(sandbox.microvmId).catch((error: unknown) => log.warn({ err: error, sandbox: sandbox.microvmId }, 'E2B timeout action failed'));
    }, delay);
    timer.unref();
    this.#timers.set(sandbox.microvmId, timer);
  }

  async #expire(id: string): Promise<void> {
    const sandbox = await getSandbox(this.#db, id);
    if (!sandbox || sandbox.paused) return;
    if (Date.parse(sandbox.endAt) > Date.now() + 50) {
      this.#schedule(sandbox);
      return;
    }
    if (sandbox.autoPause) {
      await setSandboxPaused(this.#db, id, true);
      await this.#microvms().suspend(id);
    } else {
      await this.#microvms().terminate(id, 'the E2B sandbox timeout passed');
    }
  }
}

function loadKey(dataDir: string): Buffer {
  const file = path.join(dataDir, KEY_FILE);
  try {
    const key = fs.readFileSync(file);
    if (key.length === 32) return key;
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== 'ENOENT') throw error;
  }
  const key = randomBytes(32);
  fs.writeFileSync(file, key, { mode: 0o600 });
  return key;
}

