import { AsyncLocalStorage } from 'node:async_hooks';
import { closeSync, fstatSync as fstat, mkdirSync, openSync, rmSync, writeSync } from 'node:fs';
import { dirname } from 'node:path';
import { DatabaseSync, type SQLInputValue, type StatementSync } from 'node:sqlite';
import type { Database, Db, RunResult, SqlParam } from './sql.ts';

const STATEMENT_CACHE_SIZE = 256;
/** Space kept beside the database for its own writes when the disk fills up (see `#withReserve`). */
const RESERVE_BYTES = 4 * 1024 * 1024;
const BUSY_TIMEOUT_MS = 5000;
/** How long a migration waits for another process's migration (the lock is SQLite's write lock). */
const MIGRATION_BUSY_TIMEOUT_MS = 120_000;

/**
 * `node:sqlite` behind the async `Db` interface. One connection per process: SQLite allows one
 * writer at a time anyway, and WAL mode lets the CLI or a backup read alongside.
 *
 * A single connection means a transaction would see every statement issued while it is open,
 * including those of unrelated requests interleaved at an `await`. So statements and
 * transactions take turns through a FIFO lock: a transaction runs alone from BEGIN to COMMIT.
 */
export class SqliteDb implements Database {
  readonly dialect = 'sqlite' as const;
  readonly path: string;
  readonly #db: DatabaseSync;
  readonly #statements = new Map<string, StatementSync>();
  readonly #lock = new FifoLock();
  readonly #insideTransaction = new AsyncLocalStorage<true>();
  /** `<db>.reserve`: a file of zeros whose space the database's writes get when the disk is full. */
  readonly #reserve: string | undefined;

  readonly #busyTimeoutMs: number;

  private constructor(path: string, db: DatabaseSync, busyTimeoutMs: number) {
    this.path = path;
    this.#busyTimeoutMs = busyTimeoutMs;
    this.#db = db;
    this.#reserve = path === ':memory:' ? undefined : `${path}.reserve`;
    if (this.#reserve) takeReserve(this.#reserve);
  }

  /** Opens (creating with mode 0600 if needed) the database file and sets the pragmas. */
  static open(path: string, options: { busyTimeoutMs?: number } = {}): SqliteDb {
    if (path !== ':memory:') {
      mkdirSync(dirname(path), { recursive: true, mode: 0o700 });
      // Create the file ourselves so it is private from the first byte; an empty file is a
      // valid empty database. SQLite gives the -wal and -shm files the same mode.
      closeSync(openSync(path, 'a', 0o600));
    }
    const busyTimeoutMs = options.busyTimeoutMs ?? BUSY_TIMEOUT_MS;
    const db = new DatabaseSync(path, { enableForeignKeyConstraints: true, timeout: busyTimeoutMs });
    try {
      db.exec('PRAGMA journal_mode = WAL');
      // NORMAL is durable across application crashes in WAL mode; only an OS crash or power
      // loss can lose the last transactions, never corrupt the database.
      db.exec('PRAGMA synchronous = NORMAL');
      db.exec('PRAGMA foreign_keys = ON');
    } catch (error) {
      db.close();
      throw error;
    }
    return new SqliteDb(path, db, busyTimeoutMs);
  }

  get location(): string {
    return this.path;
  }

  /** Closes at once (the promise is only for the `Database` interface). */
  close(): Promise<void> {
    this.#statements.clear();
    if (this.#db.isOpen) this.#db.close();
    return Promise.resolve();
  }

  /**
   * The migration lock is SQLite's own write lock: `BEGIN IMMEDIATE` takes it, and a second
   * process's `BEGIN IMMEDIATE` waits for it (here up to two minutes instead of the usual busy
   * timeout), then reads the migrations the first one recorded.
   */
  migrationTransaction<T>(fn: (tx: Db, exec: (sql: string) => Promise<void>) => Promise<T>): Promise<T> {
    this.#db.exec(`PRAGMA busy_timeout = ${MIGRATION_BUSY_TIMEOUT_MS}`);
    const exec = async (sql: string): Promise<void> => { this.#db.exec(sql); };
    return this.transaction((tx) => {
      this.#db.exec(`PRAGMA busy_timeout = ${this.#busyTimeoutMs}`);
      return fn(tx, exec);
    }).finally(() => {
      if (this.#db.isOpen) this.#db.exec(`PRAGMA busy_timeout = ${this.#busyTimeoutMs}`);
    });
  }

  /** A pragma's value, for tests and diagnostics. */
  pragma(name: 'journal_mode' | 'foreign_keys' | 'synchronous'): unknown {
    const row = this.#db.prepare(`PRAGMA ${name}`).get() as Record<string, unknown> | undefined;
    return row === undefined ? undefined : Object.values(row)[0];
  }

  get<T>(sql: string, params: readonly SqlParam[] = []): Promise<T | undefined> {
    return this.#outside(() => this.getNow<T>(sql, params));
  }

  all<T>(sql: string, params: readonly SqlParam[] = []): Promise<T[]> {
    return this.#outside(() => this.allNow<T>(sql, params));
  }

  run(sql: string, params: readonly SqlParam[] = []): Promise<RunResult> {
    return this.#withReserve(() => this.#outside(() => this.runNow(sql, params)));
  }

  transaction<T>(fn: (tx: Db) => Promise<T>): Promise<T> {
    return this.#withReserve(() => this.#transaction(fn));
  }

  /**
   * A write that fails because the disk is full (SQLITE_FULL) is tried once more with the
   * reserve's space given back; the reserve is then taken again as far as it fits. So the
   * store can still record what happens when the data directory's disk fills up (a suspend
   * abandoned for lack of space, a build that failed for it), while everything else that
   * writes there still meets the full disk. Transactions here only touch the database, so
   * running one again is safe.
   */
  async #withReserve<T>(write: () => Promise<T>): Promise<T> {
    try {
      return await write();
    } catch (error) {
      if (!this.#reserve || !isDiskFull(error)) throw error;
      try {
        rmSync(this.#reserve, { force: true });
      } catch {
        throw error;
      }
      try {
        return await write();
      } finally {
        takeReserve(this.#reserve);
      }
    }
  }

  async #transaction<T>(fn: (tx: Db) => Promise<T>): Promise<T> {
    this.#refuseInsideTransaction();
    const release = await this.#lock.acquire();
    const tx = new SqliteTransaction(this, 0);
    try {
      this.#db.exec('BEGIN IMMEDIATE');
      try {
        const result = await this.#insideTransaction.run(true, () => fn(tx));
        this.#db.exec('COMMIT');
        return result;
      } catch (error) {
        if (this.#db.isTransaction) this.#db.exec('ROLLBACK');
        throw error;
      }
    } finally {
      tx.finish();
      release();
    }
  }

  /** Raw SQL for the transaction handles (savepoints); the caller holds the lock. */
  execNow(sql: string): void {
    this.#db.exec(sql);
  }

  getNow<T>(sql: string, params: readonly SqlParam[]): T | undefined {
    return this.#statement(sql).get(...bind(params)) as T | undefined;
  }

  allNow<T>(sql: string, params: readonly SqlParam[]): T[] {
    return this.#statement(sql).all(...bind(params)) as T[];
  }

  runNow(sql: string, params: readonly SqlParam[]): RunResult {
    const result = this.#statement(sql).run(...bind(params));
    return { changes: Number(result.changes) };
  }

  async #outside<T>(fn: () => T): Promise<T> {
    this.#refuseInsideTransaction();
    if (this.#lock.idle) return fn();
    const release = await this.#lock.acquire();
    try {
      return fn();
    } finally {
      release();
    }
  }

  /** Using the outer handle inside a transaction would wait for that very transaction: say so. */
  #refuseInsideTransaction(): void {
    if (this.#insideTransaction.getStore() === true && this.#db.isTransaction) {
      throw new Error('inside db.transaction(), use the transaction handle it passes, not the database handle');
    }
  }

  #statement(sql: string): StatementSync {
    let statement = this.#statements.get(sql);
    if (statement === undefined) {
      statement = this.#db.prepare(sql);
      if (this.#statements.size >= STATEMENT_CACHE_SIZE) this.#statements.clear();
      this.#statements.set(sql, statement);
    }
    return statement;
  }
}

/** The handle a transaction callback gets; dead once the transaction ended. */
class SqliteTransaction implements Db {
  readonly dialect = 'sqlite' as const;
  readonly #owner: SqliteDb;
  readonly #depth: number;
  #open = true;

  constructor(owner: SqliteDb, depth: number) {
    this.#owner = owner;
    this.#depth = depth;
  }

  finish(): void {
    this.#open = false;
  }

  async get<T>(sql: string, params: readonly SqlParam[] = []): Promise<T | undefined> {
    this.#check();
    return this.#owner.getNow<T>(sql, params);
  }

  async all<T>(sql: string, params: readonly SqlParam[] = []): Promise<T[]> {
    this.#check();
    return this.#owner.allNow<T>(sql, params);
  }

  async run(sql: string, params: readonly SqlParam[] = []): Promise<RunResult> {
    this.#check();
    return this.#owner.runNow(sql, params);
  }

  async transaction<T>(fn: (tx: Db) => Promise<T>): Promise<T> {
    this.#check();
    const name = `sp${this.#depth + 1}`;
    const inner = new SqliteTransaction(this.#owner, this.#depth + 1);
    this.#owner.execNow(`SAVEPOINT ${name}`);
    try {
      const result = await fn(inner);
      this.#owner.execNow(`RELEASE ${name}`);
      return result;
    } catch (error) {
      this.#owner.execNow(`ROLLBACK TO ${name}`);
      this.#owner.execNow(`RELEASE ${name}`);
      throw error;
    } finally {
      inner.finish();
    }
  }

  #check(): void {
    if (!this.#open) throw new Error('this transaction has already ended');
  }
}

function bind(params: readonly SqlParam[]): SQLInputValue[] {
  return params.map((value) => {
    if (value === undefined) return null;
    if (typeof value === 'boolean') return value ? 1 : 0;
    return value;
  });
}

/** A FIFO mutex: `acquire` resolves with a release function once every earlier holder released. */
class FifoLock {
  #tail: Promise<void> = Promise.resolve();
  #holders = 0;

  /** No one holds or waits for the lock. */
  get idle(): boolean {
    return this.#holders === 0;
  }

  async acquire(): Promise<() => void> {
    this.#holders += 1;
    let release!: () => void;
    const released = new Promise<void>((resolve) => { release = resolve; });
    const previous = this.#tail;
    this.#tail = previous.then(() => released);
    await previous;
    let done = false;
    return () => {
      if (done) return;
      done = true;
      this.#holders -= 1;
      release();
    };
  }
}

/** SQLITE_FULL: "database or disk is full". */
function isDiskFull(error: unknown): boolean {
  const { errcode, errstr } = error as { errcode?: number; errstr?: string };
  return (typeof errcode === 'number' && (errcode & 0xff) === 13) || errstr === 'database or disk is full';
}

/** (Re)writes the reserve file up to RESERVE_BYTES, as far as the disk lets it (best effort). */
function takeReserve(file: string): void {
  let fd: number | undefined;
  try {
    fd = openSync(file, 'a', 0o600);
    const chunk = Buffer.alloc(64 * 1024);
    const { size } = fstat(fd);
    for (let written = size; written < RESERVE_BYTES; written += chunk.length) writeSync(fd, chunk);
  } catch {
    // the disk is full: keep what fits
  } finally {
    if (fd !== undefined) closeSync(fd);
  }
}
