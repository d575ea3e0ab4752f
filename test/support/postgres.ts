/**
 * A private PostgreSQL server for tests: Debian's binaries (scripts/setup.sh installs them),
 * a new cluster under a temp directory (`cocoon-pg-*`, so the suite's leak check sees one left
 * behind), listening only on a unix socket in that directory, run as the `postgres` system user
 * when the tests run as root (PostgreSQL refuses root). `stop()` kills it and removes the
 * directory; so does the exit of the test process, whatever ended it.
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { chownSync, existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
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

export class PostgresServer {
  readonly dir: string;
  readonly #bin: string;
  readonly #asUser: string[];
  readonly #onExit: () => void;
  #databases = 0;
  #stopped = false;
  #watchdog: ChildProcess | undefined;

  private constructor(dir: string, bin: string, asUser: string[]) {
    this.dir = dir;
    this.#bin = bin;
    this.#asUser = asUser;
    this.#onExit = () => this.#killNow();
    process.once('exit', this.#onExit);
  }

  /** initdb + pg_ctl start; throws (after cleaning up) when PostgreSQL is missing or fails. */
  static async start(): Promise<PostgresServer> {
    const bin = postgresBinDir();
    if (bin === undefined) {
      throw new Error('PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): run `npm run setup`');
    }
    const dir = mkdtempSync(join(tmpdir(), 'cocoon-pg-'));
    const root = process.getuid?.() === 0;
    if (root) {
      const uid = Number((await run('id', ['-u', 'postgres'])).stdout.trim());
      const gid = Number((await run('id', ['-g', 'postgres'])).stdout.trim());
      chownSync(dir, uid, gid);
    }
    const server = new PostgresServer(dir, bin, root ? ['runuser', '-u', 'postgres', '--'] : []);
    server.#startWatchdog();
    try {
      await server.#pg('initdb', ['-D', join(dir, 'data'), '-U', 'postgres', '--auth=trust', '--locale=C.UTF-8', '--encoding=UTF8', '-N']);
      const options = [
        `-k ${dir}`, "-c listen_addresses=''", `-p ${PORT}`,
        // A throwaway cluster: durability off, for speed.
        '-c fsync=off', '-c synchronous_commit=off', '-c full_page_writes=off',
      ].join(' ');
      await server.#pg('pg_ctl', ['start', '-w', '-t', '60', '-D', join(dir, 'data'), '-l', join(dir, 'server.log'), '-o', options]);
    } catch (error) {
      await server.stop();
      throw error;
    }
    return server;
  }

  /** A URL for the maintenance database (to create and drop others). */
  url(database = 'postgres'): string {
    return `postgresql://postgres@localhost:${PORT}/${database}?host=${encodeURIComponent(this.dir)}`;
  }

  /** A new, empty database; answers its URL. */
  async createDatabase(prefix = 'test'): Promise<string> {
    const name = `${prefix.replace(/[^a-z0-9_]/g, '_')}_${process.pid}_${++this.#databases}`;
    const client = new pg.Client({ connectionString: this.url() });
    await client.connect();
    try {
      await client.query(`CREATE DATABASE ${name}`);
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

  async stop(): Promise<void> {
    if (this.#stopped) return;
    this.#stopped = true;
    process.removeListener('exit', this.#onExit);
    this.#watchdog?.kill('SIGKILL');
    try {
      if (existsSync(join(this.dir, 'data', 'postmaster.pid'))) {
        await this.#pg('pg_ctl', ['stop', '-w', '-m', 'immediate', '-D', join(this.dir, 'data')]);
      }
    } catch {
      this.#killNow();
    }
    rmSync(this.dir, { recursive: true, force: true });
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
    const script = `while kill -0 ${process.pid} 2>/dev/null; do sleep 1; done; ` +
      `kill -9 "$(head -n1 '${this.dir}/data/postmaster.pid' 2>/dev/null)" 2>/dev/null; rm -rf '${this.dir}'`;
    this.#watchdog = spawn('sh', ['-c', script], { detached: true, stdio: 'ignore' });
    this.#watchdog.unref();
  }

  /** Synchronous, for process exit: SIGKILL the postmaster (its children follow) and remove the directory. */
  #killNow(): void {
    try {
      const pid = Number(readFileSync(join(this.dir, 'data', 'postmaster.pid'), 'utf8').split('\n')[0]);
      if (Number.isInteger(pid) && pid > 1) process.kill(pid, 'SIGKILL');
    } catch {
      // not running
    }
    rmSync(this.dir, { recursive: true, force: true });
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
