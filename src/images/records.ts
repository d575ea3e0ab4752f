/**
 * What the image service records on an image beyond its state: the app port once the image's
 * EXPOSE is known, and build facts kept in the image's `artifacts` map (string values):
 *
 *   portSource  'request' | 'expose' | 'default': where the port came from
 *   timings     JSON of ImageTimings, updated after every phase
 *   snapshot    the snapshot directory, once READY
 */
import { jsonObject } from '../store/values.ts';
import type { Image } from '../store/images.ts';
import type { Db } from '../store/sql.ts';

/** Per-phase durations of a build, milliseconds. */
export interface ImageTimings {
  /** Waiting in the build queue. */
  queuedMs?: number;
  /** Bundle download + validation + unpacking. */
  fetchMs?: number;
  /** buildah (base image check and Dockerfile build). */
  buildMs?: number;
  /** Export of the built image and the ext4 root disk. */
  diskMs?: number;
  /** QEMU start to cocoon-init's hello. */
  bootMs?: number;
  /** Hello to the app being ready (port accepting, or readiness.httpPath answering 2xx). */
  readyMs?: number;
  /** Snapshot of the ready VM, compacted. */
  snapshotMs?: number;
  /** In a cluster: the snapshot's upload to the object store. */
  publishMs?: number;
  /** Start of the build (after the queue) to READY. */
  totalMs?: number;
}

export const TIMING_KEYS = ['queuedMs', 'fetchMs', 'buildMs', 'diskMs', 'bootMs', 'readyMs', 'snapshotMs', 'totalMs'] as const;

export type PortSource = 'request' | 'expose' | 'default';

export function imageTimings(image: Pick<Image, 'artifacts'>): ImageTimings {
  const text = image.artifacts.timings;
  if (typeof text !== 'string') return {};
  try {
    const parsed = jsonObject(text);
    const out: ImageTimings = {};
    for (const key of TIMING_KEYS) {
      const value = parsed[key];
      if (typeof value === 'number' && Number.isFinite(value)) out[key] = value;
    }
    return out;
  } catch {
    return {};
  }
}

export function portSource(image: Pick<Image, 'artifacts'>): PortSource {
  const value = image.artifacts.portSource;
  return value === 'request' || value === 'expose' ? value : 'default';
}

/**
 * Merges `patch.artifacts` into the image's artifacts and sets its port, without a state
 * change. Returns false when the image is gone (deleted meanwhile).
 */
export async function updateImageBuildInfo(
  db: Db,
  id: string,
  patch: { port?: number; bundleSha256?: string; artifacts?: Record<string, string> },
  now: Date = new Date(),
): Promise<boolean> {
  return db.transaction(async (tx) => {
    const row = await tx.get<{ artifacts: string; port: number }>('SELECT artifacts, port FROM images WHERE id = ?', [id]);
    if (row === undefined) return false;
    const artifacts = patch.artifacts ? JSON.stringify({ ...jsonObject(row.artifacts), ...patch.artifacts }) : row.artifacts;
    const result = await tx.run(
      'UPDATE images SET artifacts = ?, port = ?, bundle_sha256 = COALESCE(?, bundle_sha256), updated_at = ? WHERE id = ?', [
      artifacts,
      patch.port ?? row.port,
      patch.bundleSha256 ?? null,
      now.toISOString(),
      id,
    ]);
    return result.changes === 1;
  });
}
