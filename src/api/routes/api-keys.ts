/**
 * API keys: each tenant manages its own (`/api-keys`); the admin key also creates keys for any
 * tenant (`POST /tenants/{id}/api-keys`, in tenants.ts). Secrets are shown once, stored hashed.
 * Another tenant's key id is answered like a missing one (404).
 */
import type { FastifyInstance } from 'fastify';
import { Type, type Static } from 'typebox';
import { CocoonError } from '../../common/errors.ts';
import { createApiKey, listApiKeys, revokeApiKey, type ApiKey } from '../../store/api-keys.ts';
import { sealerForDataDir } from '../../store/sealed-secrets.ts';
import { decodeCursor, encodeCursor, pageLimit } from '../../store/pagination.ts';
import type { ApiContext } from '../app.ts';
import { ErrorSchema, PageQuery } from '../schemas.ts';

const Nullable = <T extends ReturnType<typeof Type.String>>(schema: T) => Type.Union([schema, Type.Null()]);

export const ApiKeySchema = Type.Object(
  {
    id: Type.String(),
    name: Nullable(Type.String()),
    prefix: Type.String({ description: 'The first characters of the key, to recognise it' }),
    createdAt: Type.String({ format: 'date-time' }),
    lastUsedAt: Nullable(Type.String({ format: 'date-time' })),
    revokedAt: Nullable(Type.String({ format: 'date-time' })),
  },
  { $id: 'ApiKey', description: 'An API key (never its secret)' },
);

export const CreatedApiKeySchema = Type.Object(
  {
    id: Type.String(),
    name: Nullable(Type.String()),
    prefix: Type.String(),
    createdAt: Type.String({ format: 'date-time' }),
    lastUsedAt: Nullable(Type.String({ format: 'date-time' })),
    revokedAt: Nullable(Type.String({ format: 'date-time' })),
    apiKey: Type.String({ description: 'The secret: send as `Authorization: Bearer <apiKey>`; shown once' }),
  },
  { description: 'A new API key with its secret (shown once)' },
);

export const CreateApiKey = Type.Object(
  { name: Type.Optional(Type.String({ minLength: 1, maxLength: 100, description: 'What the key is for' })) },
  { additionalProperties: false },
);

const IdParams = Type.Object({ id: Type.String({ minLength: 1, maxLength: 100 }) });

export function apiKeyView(key: ApiKey) {
  return { id: key.id, name: key.name, prefix: key.prefix, createdAt: key.createdAt, lastUsedAt: key.lastUsedAt, revokedAt: key.revokedAt };
}

export async function issueApiKey(context: ApiContext, tenantId: string, name: string | undefined) {
  // Sealed so that the key can also sign AWS SigV4 requests (src/compat/aws/).
  const sealer = sealerForDataDir(context.config.dataDir);
  const { apiKey, secret } = await createApiKey(context.db, tenantId, name !== undefined ? { name, sealer } : { sealer });
  return { ...apiKeyView(apiKey), apiKey: secret };
}

export function apiKeyRoutes(app: FastifyInstance, context: ApiContext): void {
  app.post<{ Body: Static<typeof CreateApiKey> }>(
    '/api-keys',
    {
      schema: {
        summary: "Create an API key for the caller's tenant (the secret is shown once)",
        body: Type.Optional(CreateApiKey),
        response: { 201: CreatedApiKeySchema, 400: ErrorSchema, 401: ErrorSchema },
      },
    },
    async (request, reply) => reply.status(201).send(await issueApiKey(context, request.tenant.id, request.body?.name)),
  );

  app.get<{ Querystring: Static<typeof PageQuery> }>(
    '/api-keys',
    {
      schema: {
        summary: "The caller's tenant's API keys, newest first (revoked ones too, marked)",
        querystring: PageQuery,
        response: {
          200: Type.Object({ items: Type.Array(ApiKeySchema), nextCursor: Type.Union([Type.String(), Type.Null()]) }),
          400: ErrorSchema,
          401: ErrorSchema,
        },
      },
    },
    async (request) => {
      const limit = pageLimit(request.query.limit);
      const after = decodeCursor(request.query.cursor);
      const keys = (await listApiKeys(context.db, request.tenant.id)).reverse().filter((k) => after === undefined || k.id < after);
      const items = keys.slice(0, limit);
      const nextCursor = keys.length > limit ? encodeCursor(items.at(-1)!.id) : null;
      return { items: items.map(apiKeyView), nextCursor };
    },
  );

  app.delete<{ Params: Static<typeof IdParams> }>(
    '/api-keys/:id',
    {
      schema: {
        summary: 'Revoke one of your API keys (at once); 409 for the last active one',
        params: IdParams,
        response: { 204: Type.Null(), 401: ErrorSchema, 404: ErrorSchema, 409: ErrorSchema },
      },
    },
    async (request, reply) => {
      const keys = await listApiKeys(context.db, request.tenant.id);
      const key = keys.find((k) => k.id === request.params.id && k.revokedAt === null);
      if (!key) throw new CocoonError('api_key_not_found', `no active API key '${request.params.id}'`, { status: 404 });
      if (keys.filter((k) => k.revokedAt === null).length === 1) {
        throw new CocoonError('last_api_key', 'this is the last active key of the tenant; create another one first (POST /api-keys)', { status: 409 });
      }
      await revokeApiKey(context.db, request.tenant.id, key.id);
      return reply.status(204).send();
    },
  );
}
