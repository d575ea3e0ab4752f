import type { FastifyInstance } from 'fastify';
import { Type, type Static } from 'typebox';
import { CocoonError } from '../../common/errors.ts';
import { createTenant, getTenant, listTenants, TENANT_NAME, type Tenant } from '../../store/tenants.ts';
import type { ApiContext } from '../app.ts';
import { requireAdmin } from '../auth.ts';
import { ErrorSchema, PageQuery } from '../schemas.ts';
import { CreateApiKey, CreatedApiKeySchema, issueApiKey } from './api-keys.ts';

const CreateTenant = Type.Object({ name: Type.String({ pattern: TENANT_NAME.source, maxLength: 63 }) }, { additionalProperties: false });
const TenantWithKey = Type.Object({ id: Type.String(), name: Type.String(), accountId: Type.String(), apiKey: Type.String() });
const TenantSchema = Type.Object(
  {
    id: Type.String(),
    name: Type.String(),
    accountId: Type.String({ description: 'The account field of the tenant’s ARNs' }),
    isAdmin: Type.Boolean(),
    createdAt: Type.String({ format: 'date-time' }),
  },
  { $id: 'Tenant' },
);
const IdParams = Type.Object({ id: Type.String({ minLength: 1, maxLength: 100 }) });

function tenantView(tenant: Tenant) {
  return { id: tenant.id, name: tenant.name, accountId: tenant.accountId, isAdmin: tenant.isAdmin, createdAt: tenant.createdAt };
}

export function tenantRoutes(app: FastifyInstance, context: ApiContext): void {
  const { db } = context;
  app.post<{ Body: Static<typeof CreateTenant> }>(
    '/tenants',
    {
      schema: {
        summary: 'Create a tenant and its first API key (admin only; the key is shown once)',
        body: CreateTenant,
        response: { 201: TenantWithKey, 400: ErrorSchema, 401: ErrorSchema, 403: ErrorSchema, 409: ErrorSchema },
      },
    },
    async (request, reply) => {
      requireAdmin(request);
      const tenant = await createTenant(db, { name: request.body.name });
      const { apiKey } = await issueApiKey(context, tenant.id, 'initial');
      return reply.status(201).send({ id: tenant.id, name: tenant.name, accountId: tenant.accountId, apiKey });
    },
  );

  app.get<{ Querystring: Static<typeof PageQuery> }>(
    '/tenants',
    {
      schema: {
        summary: 'All tenants, newest first (admin only)',
        querystring: PageQuery,
        response: {
          200: Type.Object({ items: Type.Array(TenantSchema), nextCursor: Type.Union([Type.String(), Type.Null()]) }),
          400: ErrorSchema,
          401: ErrorSchema,
          403: ErrorSchema,
        },
      },
    },
    async (request) => {
      requireAdmin(request);
      const page = await listTenants(db, { limit: request.query.limit, cursor: request.query.cursor });
      return { items: page.items.map(tenantView), nextCursor: page.nextCursor };
    },
  );

  app.post<{ Params: Static<typeof IdParams>; Body: Static<typeof CreateApiKey> }>(
    '/tenants/:id/api-keys',
    {
      schema: {
        summary: "Create another API key for a tenant (admin only; the key is shown once)",
        params: IdParams,
        body: Type.Optional(CreateApiKey),
        response: { 201: CreatedApiKeySchema, 400: ErrorSchema, 401: ErrorSchema, 403: ErrorSchema, 404: ErrorSchema },
      },
    },
    async (request, reply) => {
      requireAdmin(request);
      const tenant = await getTenant(db, request.params.id);
      if (!tenant) throw new CocoonError('tenant_not_found', `no tenant '${request.params.id}'`, { status: 404 });
      return reply.status(201).send(await issueApiKey(context, tenant.id, request.body?.name));
    },
  );
}
