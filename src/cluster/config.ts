/**
 * What a host of a cluster needs to know about itself: whether it is in a cluster at all (a
 * PostgreSQL `COCOON_DATABASE_URL`; with SQLite everything in src/cluster/ stays off), how often
 * it heartbeats, when a silent host counts as dead, and the capacity it offers to placement.
 */
import fs from 'node:fs';
import os from 'node:os';
import { CocoonError } from '../common/errors.ts';
import { setting } from '../common/settings.ts';
import type { CocoonConfig } from '../config/config.ts';
import type { HostCapacity } from '../store/hosts.ts';

export interface ClusterSettings {
  /** Hosts share a PostgreSQL database: register, heartbeat, sweep, lease. false: one host (SQLite). */
  enabled: boolean;
  heartbeatIntervalMs: number;
  deadAfterMs: number;
  capacity: HostCapacity;
}

/** Default vCPUs per core: microVMs are idle most of the time (one 2-core host holds ~100). */
const VCPUS_PER_CORE = 64;
/** Default memory overcommit: a guest's memory is a sparse file that follows its real use. */
const MEMORY_FACTOR = 4;
/** Default disk overcommit: disks and snapshots are thin (qcow2 layers over the image). */
const DISK_FACTOR = 8;

export function clusterSettings(config: Pick<CocoonConfig, 'dataDir' | 'databaseUrl' | 'cluster'>): ClusterSettings {
  const given = config.cluster ?? {};
  const heartbeatIntervalMs = (given.heartbeatIntervalSeconds ?? setting('COCOON_HEARTBEAT_INTERVAL', {})) * 1000;
  const deadAfterMs = (given.hostDeadAfterSeconds ?? setting('COCOON_HOST_DEAD_AFTER', {})) * 1000;
  if (deadAfterMs < 3 * heartbeatIntervalMs) {
    throw new CocoonError(
      'invalid_config',
      `COCOON_HOST_DEAD_AFTER (${deadAfterMs / 1000} s) must be at least 3 times COCOON_HEARTBEAT_INTERVAL (${heartbeatIntervalMs / 1000} s), ` +
        'so that a host is never declared dead for one late heartbeat',
    );
  }
  return {
    enabled: config.databaseUrl !== undefined && config.databaseUrl !== '',
    heartbeatIntervalMs,
    deadAfterMs,
    capacity: {
      vcpus: given.vcpus ?? os.availableParallelism() * VCPUS_PER_CORE,
      memoryMiB: given.memoryMiB ?? Math.floor(os.totalmem() / 2 ** 20) * MEMORY_FACTOR,
      diskMiB: given.diskMiB ?? fileSystemMiB(config.dataDir) * DISK_FACTOR,
    },
  };
}

function fileSystemMiB(dir: string): number {
  try {
    const stats = fs.statfsSync(dir);
    return Math.floor((stats.blocks * stats.bsize) / 2 ** 20);
  } catch {
    return 0;
  }
}
