/**
 * The model's paginators (paginators-1.json): every List operation takes `maxResults` (1–50)
 * and `nextToken`, and answers `items` and `nextToken` (absent on the last page). A nextToken is
 * opaque to clients: here the base64url of `<operation>:<last key>`, so that a token from one
 * list is refused by another; the keys themselves are filtered by the caller's tenant.
 */
import { validation } from './errors.ts';
import { queryInt, queryString } from './validate.ts';

export const MAX_RESULTS = 50;
const MAX_TOKEN_LENGTH = 1024;

export interface PageParams {
  maxResults: number;
  /** The last key of the previous page, or undefined for the first page. */
  after: string | undefined;
}

export function pageParams(query: Record<string, string | string[]>, operation: string): PageParams {
  const maxResults = queryInt(query, 'maxResults', { min: 1, max: MAX_RESULTS }) ?? MAX_RESULTS;
  const token = queryString(query, 'nextToken');
  return { maxResults, after: token === undefined || token === '' ? undefined : decodeNextToken(token, operation) };
}

export function encodeNextToken(operation: string, lastKey: string): string {
  return Buffer.from(`${operation}:${lastKey}`, 'utf8').toString('base64url');
}

export function decodeNextToken(token: string, operation: string): string {
  const text = token.length <= MAX_TOKEN_LENGTH && /^[A-Za-z0-9_-]+$/.test(token) ? Buffer.from(token, 'base64url').toString('utf8') : '';
  if (!text.startsWith(`${operation}:`) || text.length === operation.length + 1) {
    throw validation('the nextToken is not one this operation returned; start again without it');
  }
  return text.slice(operation.length + 1);
}

/** A page of `items` sorted by `key` (ascending), from everything after `after`. */
export function pageOf<T>(sorted: T[], key: (item: T) => string, params: PageParams, operation: string): { items: T[]; nextToken?: string } {
  const rest = params.after === undefined ? sorted : sorted.filter((item) => key(item) > (params.after as string));
  const items = rest.slice(0, params.maxResults);
  return rest.length > params.maxResults ? { items, nextToken: encodeNextToken(operation, key(items.at(-1) as T)) } : { items };
}
