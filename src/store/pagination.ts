import { CocoonError } from '../common/errors.ts';
import { ID_PATTERN } from './ids.ts';

/**
 * Keyset pagination, newest first: a page is `ORDER BY id DESC LIMIT n+1 WHERE id < cursor`,
 * which stays fast and consistent while rows are added (offsets would skip or repeat rows).
 * The cursor is opaque to clients: base64url of the last id on the page.
 */
export interface Page<T> {
  items: T[];
  /** Pass back as `cursor` for the next page; null on the last page. */
  nextCursor: string | null;
}

export interface PageRequest {
  limit?: number | undefined;
  cursor?: string | null | undefined;
}

export const DEFAULT_PAGE_LIMIT = 50;
export const MAX_PAGE_LIMIT = 1000;

export function pageLimit(limit: number | undefined): number {
  if (limit === undefined) return DEFAULT_PAGE_LIMIT;
  if (!Number.isInteger(limit) || limit < 1 || limit > MAX_PAGE_LIMIT) {
    throw new CocoonError('invalid_request', `limit must be an integer from 1 to ${MAX_PAGE_LIMIT}`, { status: 400 });
  }
  return limit;
}

export function encodeCursor(lastId: string): string {
  return Buffer.from(lastId, 'utf8').toString('base64url');
}

export function decodeCursor(cursor: string | null | undefined): string | undefined {
  if (cursor === undefined || cursor === null || cursor === '') return undefined;
  const id = typeof cursor === 'string' && cursor.length <= 64 ? Buffer.from(cursor, 'base64url').toString('utf8') : '';
  if (!ID_PATTERN.test(id)) {
    throw new CocoonError('invalid_cursor', 'the cursor is not one this API returned; start again without it', { status: 400 });
  }
  return id;
}

/** Turns `limit + 1` fetched rows into a page and its cursor. */
export function toPage<T extends { id: string }>(rows: T[], limit: number): Page<T> {
  if (rows.length <= limit) return { items: rows, nextCursor: null };
  const items = rows.slice(0, limit);
  return { items, nextCursor: encodeCursor((items.at(-1) as T).id) };
}
