import { CocoonError } from '../common/errors.ts';

/** Small conversions between rows and objects, shared by the data-access modules. */

export function iso(date: Date): string {
  return date.toISOString();
}

export function bool(value: unknown): boolean {
  return value === 1 || value === 1n || value === true;
}

export function jsonObject(text: unknown): Record<string, unknown> {
  if (typeof text !== 'string' || text === '') return {};
  const value: unknown = JSON.parse(text);
  return typeof value === 'object' && value !== null && !Array.isArray(value) ? (value as Record<string, unknown>) : {};
}

/** Named SQL placeholders for a list: `(?, ?, ?)`. */
export function placeholders(count: number): string {
  return `(${Array.from({ length: count }, () => '?').join(', ')})`;
}

export function invalid(message: string): CocoonError {
  return new CocoonError('invalid_request', message, { status: 400 });
}

/** Checks one enum value or a list of them; returns the list. */
export function statesFilter<S extends string>(
  value: S | readonly S[] | undefined,
  allowed: readonly S[],
  what: string,
): S[] | undefined {
  if (value === undefined) return undefined;
  const list = (Array.isArray(value) ? value : [value]) as S[];
  if (list.length === 0) throw invalid(`${what} filter is empty`);
  for (const state of list) {
    if (!allowed.includes(state)) throw invalid(`unknown ${what} '${String(state)}'; one of ${allowed.join(', ')}`);
  }
  return list;
}
