/**
 * API-key authentication: `Authorization: Bearer <key>` on every route except those marked
 * `config: { public: true }`. The key is looked up by its hash; the request gets the tenant.
 */
import type { FastifyInstance, FastifyRequest } from 'fastify';
import { CocoonError } from '../common/errors.ts';
import { authenticateApiKey } from '../store/api-keys.ts';
import type { Db } from '../store/sql.ts';
import type { Tenant } from '../store/tenants.ts';

declare module 'fastify' {
  interface FastifyRequest {
    tenant: Tenant;
  }
  interface FastifyContextConfig {
    /** No API key needed (health, OpenAPI document, dashboard assets). */
    public?: boolean;
  }
}

export function registerAuth(app: FastifyInstance, db: Db): void {
  app.decorateRequest('tenant', null as unknown as Tenant);
  app.addHook('onRequest', async (request) => {
    if (request.routeOptions.config?.public) return;
    request.tenant = await authenticate(db, request);
  });
}

async function authenticate(db: Db, request: FastifyRequest): Promise<Tenant> {
  const header = request.headers.authorization;
  const match = typeof header === 'string' ? /^Bearer ([\x21-\x7e]{1,200})$/.exec(header) : null;
  if (!match?.[1]) {
    throw new CocoonError('unauthenticated', 'send your API key as `Authorization: Bearer <key>`', { status: 401 });
  }
  const found = await authenticateApiKey(db, match[1]);
  if (!found) throw new CocoonError('unauthenticated', 'this API key is unknown or revoked', { status: 401 });
  return found.tenant;
}

/** For admin-only routes. */
export function requireAdmin(request: FastifyRequest): void {
  if (!request.tenant?.isAdmin) {
    throw new CocoonError('forbidden', 'only the admin API key may do this', { status: 403 });
  }
}
