import type { Db } from './sql.ts';
import { jsonColumn, rowMapper } from './rows.ts';
import { invalid, iso } from './values.ts';

/**
 * An append-only history of what happened to tenants, images and microVMs: state changes are
 * written here in the same transaction as the change itself, so the history never disagrees
 * with the tables. Ids count up, so a reader can follow new events with `afterId`.
 */
export type EventResourceType = 'tenant' | 'image' | 'microvm';

export interface Event {
  id: number;
  tenantId: string | null;
  resourceType: EventResourceType;
  resourceId: string;
  type: string;
  fromState: string | null;
  toState: string | null;
  message: string | null;
  data: Record<string, unknown>;
  createdAt: string;
}

export interface NewEvent {
  tenantId: string | null;
  resourceType: EventResourceType;
  resourceId: string;
  type: string;
  fromState?: string | null;
  toState?: string | null;
  message?: string | null;
  data?: Record<string, unknown>;
  now?: Date;
}

const MAX_MESSAGE = 4000;

interface EventRow {
  id: number;
  tenant_id: string | null;
  resource_type: EventResourceType;
  resource_id: string;
  type: string;
  from_state: string | null;
  to_state: string | null;
  message: string | null;
  data: string | null;
  created_at: string;
}

const toEvent = rowMapper<EventRow, Event>({
  id: 'id', tenantId: 'tenant_id', resourceType: 'resource_type', resourceId: 'resource_id', type: 'type',
  fromState: 'from_state', toState: 'to_state', message: 'message', data: jsonColumn('data'), createdAt: 'created_at',
});

export async function appendEvent(db: Db, event: NewEvent): Promise<void> {
  const message = event.message == null ? null : event.message.slice(0, MAX_MESSAGE);
  await db.run(
    `INSERT INTO events (tenant_id, resource_type, resource_id, type, from_state, to_state, message, data, created_at)
     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)`,
    [
      event.tenantId, event.resourceType, event.resourceId, event.type, event.fromState ?? null, event.toState ?? null,
      message, event.data === undefined ? null : JSON.stringify(event.data), iso(event.now ?? new Date()),
    ],
  );
}

export interface EventQuery {
  resourceType?: EventResourceType;
  resourceId?: string;
  tenantId?: string;
  /** Only events with a larger id (to follow a stream). */
  afterId?: number;
  /** At most this many, oldest first (default 100, at most 1000). */
  limit?: number;
}

export async function listEvents(db: Db, query: EventQuery): Promise<Event[]> {
  const where: string[] = [];
  const params: Array<string | number> = [];
  if (query.resourceType !== undefined) { where.push('resource_type = ?'); params.push(query.resourceType); }
  if (query.resourceId !== undefined) { where.push('resource_id = ?'); params.push(query.resourceId); }
  if (query.tenantId !== undefined) { where.push('tenant_id = ?'); params.push(query.tenantId); }
  if (query.afterId !== undefined) {
    if (!Number.isSafeInteger(query.afterId)) throw invalid('afterId must be an integer');
    where.push('id > ?');
    params.push(query.afterId);
  }
  const limit = query.limit ?? 100;
  if (!Number.isInteger(limit) || limit < 1 || limit > 1000) throw invalid('limit must be an integer from 1 to 1000');
  const rows = await db.all<EventRow>(
    `SELECT * FROM events ${where.length ? `WHERE ${where.join(' AND ')}` : ''} ORDER BY id LIMIT ?`,
    [...params, limit],
  );
  return rows.map(toEvent);
}
