/**
 * Cocoon's configuration, from the environment (docs/configuration.md lists every setting; the
 * table is src/common/settings.ts). Parsed and validated once at start-up: a bad value stops the
 * server with a message that names the setting and why.
 */
import { checkSettings, setting, type Env, type SettingValue } from '../common/settings.ts';

/** COCOON_ACCEL: which accelerator VMs use (`auto` probes KVM, see src/vmm/qemu/accel.ts); `tcg` | `kvm` | `auto`. */
export type AcceleratorChoice = SettingValue<'COCOON_ACCEL'>;

export interface CocoonConfig {
  dataDir: string;
  host: string;
  apiPort: number;
  gatewayPort: number;
  /** `<microvm id>.<gatewayDomain>` picks a microVM at the gateway. */
  gatewayDomain: string;
  /** The region field of ARNs. */
  region: string;
  accel: AcceleratorChoice;
  /** `COCOON_DATABASE_URL`: a postgres:// URL for a shared PostgreSQL; unset: SQLite in the data directory. */
  databaseUrl?: string | undefined;
  /**
   * `COCOON_HOST_ID`: this host's identity; the microVMs it runs carry it in the store, and its
   * recovery touches only those. Unset: the id kept in the data directory (`<dataDir>/host-id`,
   * made on first start by the lifecycle: src/lifecycle/host-id.ts).
   */
  hostId?: string | undefined;
  /** `COCOON_HOST_ADDRESS`: where the other hosts of a cluster reach this host's API and gateway (default 127.0.0.1). */
  hostAddress?: string | undefined;
  /**
   * A cluster's timing and this host's offered capacity (docs/cluster.md; used only with a
   * PostgreSQL `databaseUrl`). Unset fields take their defaults (src/cluster/config.ts).
   */
  cluster?: {
    heartbeatIntervalSeconds?: number;
    hostDeadAfterSeconds?: number;
    vcpus?: number | undefined;
    memoryMiB?: number | undefined;
    diskMiB?: number | undefined;
  };
}

/** Checks every setting (throws `invalid_config` listing each bad one), then builds the configuration. */
export function loadConfig(env: Env = process.env): CocoonConfig {
  checkSettings(env);
  return {
    dataDir: setting('COCOON_DATA_DIR', env),
    host: setting('COCOON_HOST', env),
    apiPort: setting('COCOON_API_PORT', env),
    gatewayPort: setting('COCOON_GATEWAY_PORT', env),
    gatewayDomain: setting('COCOON_GATEWAY_DOMAIN', env),
    region: setting('COCOON_REGION', env),
    accel: setting('COCOON_ACCEL', env),
    databaseUrl: setting('COCOON_DATABASE_URL', env),
    hostId: setting('COCOON_HOST_ID', env),
    hostAddress: setting('COCOON_HOST_ADDRESS', env),
    cluster: {
      heartbeatIntervalSeconds: setting('COCOON_HEARTBEAT_INTERVAL', env),
      hostDeadAfterSeconds: setting('COCOON_HOST_DEAD_AFTER', env),
      vcpus: setting('COCOON_HOST_VCPUS', env),
      memoryMiB: setting('COCOON_HOST_MEMORY_MIB', env),
      diskMiB: setting('COCOON_HOST_DISK_MIB', env),
    },
  };
}
