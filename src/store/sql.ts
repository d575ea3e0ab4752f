/**
 * The narrow SQL interface every data-access module is written against. It is asynchronous
 * although SQLite is not, so that a PostgreSQL adapter can implement it later without changing
 * a single caller. The SQL in the modules sticks to what both dialects accept (`?`
 * placeholders, which a PostgreSQL adapter rewrites to `$n`; `RETURNING`; `ON CONFLICT`).
 */
export type SqlValue = string | number | bigint | null | Uint8Array;
/** Booleans become 0/1 and undefined becomes NULL, so callers can pass optional fields as they are. */
export type SqlParam = SqlValue | boolean | undefined;

export interface RunResult {
  /** Rows inserted, updated or deleted. */
  changes: number;
}

export interface Db {
  readonly dialect: 'sqlite';
  get<T>(sql: string, params?: readonly SqlParam[]): Promise<T | undefined>;
  all<T>(sql: string, params?: readonly SqlParam[]): Promise<T[]>;
  run(sql: string, params?: readonly SqlParam[]): Promise<RunResult>;
  /**
   * Runs `fn` in a transaction and commits when it resolves, rolls back when it throws.
   * Inside, use only the `tx` handle it receives (a nested call makes a savepoint).
   */
  transaction<T>(fn: (tx: Db) => Promise<T>): Promise<T>;
}
