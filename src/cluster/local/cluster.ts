/**
 * A Cocoon cluster on one machine, for trying it and for tests (`npm run cluster -- up --hosts 3`,
 * `cocoon cluster up|down`; docs/cluster.md): Debian's PostgreSQL under the cluster's directory,
 * an S3-protocol server (s3rver), and N Cocoon hosts, each a `cocoon serve` process with its own
 * data directory, ports, COCOON_HOST_ID and COCOON_HOST_ADDRESS, all on one COCOON_DATABASE_URL
 * and one bucket (COCOON_S3_*).
 *
 * Everything runs detached (it outlives `up`) and is written down in `<dir>/cluster.json`, so
 * that `down` stops exactly what `up` started, from any process; `down` is idempotent. A test
 * passes `tiedToProcess`: a watchdog runs `down` when the test process ends, however it ends.
 *
 * Layout of `<dir>`:
 *   cluster.json        the state file (pids, ports, URLs; no secrets)
 *   postgres/           the PostgreSQL cluster (data/, its unix socket, server.log)
 *   s3/                 the bucket's files
 *   hosts/<name>/       each host's data directory (`<name>` = a, b, c, …)
 *   logs/<name>.log     each process's output (s3.log, a.log, …)
 */
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import pg from 'pg';
import { processCwd } from '../../host/processes.ts';
import { freeLoopbackPort } from '../../net/ports.ts';
import { PostgresServer } from './postgres-server.ts';
import { S3_CREDENTIALS, S3_READY } from './s3-server.ts';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const REPO = path.resolve(HERE, '../../..');
const NODE = path.join(REPO, 'node_modules/.bin/node');
const STATE_FILE = 'cluster.json';
const BUCKET = 'cocoon';
const DATABASE = 'cocoon';
/** The seal key every host shares (src/store/sealed-secrets.ts): AWS SigV4 keys made on one host verify on all. */
const SEAL_KEY_FILE = 'secrets-seal.key';
/** Settings the launcher sets per host: never inherited from the caller's environment. */
const PER_HOST = /^COCOON_(DATA_DIR|API_PORT|GATEWAY_PORT|HOST|HOST_ID|HOST_ADDRESS|DATABASE_URL|S3_.*)$/;

export const MAX_LOCAL_HOSTS = 26;

export interface LocalHost {
  /** a, b, c, … */
  name: string;
  /** Its COCOON_HOST_ID: `host-<name>`. */
  id: string;
  dataDir: string;
  apiPort: number;
  gatewayPort: number;
  apiUrl: string;
  gatewayUrl: string;
  /** The `cocoon serve` process (leader of its own process group); 0 when stopped. */
  pid: number;
  logFile: string;
}

export interface LocalClusterState {
  version: 1;
  dir: string;
  databaseUrl: string;
  postgresDir: string;
  s3: { endpoint: string; port: number; pid: number; bucket: string; dir: string };
  hosts: LocalHost[];
  /** The watchdog of a cluster tied to a process (tests), if any. */
  watchdogPid?: number;
}

export interface ClusterUpOptions {
  /** The cluster's directory (made if missing). */
  dir: string;
  /** How many hosts (1–26). Default 3. */
  hosts?: number;
  /** Extra environment for every host (COCOON_LOG_LEVEL, COCOON_ACCEL, lifecycle settings…). */
  env?: Record<string, string>;
  /** Run `down` (and remove the directory) when this process ends. Default false. */
  tiedToProcess?: boolean;
  /** Progress lines (default: none). */
  progress?: (line: string) => void;
}

export interface LocalCluster {
  readonly state: LocalClusterState;
  /** The admin API key (made by the first host on the cluster's first start; kept in hosts/a/admin-api-key). */
  readonly adminKey: string;
  /** The environment a host of this cluster runs with (for a test's own `startServer`, a bench). */
  hostEnv(name: string): Record<string, string>;
  host(name: string): LocalHost;
  /** SIGKILL a host together with its QEMUs (a machine that died). */
  killHost(name: string): Promise<void>;
  /** Starts a stopped or killed host again (same data directory, ports and id). */
  startHost(name: string): Promise<LocalHost>;
  /** A microVM's lease as the database has it (tests, benchmarks): its owner, fencing epoch and state. */
  lease(microvmId: string): Promise<{ hostId: string | null; epoch: number; state: string }>;
  /** Stops everything (as `clusterDown`). */
  down(options?: { purge?: boolean }): Promise<void>;
}

export function hostName(index: number): string {
  return String.fromCharCode('a'.charCodeAt(0) + index);
}

export function readClusterState(dir: string): LocalClusterState | undefined {
  try {
    return JSON.parse(fs.readFileSync(path.join(dir, STATE_FILE), 'utf8')) as LocalClusterState;
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw error;
  }
}

function writeState(state: LocalClusterState): void {
  const file = path.join(state.dir, STATE_FILE);
  fs.writeFileSync(`${file}.tmp`, JSON.stringify(state, null, 2) + '\n', { mode: 0o600 });
  fs.renameSync(`${file}.tmp`, file);
}

export function processAlive(pid: number | undefined): boolean {
  if (!pid) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === 'EPERM';
  }
}

function tail(file: string, bytes = 3000): string {
  try {
    const text = fs.readFileSync(file, 'utf8');
    return text.slice(-bytes);
  } catch {
    return '';
  }
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** Brings the cluster up (or what of it is not running: `up` twice is harmless) and answers it. */
export async function clusterUp(options: ClusterUpOptions): Promise<LocalCluster> {
  const dir = path.resolve(options.dir);
  const count = options.hosts ?? 3;
  if (!Number.isInteger(count) || count < 1 || count > MAX_LOCAL_HOSTS) throw new Error(`--hosts takes 1-${MAX_LOCAL_HOSTS}`);
  const progress = options.progress ?? (() => undefined);
  // 0711: PostgreSQL's user and QEMU's users must be able to pass through to their own directories.
  fs.mkdirSync(dir, { recursive: true, mode: 0o711 });
  fs.chmodSync(dir, 0o711);
  fs.mkdirSync(path.join(dir, 'logs'), { recursive: true, mode: 0o700 });
  fs.mkdirSync(path.join(dir, 'hosts'), { recursive: true, mode: 0o711 });
  const previous = readClusterState(dir);
  if (previous && previous.hosts.length !== count && previous.hosts.some((h) => processAlive(h.pid))) {
    throw new Error(`a cluster of ${previous.hosts.length} hosts runs in ${dir}: run \`cluster down\` first`);
  }
  let state: LocalClusterState | undefined;
  try {
    progress('postgresql: starting');
    const postgresDir = path.join(dir, 'postgres');
    const postgres = await PostgresServer.start({ dir: postgresDir, keep: true, durable: true, tiedToProcess: false });
    const databaseUrl = await postgres.ensureDatabase(DATABASE);
    state = {
      version: 1,
      dir,
      databaseUrl,
      postgresDir,
      s3: previous?.s3 && processAlive(previous.s3.pid) ? previous.s3 : await startS3(dir, progress),
      hosts: [],
    };
    writeState(state);
    if (options.tiedToProcess) state.watchdogPid = startWatchdog(dir);
    const sealKey = ensureSealKey(dir);
    for (let i = 0; i < count; i++) {
      const name = hostName(i);
      const before = previous?.hosts.find((h) => h.name === name);
      const host: LocalHost = before ?? {
        name,
        id: `host-${name}`,
        dataDir: path.join(dir, 'hosts', name),
        apiPort: await freeLoopbackPort(),
        gatewayPort: await freeLoopbackPort(),
        apiUrl: '',
        gatewayUrl: '',
        pid: 0,
        logFile: path.join(dir, 'logs', `${name}.log`),
      };
      host.apiUrl = `http://127.0.0.1:${host.apiPort}`;
      host.gatewayUrl = `http://127.0.0.1:${host.gatewayPort}`;
      state.hosts.push(host);
      fs.mkdirSync(host.dataDir, { recursive: true, mode: 0o700 });
      const keyFile = path.join(host.dataDir, SEAL_KEY_FILE);
      if (!fs.existsSync(keyFile)) fs.writeFileSync(keyFile, sealKey, { mode: 0o600 });
    }
    writeState(state);
    // The first host alone first: it runs the migrations and makes the admin tenant and key;
    // the others then start side by side.
    const [first, ...rest] = state.hosts as [LocalHost, ...LocalHost[]];
    await ensureHost(state, first, options.env ?? {}, progress);
    await Promise.all(rest.map((h) => ensureHost(state!, h, options.env ?? {}, progress)));
  } catch (error) {
    // Stop what this call started; what ran before it keeps running.
    if (state) writeState(state);
    if (!previous || !previous.hosts.some((h) => processAlive(h.pid))) await clusterDown(dir).catch(() => undefined);
    throw error;
  }
  return localCluster(state, options.env ?? {});
}

/** The running cluster of `dir` (after `up` in another process), or undefined. */
export function openCluster(dir: string, env: Record<string, string> = {}): LocalCluster | undefined {
  const state = readClusterState(path.resolve(dir));
  return state ? localCluster(state, env) : undefined;
}

function localCluster(state: LocalClusterState, env: Record<string, string>): LocalCluster {
  const find = (name: string): LocalHost => {
    const host = state.hosts.find((h) => h.name === name || h.id === name);
    if (!host) throw new Error(`no host ${name} in this cluster (hosts: ${state.hosts.map((h) => h.name).join(', ')})`);
    return host;
  };
  return {
    state,
    get adminKey() {
      return fs.readFileSync(path.join(state.hosts[0]!.dataDir, 'admin-api-key'), 'utf8').trim();
    },
    hostEnv: (name) => hostEnvironment(state, find(name), env),
    host: find,
    async killHost(name) {
      const host = find(name);
      killGroup(host.pid, 'SIGKILL');
      await waitGone(host.pid, 10_000);
      await killProcessesUnder(host.dataDir);
      host.pid = 0;
      writeState(state);
    },
    async startHost(name) {
      const host = find(name);
      await ensureHost(state, host, env, () => undefined);
      return host;
    },
    async lease(microvmId) {
      const client = new pg.Client({ connectionString: state.databaseUrl });
      await client.connect();
      try {
        const { rows } = await client.query<{ host_id: string | null; lease_epoch: string | number; state: string }>(
          'SELECT host_id, lease_epoch, state FROM microvms WHERE id = $1',
          [microvmId],
        );
        if (!rows[0]) throw new Error(`no microVM ${microvmId}`);
        return { hostId: rows[0].host_id, epoch: Number(rows[0].lease_epoch), state: rows[0].state };
      } finally {
        await client.end();
      }
    },
    async down(options) {
      await clusterDown(state.dir, options);
    },
  };
}

/** Stops everything the cluster of `dir` runs; harmless when nothing runs. `purge` also removes the directory. */
export async function clusterDown(dir: string, options: { purge?: boolean } = {}): Promise<{ stopped: string[] }> {
  dir = path.resolve(dir);
  const state = readClusterState(dir);
  const stopped: string[] = [];
  if (state) {
    await Promise.all(
      state.hosts.map(async (host) => {
        if (await stopProcess(host.pid, 30_000)) stopped.push(host.id);
        // QEMUs are in process groups of their own (a Ctrl-C to a host spares its guests): find them by their files.
        if ((await killProcessesUnder(host.dataDir)) > 0 && !stopped.includes(host.id)) stopped.push(host.id);
        host.pid = 0;
      }),
    );
    if (await stopProcess(state.s3.pid, 10_000)) stopped.push('s3');
    state.s3.pid = 0;
    if (state.watchdogPid && state.watchdogPid !== process.pid && processAlive(state.watchdogPid)) {
      try {
        process.kill(state.watchdogPid, 'SIGKILL');
      } catch {
        // gone
      }
    }
    delete state.watchdogPid;
    writeState(state);
  }
  const postgresDir = state?.postgresDir ?? path.join(dir, 'postgres');
  if (fs.existsSync(path.join(postgresDir, 'data', 'postmaster.pid'))) {
    await PostgresServer.stopDir(postgresDir);
    stopped.push('postgresql');
  }
  if (options.purge) fs.rmSync(dir, { recursive: true, force: true });
  return { stopped };
}

/** The environment of one host: the caller's (less per-host settings), the extra `env`, then the host's own. */
export function hostEnvironment(state: LocalClusterState, host: LocalHost, env: Record<string, string>): Record<string, string> {
  const inherited: Record<string, string> = {};
  for (const [k, v] of Object.entries(process.env)) if (v !== undefined && !PER_HOST.test(k)) inherited[k] = v;
  return {
    ...inherited,
    ...env,
    COCOON_DATA_DIR: host.dataDir,
    COCOON_HOST: '127.0.0.1',
    COCOON_API_PORT: String(host.apiPort),
    COCOON_GATEWAY_PORT: String(host.gatewayPort),
    COCOON_HOST_ID: host.id,
    COCOON_HOST_ADDRESS: '127.0.0.1',
    COCOON_DATABASE_URL: state.databaseUrl,
    COCOON_S3_BUCKET: state.s3.bucket,
    COCOON_S3_ENDPOINT: state.s3.endpoint,
    COCOON_S3_REGION: 'us-east-1',
    COCOON_S3_ACCESS_KEY_ID: S3_CREDENTIALS.accessKeyId,
    COCOON_S3_SECRET_ACCESS_KEY: S3_CREDENTIALS.secretAccessKey,
  };
}

async function startS3(dir: string, progress: (line: string) => void): Promise<LocalClusterState['s3']> {
  progress('s3: starting (s3rver)');
  const s3Dir = path.join(dir, 's3');
  const logFile = path.join(dir, 'logs', 's3.log');
  const port = await freeLoopbackPort();
  const out = fs.openSync(logFile, 'a', 0o600);
  const child = spawn(NODE, ['--disable-warning=ExperimentalWarning', path.join(HERE, 's3-server.ts'), s3Dir, String(port), BUCKET], {
    detached: true,
    stdio: ['ignore', out, out],
    cwd: REPO,
  });
  fs.closeSync(out);
  child.unref();
  const deadline = Date.now() + 30_000;
  while (!tail(logFile, 10_000).includes(S3_READY)) {
    if (child.exitCode !== null || Date.now() > deadline) {
      if (child.pid) killGroup(child.pid, 'SIGKILL');
      throw new Error(`the S3 server did not start:\n${tail(logFile)}`);
    }
    await sleep(100);
  }
  return { endpoint: `http://127.0.0.1:${port}`, port, pid: child.pid!, bucket: BUCKET, dir: s3Dir };
}

/** Starts the host unless it runs; resolves when its API answers healthy. */
async function ensureHost(state: LocalClusterState, host: LocalHost, env: Record<string, string>, progress: (line: string) => void): Promise<void> {
  if (processAlive(host.pid) && (await healthy(host.apiUrl))) return;
  progress(`host ${host.name} (${host.id}): starting`);
  const out = fs.openSync(host.logFile, 'a', 0o600);
  const child = spawn(NODE, ['--disable-warning=ExperimentalWarning', path.join(REPO, 'src/cli/main.ts'), 'serve'], {
    detached: true, // its own process group: `down` and `killHost` signal the group
    stdio: ['ignore', out, out],
    cwd: REPO,
    env: hostEnvironment(state, host, env),
  });
  fs.closeSync(out);
  child.unref();
  host.pid = child.pid!;
  writeState(state);
  const deadline = Date.now() + 180_000;
  while (!(await healthy(host.apiUrl))) {
    if (child.exitCode !== null || child.signalCode !== null || Date.now() > deadline) {
      killGroup(host.pid, 'SIGKILL');
      host.pid = 0;
      writeState(state);
      throw new Error(`host ${host.name} did not start (log ${host.logFile}):\n${tail(host.logFile)}`);
    }
    await sleep(200);
  }
  progress(`host ${host.name}: up, API ${host.apiUrl}, gateway ${host.gatewayUrl}`);
}

async function healthy(apiUrl: string): Promise<boolean> {
  try {
    const response = await fetch(`${apiUrl}/api/v1/health`, { signal: AbortSignal.timeout(2_000) });
    await response.body?.cancel();
    return response.status === 200;
  } catch {
    return false;
  }
}

/** The one seal key of the cluster (made once, 0600, in the cluster directory). */
function ensureSealKey(dir: string): string {
  const file = path.join(dir, SEAL_KEY_FILE);
  try {
    fs.writeFileSync(file, randomBytes(32).toString('base64') + '\n', { mode: 0o600, flag: 'wx' });
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== 'EEXIST') throw error;
  }
  return fs.readFileSync(file, 'utf8');
}

function killGroup(pid: number, signal: NodeJS.Signals): void {
  if (!pid) return;
  for (const target of [-pid, pid]) {
    try {
      process.kill(target, signal);
    } catch {
      // gone already
    }
  }
}

async function waitGone(pid: number, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (processAlive(pid)) {
    if (Date.now() > deadline) return false;
    await sleep(50);
  }
  return true;
}

/** SIGTERM, then SIGKILL after `graceMs`; answers whether it was running. */
async function stopProcess(pid: number, graceMs: number): Promise<boolean> {
  if (!processAlive(pid)) return false;
  killGroup(pid, 'SIGTERM');
  if (!(await waitGone(pid, graceMs))) {
    killGroup(pid, 'SIGKILL');
    await waitGone(pid, 5_000);
  }
  return true;
}

/**
 * SIGKILLs every process whose command line names a path under `dir` (a host's QEMUs name their
 * run directories; nothing else names a host's data directory) or whose working directory is under
 * it (a QEMU of the host's pool, started ahead with relative paths: src/vmm/qemu/pool.ts; after a
 * killed host, nothing else ends those). Answers how many.
 */
async function killProcessesUnder(dir: string): Promise<number> {
  const needle = path.resolve(dir) + path.sep;
  const found: number[] = [];
  for (const entry of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(entry) || Number(entry) === process.pid) continue;
    try {
      const cmdline = fs.readFileSync(`/proc/${entry}/cmdline`, 'utf8');
      // A deleted working directory reads as "<path> (deleted)": still a prefix match.
      if (cmdline.includes(needle) || (processCwd(Number(entry)) ?? '').startsWith(needle)) found.push(Number(entry));
    } catch {
      // gone meanwhile
    }
  }
  for (const pid of found) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // gone
    }
  }
  for (const pid of found) await waitGone(pid, 5_000);
  return found.length;
}

/**
 * A shell beside this process that runs `down --purge` once this process is gone (a test killed
 * by a signal runs no exit handler). Answers its pid.
 */
function startWatchdog(dir: string): number {
  const main = path.join(REPO, 'src/cli/main.ts');
  const script = `while kill -0 ${process.pid} 2>/dev/null; do sleep 1; done; ` +
    `exec '${NODE}' --disable-warning=ExperimentalWarning '${main}' cluster down --purge --dir '${dir}' >/dev/null 2>&1`;
  const child = spawn('sh', ['-c', script], { detached: true, stdio: 'ignore' });
  child.unref();
  return child.pid!;
}
