import { AsyncLocalStorage } from 'node:async_hooks';
import pg from 'pg';
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
    return (await query<T>(this.#pool, sql, params)).rows[0];
  }

  async all<T>(sql: string, params: readonly SqlParam[] = []): Promise<T[]> {
    this.#refuseInsideTransaction();
    return (await query<T>(this.#pool, sql, params)).rows;
  }

  async run(sql: string, params: readonly SqlParam[] = []): Promise<RunResult> {
    this.#refuseInsideTransaction();
    return { changes: (await query(this.#pool, sql, params)).rowCount ?? 0 };
  }

  async transaction<T>(fn: (tx: Db) => Promise<T>): Promise<T> {
    this.#refuseInsideTransaction();
    for (let attempt = 1; ; attempt++) {
      try {
        return await this.#once('BEGIN ISOLATION LEVEL SERIALIZABLE', (tx) => fn(tx));
      } catch (error) {
        if (attempt >= MAX_ATTEMPTS || !RETRYABLE.has(sqlState(error))) throw error;
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
    return this.#once('BEGIN', async (tx, client) => {
      await client.query(`SELECT pg_advisory_xact_lock(${MIGRATION_LOCK_KEY})`);
      return fn(tx, async (sql) => { await client.query(sql); });
    });
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    await this.#pool.end();
  }

  async #once<T>(begin: string, fn: (tx: Db, client: pg.PoolClient) => Promise<T>): Promise<T> {
    const client = await this.#pool.connect();
    const tx = new PostgresTransaction(client, 0);
    // A connection is given back to the pool only when it is known to be idle and healthy: a
    // failed BEGIN/COMMIT without a server error, or a failed ROLLBACK, means it dropped.
    let broken: Error | undefined;
    try {
      try {
        await client.query(begin);
      } catch (error) {
        if (sqlState(error) === '') broken = error as Error;
        throw error;
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
