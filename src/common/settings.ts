/**
 * Every `COCOON_*` environment setting, in one table: its default, what it does and what values
 * it takes. Code reads a setting only through `setting(name)` (validated on every read, cheap);
 * the server checks them all at start (`checkSettings`, called by `loadConfig`) and refuses to
 * start on a bad value, naming the setting and why. docs/configuration.md is generated from this
 * table (`node scripts/configuration-doc.ts`); test/contracts/settings.test.ts fails when src/
 * reads a COCOON_* variable elsewhere, or when the doc is stale.
 *
 * Adding a setting: add an entry here, read it with `setting('COCOON_…')`, regenerate the doc.
 *
 * Why here and not in src/config/: every role reads settings, the logger included (its level),
 * so the table sits with the errors and the logger at the bottom of the import graph; src/config/
 * builds the server's configuration from it. (Folders must not import each other in a cycle.)
 *
 * The CLI's client settings (which server, which key) belong to the CLI: they are listed here
 * with `reader: 'src/cli/context.ts'` for the doc, and only that file reads them (the SDK in
 * packages/sdk reads COCOON_API_URL and COCOON_API_KEY the same way, outside src/).
 */
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { CocoonError } from './errors.ts';

export type SettingGroup = 'server' | 'cluster' | 'images' | 'builder' | 'vmm' | 's3' | 'cli';

export const SETTING_GROUPS: Record<SettingGroup, string> = {
  server: 'Server',
  cluster: 'Cluster (hosts sharing one PostgreSQL: docs/cluster.md; inert with SQLite)',
  images: 'Images and builds',
  builder: 'Builder (buildah and base images)',
  vmm: 'VMs (QEMU, its sandbox, cgroups and egress)',
  s3: 'Object store on S3 (the local directory otherwise)',
  cli: 'CLI client (read by `bin/cocoon` and the SDK, not by the server)',
};

export interface SettingSpec<T> {
  readonly group: SettingGroup;
  /** The default, as the doc shows it. */
  readonly default: string;
  readonly meaning: string;
  /** The values it takes, as the doc shows them. */
  readonly values: string;
  /** Holds a secret (a password in a URL, a key): its value never appears in a message. */
  readonly secret?: boolean;
  /** The one file that reads it when it is not read through `setting()` (the CLI's settings). */
  readonly reader?: string;
  /** Parses a raw value (undefined when unset); throws `Invalid` with the reason. */
  readonly parse: (raw: string | undefined) => T;
}

/** A bad value; `setting()` turns it into an `invalid_config` error naming the setting. */
class Invalid extends Error {}

/** The repository (or installed package) root (src/common/ is two levels down). */
const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

const unset = (raw: string | undefined): raw is undefined | '' => raw === undefined || raw === '';

function text(fallback: string): (raw: string | undefined) => string {
  return (raw) => (unset(raw) ? fallback : raw);
}

function optional(raw: string | undefined): string | undefined {
  return unset(raw) ? undefined : raw;
}

function integer(fallback: number, min: number, max: number): (raw: string | undefined) => number {
  return (raw) => {
    if (unset(raw)) return fallback;
    const n = Number(raw);
    if (!/^[0-9]+$/.test(raw.trim()) || !Number.isSafeInteger(n) || n < min || n > max) throw new Invalid(`must be an integer from ${min} to ${max}`);
    return n;
  };
}

function port(fallback: number): (raw: string | undefined) => number {
  return (raw) => {
    if (unset(raw)) return fallback;
    const n = Number(raw);
    if (!Number.isInteger(n) || n < 0 || n > 65535) throw new Invalid('must be a TCP port (0-65535)');
    return n;
  };
}

function oneOf<const V extends string>(fallback: V, allowed: readonly V[], caseless = false): (raw: string | undefined) => V {
  return (raw) => {
    if (unset(raw)) return fallback;
    const value = (caseless ? raw.toLowerCase() : raw) as V;
    if (!allowed.includes(value)) throw new Invalid(`must be ${allowed.join(', ').replace(/, ([^,]*)$/, ' or $1')}`);
    return value;
  };
}

/** `1`/`0` style switches; `on` is what an unset switch means. */
function switchOn(fallback: boolean, on: readonly string[], off: readonly string[]): (raw: string | undefined) => boolean {
  return (raw) => {
    if (unset(raw)) return fallback;
    if (on.includes(raw.toLowerCase())) return true;
    if (off.includes(raw.toLowerCase())) return false;
    throw new Invalid(`must be ${[...on, ...off].join(', ').replace(/, ([^,]*)$/, ' or $1')}`);
  };
}

function absoluteOrRelativePath(fallback: () => string): (raw: string | undefined) => string {
  return (raw) => {
    if (unset(raw)) return path.resolve(fallback());
    if (raw.includes('\0')) throw new Invalid('must be a path');
    return path.resolve(raw);
  };
}

/** A host id (COCOON_HOST_ID, and the one kept in the data directory). */
export const HOST_ID_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;

function define<const S extends Record<`COCOON_${string}`, SettingSpec<unknown>>>(settings: S): S {
  return settings;
}

export const SETTINGS = define({
  // ---- server
  COCOON_DATA_DIR: {
    group: 'server', default: '`./.cocoon`', values: 'a directory (made if missing, mode 0700)',
    meaning: 'All state of the server: database, objects, images, microVMs, the admin key.',
    parse: absoluteOrRelativePath(() => path.join(process.cwd(), '.cocoon')),
  },
  COCOON_HOST: {
    group: 'server', default: '`127.0.0.1`', values: 'an address to listen on',
    meaning: 'Where the API and the gateway listen.',
    parse: text('127.0.0.1'),
  },
  COCOON_API_PORT: {
    group: 'server', default: '`7070`', values: '0-65535 (0: any free port)',
    meaning: 'The API\'s (and dashboard\'s) port.',
    parse: port(7070),
  },
  COCOON_GATEWAY_PORT: {
    group: 'server', default: '`7071`', values: '0-65535 (0: any free port)',
    meaning: 'The gateway\'s port.',
    parse: port(7071),
  },
  COCOON_GATEWAY_DOMAIN: {
    group: 'server', default: '`vm.localhost`', values: 'a host name',
    meaning: 'MicroVMs answer at `<id>.<domain>` on the gateway.',
    parse: (raw) => {
      if (unset(raw)) return 'vm.localhost';
      if (!/^[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*\.?$/.test(raw) || raw.length > 253) throw new Invalid('must be a host name');
      return raw;
    },
  },
  COCOON_REGION: {
    group: 'server', default: '`local-1`', values: '1-32 of `[a-z0-9-]`',
    meaning: 'The region field of ARNs.',
    parse: (raw) => {
      const value = raw ?? 'local-1';
      if (!/^[a-z0-9-]{1,32}$/.test(value)) throw new Invalid('must be 1-32 of [a-z0-9-]');
      return value;
    },
  },
  COCOON_LOG_LEVEL: {
    group: 'server', default: '`info` (`warn` when `NODE_ENV=test`)', values: LOG_LEVELS.map((l) => `\`${l}\``).join(', '),
    meaning: 'How much the server logs (JSON lines on stdout, pino).',
    parse: (raw) => oneOf<(typeof LOG_LEVELS)[number]>(process.env.NODE_ENV === 'test' ? 'warn' : 'info', LOG_LEVELS)(raw),
  },
  COCOON_DATABASE_URL: {
    group: 'server', default: 'none (SQLite in the data directory)', values: 'a `postgres://` or `postgresql://` URL',
    meaning: 'A shared PostgreSQL for the metadata store (hosts of a cluster share it); unset: SQLite at `$COCOON_DATA_DIR/cocoon.db`. Its password never appears in messages or logs.',
    secret: true,
    parse: (raw) => {
      if (unset(raw)) return undefined;
      if (!/^postgres(ql)?:\/\//.test(raw)) throw new Invalid('must be a postgres:// or postgresql:// URL (or unset for SQLite in the data directory)');
      return raw;
    },
  },
  COCOON_HOST_ID: {
    group: 'server', default: 'a random id kept in `<data dir>/host-id` (made on first start)', values: '1-64 of `[A-Za-z0-9._-]`, starting with a letter or digit',
    meaning: 'This host\'s identity in the store: a launch claims the microVM for it, and its recovery and scheduler touch only its own microVMs (and unclaimed ones).',
    parse: (raw) => {
      if (unset(raw)) return undefined;
      if (!HOST_ID_PATTERN.test(raw)) throw new Invalid('must be 1-64 of [A-Za-z0-9._-], starting with a letter or digit');
      return raw;
    },
  },
  COCOON_HOST_ADDRESS: {
    group: 'server', default: '`127.0.0.1`', values: 'an IP address or host name',
    meaning: 'Where the other hosts of a cluster reach this host: its API and gateway URLs in the `hosts` table are `http://<address>:<port>` (docs/cluster.md). On one machine the default is right; on several, an address the others can route to.',
    parse: (raw) => {
      if (unset(raw)) return '127.0.0.1';
      if (!/^[A-Za-z0-9.:-]{1,253}$/.test(raw)) throw new Invalid('must be an IP address or host name');
      return raw;
    },
  },
  // ---- cluster
  COCOON_HEARTBEAT_INTERVAL: {
    group: 'cluster', default: '`5`', values: '1-300 (seconds)',
    meaning: 'How often a host of a cluster records in the database that it lives (and looks for hosts that fell silent).',
    parse: integer(5, 1, 300),
  },
  COCOON_HOST_DEAD_AFTER: {
    group: 'cluster', default: '`30`', values: '3-3600 (seconds), at least 3 heartbeat intervals',
    meaning: 'A host silent this long is declared dead by another host: its SUSPENDED microVMs become resumable anywhere, its running ones FAILED (`host_lost`). A host that could not heartbeat for this long minus one interval stops its own VMs first.',
    parse: integer(30, 3, 3600),
  },
  COCOON_HOST_VCPUS: {
    group: 'cluster', default: '64 per CPU core (microVMs idle most of the time)', values: 'a positive integer',
    meaning: 'The vCPUs this host offers to placement: the sum of its running microVMs\' vCPUs stays at or below it.',
    parse: (raw) => (unset(raw) ? undefined : integer(0, 1, 1_000_000)(raw)),
  },
  COCOON_HOST_MEMORY_MIB: {
    group: 'cluster', default: '4 × the host\'s memory (a guest\'s memory follows its real use)', values: 'a positive integer (MiB)',
    meaning: 'The memory this host offers to placement, counted as the sum of its running microVMs\' memory sizes.',
    parse: (raw) => (unset(raw) ? undefined : integer(0, 1, 1_000_000_000)(raw)),
  },
  COCOON_HOST_DISK_MIB: {
    group: 'cluster', default: '8 × the size of the data directory\'s file system (disks are thin)', values: 'a positive integer (MiB)',
    meaning: 'The disk this host offers to placement, counted as the sum of the disk sizes of the microVMs it holds (SUSPENDED ones included).',
    parse: (raw) => (unset(raw) ? undefined : integer(0, 1, 1_000_000_000_000)(raw)),
  },
  COCOON_CACHE_DIR: {
    group: 'server', default: '`<repository>/.cache`', values: 'a directory',
    meaning: 'Built and downloaded artifacts that can be rebuilt: guest kernel, cocoon-init, base images, the native helper.',
    parse: absoluteOrRelativePath(() => path.join(REPO_ROOT, '.cache')),
  },
  COCOON_ACCEL: {
    group: 'vmm', default: '`auto`', values: '`auto`, `kvm`, `tcg` (any case)',
    meaning: 'The accelerator: `auto` uses KVM only where a probe guest really boots under it, else TCG.',
    parse: oneOf('auto', ['auto', 'kvm', 'tcg'], true),
  },

  // ---- images
  COCOON_IMAGE_BUILDS: {
    group: 'images', default: '`1`', values: '1-64',
    meaning: 'Image builds at a time.',
    parse: integer(1, 1, 64),
  },
  COCOON_IMAGE_QUEUE_MAX: {
    group: 'images', default: '`100`', values: '0-100000',
    meaning: 'Images waiting for a builder at most; beyond, POST /images answers 429 `build_queue_full`.',
    parse: integer(100, 0, 100_000),
  },
  COCOON_BUNDLE_MAX_BYTES: {
    group: 'images', default: 'the builder\'s bound (docs/images.md)', values: 'a positive integer (bytes)',
    meaning: 'The largest bundle archive accepted (upload or S3).',
    parse: (raw) => (unset(raw) ? undefined : integer(0, 1, Number.MAX_SAFE_INTEGER)(raw)),
  },

  // ---- builder
  COCOON_BUILDAH: {
    group: 'builder', default: '`buildah`', values: 'a program name or path',
    meaning: 'The buildah binary.',
    parse: text('buildah'),
  },
  COCOON_RUNC: {
    group: 'builder', default: '`runc`', values: 'a program name or path',
    meaning: 'The OCI runtime buildah runs RUN steps with.',
    parse: text('runc'),
  },
  COCOON_BUILD_NETWORK: {
    group: 'builder', default: '`private`', values: '`private`, `host`, `none`',
    meaning: 'Network of RUN steps: `private` a CNI bridge with NAT (package installs work, the host\'s loopback services are out of reach); `host` the host\'s network (trusted Dockerfiles only); `none` no network.',
    parse: oneOf('private', ['private', 'host', 'none']),
  },
  COCOON_BUSYBOX: {
    group: 'builder', default: '`/bin/busybox`', values: 'a path to a static busybox',
    meaning: 'The host busybox the local `busybox` base image is seeded from.',
    parse: text('/bin/busybox'),
  },
  COCOON_DEBIAN_MIRROR: {
    group: 'builder', default: 'the host\'s apt sources', values: 'a Debian mirror URL',
    meaning: 'The Debian archive the local `debian:bookworm-slim` base image is bootstrapped from.',
    parse: optional,
  },

  // ---- vmm
  COCOON_QEMU: {
    group: 'vmm', default: '`qemu-system-x86_64`', values: 'a program name or path',
    meaning: 'The QEMU binary.',
    parse: text('qemu-system-x86_64'),
  },
  COCOON_QEMU_LISTEN_SHIM: {
    group: 'vmm', default: '`1`', values: '`1`, `0`',
    meaning: 'QEMU runs with cocoon-listen.so preloaded, which gives its forwarded guest ports a backlog of 256 instead of libslirp\'s 1, so the gateway opens connections to a guest port many at a time (docs/gateway.md); `0` leaves QEMU as it is (the benchmark\'s before).',
    parse: switchOn(true, ['1'], ['0']),
  },
  COCOON_QEMU_SANDBOX: {
    group: 'vmm', default: '`1`', values: '`1`, `0`',
    meaning: 'QEMU\'s seccomp sandbox (`-sandbox on`); `0` turns it off (diagnosis only).',
    parse: switchOn(true, ['1'], ['0']),
  },
  COCOON_QEMU_USER: {
    group: 'vmm', default: '`cocoon-qemu`', values: 'a user name (`[a-z_][a-z0-9_-]{0,31}`), or `root` (or empty)',
    meaning: 'The system user whose group QEMU runs in when the daemon is root (created if missing); `root` keeps QEMU as root (diagnosis only). A daemon that is not root runs QEMU as itself.',
    parse: (raw) => {
      if (raw === undefined) return 'cocoon-qemu';
      if (raw === '' || raw === 'root') return 'root';
      if (!/^[a-z_][a-z0-9_-]{0,31}$/.test(raw)) throw new Invalid('must be a user name');
      return raw;
    },
  },
  COCOON_QEMU_UIDS: {
    group: 'vmm', default: 'per VM', values: '`per-vm`, `shared`',
    meaning: '`per-vm`: each QEMU runs under its own uid from a range (a guest that escapes QEMU cannot reach another VM\'s files); `shared`: all under the QEMU user\'s uid.',
    parse: oneOf('per-vm', ['per-vm', 'shared']),
  },
  COCOON_QEMU_ACCESS_ROOTS: {
    group: 'vmm', default: 'none', values: 'directories separated by `:`',
    meaning: 'Directories, besides the data directory and the temp directory, inside which Cocoon may add group search permission so that QEMU\'s user reaches its files.',
    parse: (raw) => (unset(raw) ? [] : raw.split(':').filter(Boolean)),
  },
  COCOON_QEMU_USER_REQUIRED: {
    group: 'vmm', default: '`0`', values: '`1`, `0`',
    meaning: '`1`: refuse to start a VM whose files QEMU\'s user cannot reach, instead of running that QEMU as root with a warning.',
    parse: switchOn(false, ['1'], ['0']),
  },
  COCOON_EGRESS_GUARD: {
    group: 'vmm', default: '`on`', values: '`on`, `off`',
    meaning: 'The host firewall rules that keep VMs with egress from the host\'s own services; `off` accepts the risk where they cannot be installed.',
    parse: switchOn(true, ['on'], ['off']),
  },
  COCOON_RAM_RESERVE_MAX_MIB: {
    group: 'vmm', default: '`2048`', values: 'MiB, `0` to `32768`',
    meaning: 'Guest RAM files up to this size have all their blocks reserved on the data directory\'s disk (a disk filled by anything cannot crash such a guest); bigger ones stay sparse (disk follows what the guest touches) and are protected by the space ledger and the space watch (docs/reliability.md).',
    parse: integer(2048, 0, 32768),
  },
  COCOON_QEMU_POOL: {
    group: 'vmm', default: '`2`', values: '`0` to `16`',
    meaning: 'QEMU processes started ahead and kept waiting for a restore (src/vmm/qemu/pool.ts): a restore or resume of a machine shape restored before takes one instead of starting QEMU. Each holds, copied ahead, the memory of the image last restored on its machine when that memory is at most `COCOON_RAM_RESERVE_MAX_MIB` (disk as a running VM\'s RAM file). Refilled in the background, one at a time; `0` turns the pool off.',
    parse: integer(2, 0, 16),
  },
  COCOON_VM_CGROUPS: {
    group: 'vmm', default: '`1`', values: '`1`, `0`',
    meaning: 'Per-VM cgroups (CPU, memory, pids limits); `0` turns them off.',
    parse: switchOn(true, ['1'], ['0']),
  },

  // ---- s3
  COCOON_S3_BUCKET: {
    group: 's3', default: 'none (local objects under the data directory)', values: 'an S3 bucket name',
    meaning: 'Keep bundles and objects in this S3 bucket instead of `$COCOON_DATA_DIR/objects`.',
    parse: optional,
  },
  COCOON_S3_REGION: {
    group: 's3', default: '`us-east-1`', values: 'an AWS region name',
    meaning: 'The bucket\'s region.',
    parse: text('us-east-1'),
  },
  COCOON_S3_ENDPOINT: {
    group: 's3', default: 'AWS', values: 'a URL',
    meaning: 'An S3-compatible endpoint (MinIO, s3rver, …).',
    parse: (raw) => {
      if (unset(raw)) return undefined;
      if (!URL.canParse(raw)) throw new Invalid('must be a URL such as http://127.0.0.1:9000');
      return raw;
    },
  },
  COCOON_S3_FORCE_PATH_STYLE: {
    group: 's3', default: 'true when an endpoint is set', values: '`1`, `true`, `yes` or anything else for false',
    meaning: 'Path-style bucket addressing (what most S3-compatible servers need).',
    parse: (raw) => (raw === undefined ? undefined : /^(1|true|yes)$/i.test(raw)),
  },
  COCOON_S3_PREFIX: {
    group: 's3', default: 'none', values: 'a key prefix',
    meaning: 'A prefix for every key Cocoon writes in the bucket.',
    parse: optional,
  },
  COCOON_S3_ACCESS_KEY_ID: {
    group: 's3', default: 'the AWS SDK\'s credential chain', values: 'an access key id (with the secret)',
    meaning: 'Static credentials; set both this and `COCOON_S3_SECRET_ACCESS_KEY`, or neither.',
    parse: (raw) => raw,
  },
  COCOON_S3_SECRET_ACCESS_KEY: {
    group: 's3', secret: true, default: 'the AWS SDK\'s credential chain', values: 'a secret access key (with the id)',
    meaning: 'The secret of `COCOON_S3_ACCESS_KEY_ID`. Never logged.',
    parse: (raw) => raw,
  },
  COCOON_S3_SESSION_TOKEN: {
    group: 's3', secret: true, default: 'none', values: 'a session token',
    meaning: 'A session token for temporary credentials.',
    parse: optional,
  },

  // ---- cli (read by src/cli/context.ts; the server ignores them)
  COCOON_API_URL: {
    group: 'cli', default: 'the data directory\'s `api-url`, else `http://$COCOON_HOST:$COCOON_API_PORT`', values: 'a URL',
    meaning: 'The server the CLI (and the SDK) talk to. `--api-url` wins.',
    reader: 'src/cli/context.ts', parse: optional,
  },
  COCOON_API_KEY: {
    group: 'cli', secret: true, default: 'the data directory\'s `admin-api-key`', values: 'an API key',
    meaning: 'The API key the CLI (and the SDK) send. `--api-key` wins.',
    reader: 'src/cli/context.ts', parse: optional,
  },
});

export type SettingName = keyof typeof SETTINGS;
export type SettingValue<N extends SettingName> = ReturnType<(typeof SETTINGS)[N]['parse']>;

/** Environment-like input (process.env, or a test's own). */
export type Env = Readonly<Record<string, string | undefined>>;

/** Reads and validates one setting; a bad value throws `invalid_config` naming it and why. */
export function setting<N extends SettingName>(name: N, env: Env = process.env): SettingValue<N> {
  const spec = SETTINGS[name] as SettingSpec<SettingValue<N>>;
  const raw = env[name];
  try {
    return spec.parse(raw);
  } catch (error) {
    if (!(error instanceof Invalid)) throw error;
    const got = spec.secret ? 'got a value that is not shown here (it holds a secret)' : `got ${JSON.stringify(raw)}`;
    throw new CocoonError('invalid_config', `${name} ${error.message}, ${got} (see docs/configuration.md)`);
  }
}

/**
 * Checks every server setting (the CLI's are the CLI's business) and cross-setting rules; throws
 * one `invalid_config` error listing every problem. The server calls it before it starts.
 */
export function checkSettings(env: Env = process.env): void {
  const problems: string[] = [];
  for (const name of Object.keys(SETTINGS) as SettingName[]) {
    if (SETTINGS[name].group === 'cli') continue;
    try {
      setting(name, env);
    } catch (error) {
      problems.push(error instanceof Error ? error.message : String(error));
    }
  }
  if (unset(env.COCOON_S3_ACCESS_KEY_ID) !== unset(env.COCOON_S3_SECRET_ACCESS_KEY)) {
    problems.push('set both COCOON_S3_ACCESS_KEY_ID and COCOON_S3_SECRET_ACCESS_KEY, or neither');
  }
  if (problems.length > 0) {
    throw new CocoonError('invalid_config', `Cocoon cannot start with this configuration:\n  ${problems.join('\n  ')}`);
  }
}
