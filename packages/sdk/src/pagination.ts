/**
 * Lists answer one page at a time (`{items, nextCursor}`, newest first). `paginate` walks every
 * page lazily as an async iterator:
 *
 *   for await (const image of cocoon.images.iterate({ state: 'READY' })) …
 */
import type { Page, PageParams } from './types.ts';

export async function* paginate<T, P extends PageParams>(
  fetchPage: (params: P) => Promise<Page<T>>,
  params: P,
): AsyncGenerator<T, void, undefined> {
  let cursor = params.cursor ?? null;
  for (;;) {
    const page = await fetchPage({ ...params, cursor });
    yield* page.items;
    if (!page.nextCursor) return;
    cursor = page.nextCursor;
  }
}

/** Collects an async iterable into an array (at most `max` items). */
export async function collect<T>(iterable: AsyncIterable<T>, max = Infinity): Promise<T[]> {
  const out: T[] = [];
  for await (const item of iterable) {
    if (out.length >= max) break;
    out.push(item);
  }
  return out;
}
