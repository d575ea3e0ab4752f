/**
 * Starting a microVM from an image, for every surface that starts one (Cocoon's REST API, the
 * AWS surface): defaults of the idle policy and session, the clientToken's idempotency (a digest
 * of the request; a replay with other parameters is a conflict), the store row, the launch.
 */
import { createHash } from 'node:crypto';
import { CocoonError } from '../common/errors.ts';
import type { Image } from '../store/images.ts';
import { MAX_RUN_HOOK_PAYLOAD_BYTES, MAX_SESSION_SECONDS, createMicrovm, type IdlePolicy, type Microvm } from '../store/microvms.ts';
import type { Db } from '../store/sql.ts';
import type { LifecycleEngine } from './engine.ts';
import { assertRoomToLaunch } from './space-check.ts';

export const DEFAULT_MAX_IDLE_SECONDS = 300;

export interface StartMicrovmInput {
  tenantId: string;
  /** The tenant's image (resolved by the caller); it must be READY. */
  image: Image;
  idlePolicy?: Partial<IdlePolicy> | undefined;
  maximumDurationSeconds?: number | undefined;
  clientToken?: string | null | undefined;
  /** The body of the image's HTTP run hook; sensitive (only its digest counts for idempotency). */
  runHookPayload?: string | undefined;
  /** A surface's own parameters that make two requests with one clientToken different. */
  requestParts?: unknown[];
}

export async function startMicrovm(
  db: Db,
  engine: LifecycleEngine,
  region: string,
  input: StartMicrovmInput,
): Promise<{ microvm: Microvm; created: boolean }> {
  const idlePolicy: IdlePolicy = {
    autoResumeEnabled: input.idlePolicy?.autoResumeEnabled ?? true,
    maxIdleDurationSeconds: input.idlePolicy?.maxIdleDurationSeconds ?? DEFAULT_MAX_IDLE_SECONDS,
    suspendedDurationSeconds: input.idlePolicy?.suspendedDurationSeconds ?? null,
  };
  const maximumDurationSeconds = input.maximumDurationSeconds ?? MAX_SESSION_SECONDS;
  const payload = input.runHookPayload;
  if (payload !== undefined && Buffer.byteLength(payload, 'utf8') > MAX_RUN_HOOK_PAYLOAD_BYTES) {
    throw new CocoonError('invalid_request', `runHookPayload must be at most ${MAX_RUN_HOOK_PAYLOAD_BYTES} bytes (UTF-8)`, { status: 400 });
  }
  const requestParts: unknown[] = [input.image.id, idlePolicy, maximumDurationSeconds];
  if (payload !== undefined) requestParts.push(createHash('sha256').update(payload).digest('hex'));
  if (input.requestParts?.length) requestParts.push(...input.requestParts);
  const clientRequestHash = createHash('sha256').update(JSON.stringify(requestParts)).digest('hex');
  // Refused up front (507 no_space, no microVM made) when the data directory cannot hold its memory.
  await assertRoomToLaunch(engine.dataDir, input.image.memoryMiB, `a microVM of image ${input.image.id}`);
  const { microvm, created } = await createMicrovm(db, {
    tenantId: input.tenantId,
    region,
    imageId: input.image.id,
    idlePolicy,
    maximumDurationSeconds,
    clientToken: input.clientToken ?? null,
    clientRequestHash,
    ...(payload !== undefined ? { runHookPayload: payload } : {}),
  });
  if (created) await engine.launch(microvm);
  return { microvm, created };
}
