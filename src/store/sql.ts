/**
 * The narrow SQL interface every data-access module is written against, and the one seam between
 * the store and its database engines (dialects): SQLite (`sqlite.ts`, the single-host default)
 * and PostgreSQL (`postgres.ts`, for several hosts). The SQL in the modules sticks to what both
 * accept: `?` placeholders (the PostgreSQL dialect rewrites them to `$n`), `RETURNING`,
 * `ON CONFLICT`, TEXT timestamps, INTEGER 0/1 booleans, JSON as TEXT. Nothing outside a dialect
 * file knows which engine runs.
 */
export type SqlValue = string | number | bigint | null | Uint8Array;
/** Booleans become 0/1 and undefined becomes NULL, so callers can pass optional fields as they are. */
export type SqlParam = SqlValue | boolean | undefined;

export type DialectName = 'sqlite' | 'postgres';

export interface RunResult {
  /** Rows inserted, updated or deleted. */
  changes: number;
}

export interface Db {
  readonly dialect: DialectName;
  get<T>(sql: string, params?: readonly SqlParam[]): Promise<T | undefined>;
  all<T>(sql: string, params?: readonly SqlParam[]): Promise<T[]>;
  run(sql: string, params?: readonly SqlParam[]): Promise<RunResult>;
  /**
   * Runs `fn` in a transaction and commits when it resolves, rolls back when it throws.
   * Inside, use only the `tx` handle it receives (a nested call makes a savepoint).
   * Transactions are serializable on every dialect (SQLite has one writer; PostgreSQL runs them
   * SERIALIZABLE), and `fn` may run more than once (after a serialization failure, or after the
   * SQLite disk-full reserve was freed): it must only touch the database.
   */
  transaction<T>(fn: (tx: Db) => Promise<T>): Promise<T>;
}

/** A handle on a whole database: what `openMetadataStore` returns and the server owns. */
export interface Database extends Db {
  /** Where the data lives, for messages: a file path, or a PostgreSQL URL without its password. */
  readonly location: string;
  /**
   * Runs `fn` in one transaction that holds the database's migration lock, so that two
   * processes migrating the same database at once take turns (the second waits, then finds the
   * work done). `exec` runs raw multi-statement SQL (DDL) inside that transaction.
   */
  migrationTransaction<T>(fn: (tx: Db, exec: (sql: string) => Promise<void>) => Promise<T>): Promise<T>;
  close(): Promise<void>;
}

/** A UNIQUE (or PRIMARY KEY) constraint refused the write, on any dialect. */
export function isUniqueViolation(error: unknown): boolean {
  const { code, message } = (error ?? {}) as { code?: unknown; message?: unknown };
  return code === '23505' || (typeof message === 'string' && /UNIQUE constraint failed|PRIMARY KEY constraint failed/.test(message));
}

/** A FOREIGN KEY constraint refused the write, on any dialect. */
export function isForeignKeyViolation(error: unknown): boolean {
  const { code, message } = (error ?? {}) as { code?: unknown; message?: unknown };
  return code === '23503' || (typeof message === 'string' && /FOREIGN KEY constraint failed/.test(message));
}
