import type { Db, RunResult, SqlParam } from './sql.ts';
import { bool, jsonObject, placeholders } from './values.ts';

/**
 * The one row-mapping helper: a table's row (snake_case columns, 0/1 booleans, JSON as TEXT) to
 * the object the rest of Cocoon uses, declared once per table as "field ← column or function".
 * A column name is checked by the compiler to hold the field's type; a function converts.
 *
 *   const toTenant = rowMapper<TenantRow, Tenant>({ id: 'id', isAdmin: boolColumn('is_admin'), … });
 */
export type FieldSource<Row, V> = { [C in keyof Row]: Row[C] extends V ? C : never }[keyof Row] | ((row: Row) => V);

export function rowMapper<Row, T>(fields: { [K in keyof T]-?: FieldSource<Row, T[K]> }): (row: Row) => T {
  const entries = Object.entries(fields) as Array<[string, string | ((row: Row) => unknown)]>;
  const converters = entries.map(([, source]) => source).filter((source) => typeof source === 'function');
  // Compiled once per table into one object literal, so every object gets the same fixed shape:
  // filled in a loop, an object of 25 fields was 8x slower to build (and to read afterwards).
  // Field and column names come from this codebase's declarations, quoted by JSON.stringify.
  let converter = 0;
  const body = entries
    .map(([field, source]) => `${JSON.stringify(field)}: ${typeof source === 'function' ? `c[${converter++}](row)` : `row[${JSON.stringify(source)}]`}`)
    .join(', ');
  const compiled = new Function('c', `return (row) => ({ ${body} });`) as (c: unknown[]) => (row: Row) => T;
  return compiled(converters);
}

/** A 0/1 column as a boolean. */
export function boolColumn<Row>(column: keyof Row): (row: Row) => boolean {
  return (row) => bool(row[column]);
}

/** A JSON-object TEXT column as an object (`{}` when empty). */
export function jsonColumn<Row, V = Record<string, unknown>>(column: keyof Row): (row: Row) => V {
  return (row) => jsonObject(row[column]) as V;
}

/** Inserts a row given as `{ column: value }` (the row objects the modules build). */
export function insertRow(db: Db, table: string, row: object): Promise<RunResult> {
  const columns = Object.keys(row);
  return db.run(`INSERT INTO ${table} (${columns.join(', ')}) VALUES ${placeholders(columns.length)}`, Object.values(row) as SqlParam[]);
}
