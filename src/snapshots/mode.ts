/**
 * When snapshots are shared through the object store: in a cluster, i.e. when the metadata store
 * is PostgreSQL (`COCOON_DATABASE_URL`) and the object store is S3 (`COCOON_S3_BUCKET`). Hosts
 * then see one another's images and microVMs, and a microVM may resume on any of them. With
 * SQLite or the local object store (one host) nothing is uploaded: behaviour as without a cluster.
 */
import type { ObjectStore } from '../objectstore/object-store.ts';
import { SnapshotStore } from './snapshot-store.ts';

export function sharesSnapshots(databaseUrl: string | undefined, objects: ObjectStore): boolean {
  return objects.kind === 's3' && databaseUrl !== undefined && /^postgres(ql)?:\/\//.test(databaseUrl);
}

/** The process's snapshot store when snapshots are shared, else undefined. */
export function sharedSnapshotStore(databaseUrl: string | undefined, objects: ObjectStore): SnapshotStore | undefined {
  return sharesSnapshots(databaseUrl, objects) ? new SnapshotStore(objects) : undefined;
}
