import type { FastifyInstance } from 'fastify';
import { Type, type Static } from 'typebox';
import { createApiKey } from '../../store/api-keys.ts';
import { createTenant, TENANT_NAME } from '../../store/tenants.ts';
import type { ApiContext } from '../app.ts';
import { requireAdmin } from '../auth.ts';
import { ErrorSchema } from '../schemas.ts';

const CreateTenant = Type.Object({ name: Type.String({ pattern: TENANT_NAME.source, maxLength: 63 }) }, { additionalProperties: false });
const TenantWithKey = Type.Object({ id: Type.String(), name: Type.String(), accountId: Type.String(), apiKey: Type.String() });

export function tenantRoutes(app: FastifyInstance, { db }: ApiContext): void {
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
      const { secret } = await createApiKey(db, tenant.id, { name: 'initial' });
      return reply.status(201).send({ id: tenant.id, name: tenant.name, accountId: tenant.accountId, apiKey: secret });
    },
  );
}
