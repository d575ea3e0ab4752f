/**
 * A private PostgreSQL server run from Debian's binaries (scripts/setup.sh installs them): a
 * cluster made with `initdb` under a directory of ours, listening only on a unix socket in that
 * directory, run as the `postgres` system user when we run as root (PostgreSQL refuses root).
 *
 * Two users: the tests (test/support/postgres.ts: a throwaway server under a temp directory
 * `cocoon-pg-*`, durability off, killed with the test process whatever ended it) and the local
 * cluster (src/cluster/local/cluster.ts: a kept server under the cluster's directory that
 * outlives the command that started it, stopped by `cluster down`).
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { chownSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import pg from 'pg';

const run = promisify(execFile);
const PORT = 5432; // only names the socket file; the socket lives in the server's private directory

/** The directory with initdb and pg_ctl of the newest PostgreSQL installed, or undefined. */
export function postgresBinDir(): string | undefined {
  const root = '/usr/lib/postgresql';
  if (!existsSync(root)) return undefined;
  const versions = readdirSync(root)
    .filter((v) => existsSync(join(root, v, 'bin', 'initdb')) && existsSync(join(root, v, 'bin', 'pg_ctl')))
    .sort((a, b) => Number(b) - Number(a));
  return versions[0] === undefined ? undefined : join(root, versions[0], 'bin');
}

export interface PostgresServerOptions {
  /**
   * The server's directory (data in `data/`, the socket, `server.log`); made if missing, an
   * existing cluster in it is started again. Default: a new temp directory `cocoon-pg-*`.
   */
  dir?: string;
  /** Keep the directory (and its data) on `stop()`. Default false: it is removed. */
  keep?: boolean;
  /** fsync on (a cluster someone tries things on). Default false (a throwaway test server: fast). */
  durable?: boolean;
  /**
   * Kill the server and remove its directory when this process ends, however it ends (also by a
   * signal, through a small watchdog shell). Default true; false for a server that must outlive
   * the command that started it (`cluster up`).
   */
  tiedToProcess?: boolean;
}

export class PostgresServer {
  readonly dir: string;
  readonly #bin: string;
  readonly #asUser: string[];
  readonly #keep: boolean;
  readonly #onExit: (() => void) | undefined;
  #databases = 0;
  #stopped = false;
  #watchdog: ChildProcess | undefined;
  /** The postmaster's options (`pg_ctl start -o`), kept for `startAgain`. */
  #serverOptions: string[] = [];

  private constructor(dir: string, bin: string, asUser: string[], keep: boolean, tied: boolean) {
    this.dir = dir;
    this.#bin = bin;
    this.#asUser = asUser;
    this.#keep = keep;
    if (tied) {
      this.#onExit = () => this.#killNow();
      process.once('exit', this.#onExit);
    }
  }

  /** initdb (unless the directory holds a cluster) + pg_ctl start; throws (after cleaning up) when PostgreSQL is missing or fails. */
  static async start(options: PostgresServerOptions = {}): Promise<PostgresServer> {
    const bin = postgresBinDir();
    if (bin === undefined) {
      throw new Error('PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): run `npm run setup`');
    }
    const dir = options.dir ?? mkdtempSync(join(tmpdir(), 'cocoon-pg-'));
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    const asUser = await postgresUser(dir);
    const tied = options.tiedToProcess ?? true;
    const server = new PostgresServer(dir, bin, asUser, options.keep ?? false, tied);
    if (tied) server.#startWatchdog();
    try {
      const data = join(dir, 'data');
      if (!existsSync(join(data, 'PG_VERSION'))) {
        await server.#pg('initdb', ['-D', data, '-U', 'postgres', '--auth=trust', '--locale=C.UTF-8', '--encoding=UTF8', '-N']);
      }
      // A server already running on this directory (`cluster up` twice) is used as it is.
      if (options.keep && (await server.#running())) return server;
      server.#serverOptions = [`-k ${dir}`, "-c listen_addresses=''", `-p ${PORT}`];
      // A throwaway cluster: durability off, for speed.
      if (!options.durable) server.#serverOptions.push('-c fsync=off', '-c synchronous_commit=off', '-c full_page_writes=off');
      await server.#startPostmaster();
    } catch (error) {
      await server.stop();
      throw error;
    }
    return server;
  }

  /** Stops the server of `dir` started by another process (`cluster down`); no-op when none runs there. */
  static async stopDir(dir: string): Promise<void> {
    const bin = postgresBinDir();
    if (bin === undefined || !existsSync(join(dir, 'data', 'postmaster.pid'))) return;
    const argv = [...(await postgresUser(dir)), join(bin, 'pg_ctl'), 'stop', '-w', '-t', '60', '-m', 'fast', '-D', join(dir, 'data')];
    const [command, ...rest] = argv as [string, ...string[]];
    await run(command, rest, { cwd: dir, timeout: 90_000 }).catch(() => undefined);
  }

  /** A URL for `database` (default the maintenance database, to create and drop others). */
  url(database = 'postgres'): string {
    return `postgresql://postgres@localhost:${PORT}/${database}?host=${encodeURIComponent(this.dir)}`;
  }

  /** A new, empty database; answers its URL. */
  async createDatabase(prefix = 'test'): Promise<string> {
    return this.ensureDatabase(`${prefix.replace(/[^a-z0-9_]/g, '_')}_${process.pid}_${++this.#databases}`);
  }

  /** The database `name` (lower-case letters, digits, _), made if missing; answers its URL. */
  async ensureDatabase(name: string): Promise<string> {
    if (!/^[a-z_][a-z0-9_]{0,62}$/.test(name)) throw new Error(`not a database name: ${name}`);
    const client = new pg.Client({ connectionString: this.url() });
    await client.connect();
    try {
      const found = await client.query('SELECT 1 FROM pg_database WHERE datname = $1', [name]);
      if (found.rowCount === 0) await client.query(`CREATE DATABASE ${name}`);
    } finally {
      await client.end();
    }
    return this.url(name);
  }

  /** Restarts the server (the data stays): what "PostgreSQL restarted" looks like to a client. */
  async restart(): Promise<void> {
    // -l: the new postmaster must not inherit (and hold open) this process's output pipes.
    await this.#pg('pg_ctl', ['restart', '-w', '-t', '60', '-m', 'fast', '-D', join(this.dir, 'data'), '-l', join(this.dir, 'server.log')]);
  }

  /**
   * Stops the server the way an outage looks to its clients (a fast shutdown: every connection
   * is cut), keeping the data, the directory and the socket path; `startAgain` brings it back.
   */
  async halt(): Promise<void> {
    await this.#pg('pg_ctl', ['stop', '-w', '-t', '60', '-m', 'fast', '-D', join(this.dir, 'data')]);
  }

  /** Starts the server `halt` stopped, on the same socket, with the same options. */
  async startAgain(): Promise<void> {
    await this.#startPostmaster();
  }

  async #startPostmaster(): Promise<void> {
    // -l: the postmaster must not inherit (and hold open) this process's output pipes.
    const data = join(this.dir, 'data');
    await this.#pg('pg_ctl', ['start', '-w', '-t', '60', '-D', data, '-l', join(this.dir, 'server.log'), '-o', this.#serverOptions.join(' ')]);
  }

  /** The postmaster's pid, or undefined when it does not run. */
  pid(): number | undefined {
    try {
      const pid = Number(readFileSync(join(this.dir, 'data', 'postmaster.pid'), 'utf8').split('\n')[0]);
      return Number.isInteger(pid) && pid > 1 ? pid : undefined;
    } catch {
      return undefined;
    }
  }

  async stop(): Promise<void> {
    if (this.#stopped) return;
    this.#stopped = true;
    if (this.#onExit) process.removeListener('exit', this.#onExit);
    this.#watchdog?.kill('SIGKILL');
    try {
      if (existsSync(join(this.dir, 'data', 'postmaster.pid'))) {
        await this.#pg('pg_ctl', ['stop', '-w', '-m', this.#keep ? 'fast' : 'immediate', '-D', join(this.dir, 'data')]);
      }
    } catch {
      this.#killNow();
    }
    if (!this.#keep) rmSync(this.dir, { recursive: true, force: true });
  }

  /** The server's log (for a failing test's message). */
  log(): string {
    try {
      return readFileSync(join(this.dir, 'server.log'), 'utf8');
    } catch {
      return '';
    }
  }

  /**
   * A test process killed by a signal runs no exit handler: a small shell beside it waits for
   * this process to go, then kills the server and removes its directory.
   */
  #startWatchdog(): void {
    const remove = this.#keep ? '' : `; rm -rf '${this.dir}'`;
    const script = `while kill -0 ${process.pid} 2>/dev/null; do sleep 1; done; ` +
      `kill -9 "$(head -n1 '${this.dir}/data/postmaster.pid' 2>/dev/null)" 2>/dev/null${remove}`;
    this.#watchdog = spawn('sh', ['-c', script], { detached: true, stdio: 'ignore' });
    this.#watchdog.unref();
  }

  /** Synchronous, for process exit: SIGKILL the postmaster (its children follow) and remove the directory. */
  #killNow(): void {
    const pid = this.pid();
    try {
      if (pid !== undefined) process.kill(pid, 'SIGKILL');
    } catch {
      // not running
    }
    if (!this.#keep) rmSync(this.dir, { recursive: true, force: true });
  }

  /** `pg_ctl status`: whether a server runs on this directory. */
  async #running(): Promise<boolean> {
    if (!existsSync(join(this.dir, 'data', 'postmaster.pid'))) return false;
    return this.#pg('pg_ctl', ['status', '-D', join(this.dir, 'data')]).then(() => true, () => false);
  }

  async #pg(tool: string, args: string[]): Promise<void> {
    const [command, ...rest] = [...this.#asUser, join(this.#bin, tool), ...args] as [string, ...string[]];
    try {
      await run(command, rest, { cwd: this.dir, timeout: 120_000 });
    } catch (error) {
      const { stderr, stdout } = error as { stderr?: string; stdout?: string };
      throw new Error(`${tool} failed: ${(stderr || stdout || String(error)).trim()}\n${this.log().slice(-2000)}`);
    }
  }
}

/** As root: the directory goes to the `postgres` user, and its tools run as that user. */
async function postgresUser(dir: string): Promise<string[]> {
  if (process.getuid?.() !== 0) return [];
  const uid = Number((await run('id', ['-u', 'postgres'])).stdout.trim());
  const gid = Number((await run('id', ['-g', 'postgres'])).stdout.trim());
  chownSync(dir, uid, gid);
  return ['runuser', '-u', 'postgres', '--'];
}
