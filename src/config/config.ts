/**
 * Cocoon's configuration, from the environment (CONTRACT.md names the public variables).
 * Parsed and validated once at start-up; a bad value stops the server with a clear message.
 */
import path from 'node:path';
import { CocoonError } from '../common/errors.ts';
import { dataDir } from './paths.ts';

/**
 * COCOON_ACCEL: which accelerator VMs use (`auto` probes KVM, see src/vmm/qemu/accel.ts). Parsed
 * here, where every setting is, so that the configuration imports no role (the VMM imports it).
 */
export type AcceleratorChoice = 'tcg' | 'kvm' | 'auto';

export function parseAcceleratorChoice(value: string | undefined): AcceleratorChoice {
  const choice = (value ?? 'auto').toLowerCase();
  if (choice === 'auto' || choice === 'kvm' || choice === 'tcg') return choice;
  throw new CocoonError('invalid_config', `COCOON_ACCEL must be auto, kvm or tcg, got ${JSON.stringify(value)}`);
}

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
  /**
   * This host's identity (COCOON_HOST_ID): the microVMs it runs carry it in the store, and its
   * recovery touches only those. Unset: the id kept in the data directory (`<dataDir>/host-id`,
   * made on first start by the lifecycle: src/lifecycle/host-id.ts).
   */
  hostId?: string;
  /**
   * Where the gateway reaches the guest ports this host forwards (COCOON_HOST_ADDRESS; default
   * 127.0.0.1, where QEMU's forwards listen).
   */
  hostAddress?: string;
  /** `COCOON_DATABASE_URL`: a postgres:// URL for a shared PostgreSQL; unset: SQLite in the data directory. */
  databaseUrl?: string | undefined;
}

/** COCOON_HOST_ID: 1-64 of [A-Za-z0-9._-], starting with a letter or digit. */
export const HOST_ID_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

function port(name: string, value: string | undefined, fallback: number): number {
  if (value === undefined || value === '') return fallback;
  const parsed = Number(value);
  if (!Number.isInteger(parsed) || parsed < 0 || parsed > 65535) {
    throw new CocoonError('invalid_config', `${name} must be a TCP port (0-65535), got ${JSON.stringify(value)}`);
  }
  return parsed;
}

export function loadConfig(env: NodeJS.ProcessEnv = process.env): CocoonConfig {
  const region = env.COCOON_REGION ?? 'local-1';
  if (!/^[a-z0-9-]{1,32}$/.test(region)) {
    throw new CocoonError('invalid_config', `COCOON_REGION must be 1-32 of [a-z0-9-], got ${JSON.stringify(region)}`);
  }
  const dataDirectory = env.COCOON_DATA_DIR ? path.resolve(env.COCOON_DATA_DIR) : dataDir();
  const hostId = env.COCOON_HOST_ID || undefined;
  if (hostId !== undefined && !HOST_ID_PATTERN.test(hostId)) {
    throw new CocoonError('invalid_config', `COCOON_HOST_ID must be 1-64 of [A-Za-z0-9._-], starting with a letter or digit, got ${JSON.stringify(hostId)}`);
  }
  const hostAddress = env.COCOON_HOST_ADDRESS || '127.0.0.1';
  if (!/^[A-Za-z0-9.:-]{1,253}$/.test(hostAddress)) {
    throw new CocoonError('invalid_config', `COCOON_HOST_ADDRESS must be an IP address or host name, got ${JSON.stringify(hostAddress)}`);
  }
  return {
    dataDir: dataDirectory,
    host: env.COCOON_HOST ?? '127.0.0.1',
    apiPort: port('COCOON_API_PORT', env.COCOON_API_PORT, 7070),
    gatewayPort: port('COCOON_GATEWAY_PORT', env.COCOON_GATEWAY_PORT, 7071),
    gatewayDomain: env.COCOON_GATEWAY_DOMAIN ?? 'vm.localhost',
    region,
    accel: parseAcceleratorChoice(env.COCOON_ACCEL),
    ...(hostId ? { hostId } : {}),
    hostAddress,
    databaseUrl: env.COCOON_DATABASE_URL || undefined,
  };
}
