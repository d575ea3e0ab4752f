import { AsyncLocalStorage } from 'node:async_hooks';
import pg from 'pg';
import { CocoonError } from '../common/errors.ts';
import { log } from '../common/log.ts';
import type { Database, Db, RunResult, SqlParam } from './sql.ts';

/** Connections per process: enough for concurrent requests, few enough for many hosts on one server. */
const POOL_SIZE = 10;
/** A transaction that lost a serialization race is run again, this many times at most. */
const MAX_ATTEMPTS = 20;
/** SQLSTATEs after which a transaction is worth running again: serialization_failure, deadlock_detected. */
const RETRYABLE = new Set(['40001', '40P01']);
/** pg_advisory_xact_lock key of the migration lock (any fixed 64-bit number: "cocoon:m"). */
const MIGRATION_LOCK_KEY = '7165064620143045997';
/**
 * How long opening a connection may take before the caller gets `database_unavailable`: a
 * server that is down must answer API calls with a quick 503, not hold them until the client's
 * own timeout (a unix socket is refused at once; a TCP peer that vanished is not).
 */
const CONNECT_TIMEOUT_MS = 5_000;

/**
 * PostgreSQL behind the `Database` interface, on the `pg` driver's connection pool.
 *
 * Semantics are kept equal to the SQLite dialect, so that the same data-access code and the
 * same conformance suite hold on both:
 * - `?` placeholders become `$1, $2…` (the SQL in this codebase has no `?` inside literals);
 * - booleans are bound as 0/1 (the schema keeps INTEGER 0/1 columns on both engines);
 * - BIGINT and COUNT(*) come back as numbers (they stay far below 2^53 here; larger ones throw);
 * - transactions run SERIALIZABLE and are retried on a serialization failure or deadlock, which
 *   gives the same outcome as SQLite's one-writer-at-a-time: a compare-and-set loser sees the
 *   winner's state, a read-then-write never loses an update, a racing unique insert is retried
 *   and then finds the winner's row.
 */
export class PostgresDb implements Database {
  readonly dialect = 'postgres' as const;
  readonly location: string;
  readonly #pool: pg.Pool;
  readonly #insideTransaction = new AsyncLocalStorage<true>();
  #closed = false;

  private constructor(url: string, pool: pg.Pool) {
    this.location = redact(url);
    this.#pool = pool;
  }

  /** Connects to `url` (`postgres://user:password@host:port/database` or `?host=/socket/dir`). */
  static async open(url: string, options: { poolSize?: number } = {}): Promise<PostgresDb> {
    const pool = new pg.Pool({
      connectionString: url,
      max: options.poolSize ?? POOL_SIZE,
      types: { getTypeParser: typeParser } as pg.CustomTypesConfig,
      application_name: 'cocoon',
      connectionTimeoutMillis: CONNECT_TIMEOUT_MS,
      // TCP keep-alive: a connection to a server that vanished without a FIN is found dead.
      keepAlive: true,
    });
    // An idle connection that the server drops (restart, failover) must not crash the process:
    // the pool discards it and the next query opens a new one.
    const db = new PostgresDb(url, pool);
    pool.on('error', (error) => log.warn({ database: db.location, err: error.message }, 'an idle PostgreSQL connection failed; the pool replaces it'));
    try {
      await pool.query('SELECT 1');
    } catch (error) {
      await pool.end();
      throw error;
    }
    return db;
  }

  async get<T>(sql: string, params: readonly SqlParam[] = []): Promise<T | undefined> {
    this.#refuseInsideTransaction();
    return (await this.#outsideTransaction<T>(sql, params)).rows[0];
  }

  async all<T>(sql: string, params: readonly SqlParam[] = []): Promise<T[]> {
    this.#refuseInsideTransaction();
    return (await this.#outsideTransaction<T>(sql, params)).rows;
  }

  async run(sql: string, params: readonly SqlParam[] = []): Promise<RunResult> {
    this.#refuseInsideTransaction();
    return { changes: (await this.#outsideTransaction(sql, params)).rowCount ?? 0 };
  }

  async #outsideTransaction<T>(sql: string, params: readonly SqlParam[]): Promise<pg.QueryResult<T & pg.QueryResultRow>> {
    try {
      return await query<T>(this.#pool, sql, params);
    } catch (error) {
      throw this.#unavailable(error);
    }
  }

  async transaction<T>(fn: (tx: Db) => Promise<T>): Promise<T> {
    this.#refuseInsideTransaction();
    for (let attempt = 1; ; attempt++) {
      try {
        return await this.#once('BEGIN ISOLATION LEVEL SERIALIZABLE', (tx) => fn(tx));
      } catch (error) {
        // A connection that broke before its BEGIN ran (one the server dropped while it sat idle
        // in the pool, during a restart) did nothing: the first such failure is tried again on a
        // new connection. Any other connection failure is the caller's `database_unavailable`.
        if (error instanceof NotStarted && attempt === 1) continue;
        if (error instanceof NotStarted) throw this.#unavailable(error.cause);
        if (attempt >= MAX_ATTEMPTS || !RETRYABLE.has(sqlState(error))) throw this.#unavailable(error);
        // Back off a little, with jitter, so that the racers do not collide again at once.
        await new Promise((resolve) => setTimeout(resolve, Math.random() * Math.min(100, 2 ** attempt)));
      }
    }
  }

  /**
   * READ COMMITTED here, not SERIALIZABLE: a serializable transaction would keep the snapshot
   * taken before it waited for the lock, and so miss the migrations the other process committed.
   */
  async migrationTransaction<T>(fn: (tx: Db, exec: (sql: string) => Promise<void>) => Promise<T>): Promise<T> {
    this.#refuseInsideTransaction();
    try {
      return await this.#once('BEGIN', async (tx, client) => {
        await client.query(`SELECT pg_advisory_xact_lock(${MIGRATION_LOCK_KEY})`);
        return fn(tx, async (sql) => { await client.query(sql); });
      });
    } catch (error) {
      throw this.#unavailable(error instanceof NotStarted ? error.cause : error);
    }
  }

  /** A failure of the connection (not of the statement) as `database_unavailable`, 503; anything else as it is. */
  #unavailable(error: unknown): unknown {
    if (!isConnectionFailure(error)) return error;
    return new CocoonError(
      'database_unavailable',
      `the PostgreSQL database at ${this.location} cannot be reached (${(error as Error).message}); retry shortly`,
      { status: 503, cause: error },
    );
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    await this.#pool.end();
  }

  async #once<T>(begin: string, fn: (tx: Db, client: pg.PoolClient) => Promise<T>): Promise<T> {
    let client: pg.PoolClient;
    try {
      client = await this.#pool.connect();
    } catch (error) {
      throw new NotStarted(error);
    }
    const tx = new PostgresTransaction(client, 0);
    // A connection is given back to the pool only when it is known to be idle and healthy: a
    // failed BEGIN/COMMIT without a server error, or a failed ROLLBACK, means it dropped.
    let broken: Error | undefined;
    // The pool listens for errors of idle connections only: one that breaks while checked out
    // here (the server shut down between two statements) emits 'error' with no listener, which
    // would end the process. Catch it; the statement that follows fails and the caller gets
    // `database_unavailable`.
    const onError = (error: Error) => { broken ??= error; };
    client.on('error', onError);
    try {
      try {
        await client.query(begin);
      } catch (error) {
        if (sqlState(error) === '') broken = error as Error;
        throw isConnectionFailure(error) ? new NotStarted(error) : error;
      }
      let result: T;
      try {
        result = await this.#insideTransaction.run(true, () => fn(tx, client));
      } catch (error) {
        try {
          await client.query('ROLLBACK');
        } catch (rollbackError) {
          broken = rollbackError as Error;
        }
        throw error;
      }
      try {
        await client.query('COMMIT');
      } catch (error) {
        if (sqlState(error) === '') broken = error as Error;
        throw error;
      }
      return result;
    } finally {
      tx.finish();
      client.removeListener('error', onError);
      client.release(broken);
    }
  }

  /** Using the outer handle inside a transaction would run outside it: say so (as on SQLite). */
  #refuseInsideTransaction(): void {
    if (this.#closed) throw new Error('the database handle is closed');
    if (this.#insideTransaction.getStore() === true) {
      throw new Error('inside db.transaction(), use the transaction handle it passes, not the database handle');
    }
  }
}

/** The handle a transaction callback gets; dead once the transaction ended. */
class PostgresTransaction implements Db {
  readonly dialect = 'postgres' as const;
  readonly #client: pg.PoolClient;
  readonly #depth: number;
  #open = true;

  constructor(client: pg.PoolClient, depth: number) {
    this.#client = client;
    this.#depth = depth;
  }

  finish(): void {
    this.#open = false;
  }

  async get<T>(sql: string, params: readonly SqlParam[] = []): Promise<T | undefined> {
    this.#check();
    return (await query<T>(this.#client, sql, params)).rows[0];
  }

  async all<T>(sql: string, params: readonly SqlParam[] = []): Promise<T[]> {
    this.#check();
    return (await query<T>(this.#client, sql, params)).rows;
  }

  async run(sql: string, params: readonly SqlParam[] = []): Promise<RunResult> {
    this.#check();
    return { changes: (await query(this.#client, sql, params)).rowCount ?? 0 };
  }

  async transaction<T>(fn: (tx: Db) => Promise<T>): Promise<T> {
    this.#check();
    const name = `sp${this.#depth + 1}`;
    const inner = new PostgresTransaction(this.#client, this.#depth + 1);
    await this.#client.query(`SAVEPOINT ${name}`);
    try {
      const result = await fn(inner);
      await this.#client.query(`RELEASE SAVEPOINT ${name}`);
      return result;
    } catch (error) {
      await this.#client.query(`ROLLBACK TO SAVEPOINT ${name}`);
      await this.#client.query(`RELEASE SAVEPOINT ${name}`);
      throw error;
    } finally {
      inner.finish();
    }
  }

  #check(): void {
    if (!this.#open) throw new Error('this transaction has already ended');
  }
}

/** The connection failed before the transaction began: nothing of it ran. */
class NotStarted extends Error {
  constructor(cause: unknown) {
    super((cause as Error | undefined)?.message ?? String(cause), { cause });
  }
}

/**
 * SQLSTATEs that say the server is going away or not there yet: class 08 (connection
 * exception), admin_shutdown, crash_shutdown, cannot_connect_now (starting up, shutting down).
 */
const CONNECTION_STATES = /^(08...|57P01|57P02|57P03)$/;
/** What the socket says when the server is not there (TCP refused/reset, unix socket missing). */
const SOCKET_ERRORS = new Set(['ECONNREFUSED', 'ECONNRESET', 'ENOENT', 'EPIPE', 'ETIMEDOUT', 'EHOSTUNREACH', 'ENETUNREACH', 'ENOTCONN', 'EAI_AGAIN']);
/** What `pg` itself says when a connection ends under it or cannot be opened in time. */
const DRIVER_MESSAGES = /Connection terminated|connection timeout|timeout exceeded when trying to connect|is not queryable|Connection ended/i;

/** Whether `error` is the database being unreachable (down, restarting, the network), not a statement that failed. */
export function isConnectionFailure(error: unknown): boolean {
  if (error instanceof NotStarted) return true;
  const code = (error as { code?: unknown } | null)?.code;
  if (typeof code === 'string' && SOCKET_ERRORS.has(code)) return true;
  const state = sqlState(error);
  if (state !== '') return CONNECTION_STATES.test(state);
  return error instanceof Error && DRIVER_MESSAGES.test(error.message);
}

function query<T>(on: pg.Pool | pg.PoolClient, sql: string, params: readonly SqlParam[]): Promise<pg.QueryResult<T & pg.QueryResultRow>> {
  return on.query<T & pg.QueryResultRow>(numbered(sql), params.map(bind));
}

/** `?` → `$1, $2…`. Statements here hold no `?` inside string literals or identifiers. */
export function numbered(sql: string): string {
  let n = 0;
  return sql.replace(/\?/g, () => `$${++n}`);
}

function bind(value: SqlParam): unknown {
  if (value === undefined) return null;
  if (typeof value === 'boolean') return value ? 1 : 0;
  if (typeof value === 'bigint') return value.toString();
  if (value instanceof Uint8Array && !Buffer.isBuffer(value)) return Buffer.from(value.buffer, value.byteOffset, value.byteLength);
  return value;
}

const INT8 = 20;
const NUMERIC = 1700;

/** BIGINT and NUMERIC as numbers (SQLite returns INTEGER as number too); everything else as `pg` does. */
function typeParser(oid: number, format?: string): (value: string) => unknown {
  if (oid === INT8 || oid === NUMERIC) {
    return (value: string) => {
      const n = Number(value);
      if (!Number.isSafeInteger(n) && oid === INT8) throw new Error(`integer ${value} is too large for this store`);
      return n;
    };
  }
  return pg.types.getTypeParser(oid, (format ?? 'text') as 'text') as (value: string) => unknown;
}

function sqlState(error: unknown): string {
  const code = (error as { code?: unknown } | null)?.code;
  return typeof code === 'string' && /^[0-9A-Z]{5}$/.test(code) ? code : '';
}

/** The URL without its password, for logs and messages. */
export function redact(url: string): string {
  try {
    const parsed = new URL(url);
    if (parsed.password !== '') parsed.password = '***';
    return parsed.toString();
  } catch {
    return 'postgres://(unparsable URL)';
  }
}
