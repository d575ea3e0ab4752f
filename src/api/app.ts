/**
 * The control-plane HTTP server: Fastify with TypeBox schemas, from which both request
 * validation and the OpenAPI 3.1 document come. Routes live in `routes/`, one plugin per
 * resource; each receives the platform's services through `ApiContext`.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Duplex } from 'node:stream';
import swagger from '@fastify/swagger';
import type { TypeBoxTypeProvider } from '@fastify/type-provider-typebox';
import Fastify, { type FastifyInstance, type FastifySchema, type RouteOptions } from 'fastify';
import { CocoonError } from '../common/errors.ts';
import type { CocoonConfig } from '../config/config.ts';
import type { ObjectStore } from '../objectstore/object-store.ts';
import type { SnapshotStore } from '../snapshots/snapshot-store.ts';
import type { Db } from '../store/sql.ts';
import { registerAuth } from './auth.ts';
import { clientErrorResponse, errorBody, handleError } from './errors.ts';
import { ErrorSchema } from './schemas.ts';
import { apiKeyRoutes } from './routes/api-keys.ts';
import { dashboardRoutes } from './routes/dashboard.ts';
import { healthRoutes } from './routes/health.ts';
import { infoRoutes } from './routes/info.ts';
import { tenantRoutes } from './routes/tenants.ts';
import { setting } from '../common/settings.ts';

/** What route plugins get. Services are added here as the platform grows. */
export interface ApiContext {
  config: CocoonConfig;
  db: Db;
  objects: ObjectStore;
  /**
   * Snapshots shared through the object store (a cluster: PostgreSQL and S3, src/snapshots/mode.ts);
   * undefined on a single host, where snapshots stay local files.
   */
  snapshots?: SnapshotStore | undefined;
  /** Set once the server accepts work (health answers 503 before). */
  ready: () => boolean;
  /** The gateway's bound port once it listens (null: no gateway runs). */
  gatewayPort?: () => number | null;
  /** In a cluster (set at start by src/wiring/cluster-net.ts): requests for a microVM another host runs go there. */
  forwarding?: ApiForwarding;
}

/**
 * Hands a request to the host that runs its microVM (src/cluster/api-forwarding.ts). `request`
 * answers true when it took the request (it called `take` first, then answered it completely),
 * false when this host serves it; `upgrade` likewise for a WebSocket handshake.
 */
export interface ApiForwarding {
  request(req: IncomingMessage, res: ServerResponse, take: () => void): Promise<boolean>;
  upgrade(req: IncomingMessage, socket: Duplex, head: Buffer): Promise<boolean>;
  /**
   * A launch: placement picks the host (src/cluster/placement.ts). Answers true when it took the
   * request (another host runs it: forwarded there with `body` as the request's JSON body),
   * false when this host runs it; throws `no_host_capacity` when no live host has room.
   */
  place?(req: IncomingMessage, res: ServerResponse, take: () => void, size: LaunchSize, body: unknown): Promise<boolean>;
}

/** What a launch needs of a host, for placement. */
export interface LaunchSize {
  vcpus: number;
  memoryMiB: number;
  diskMiB: number;
  imageId: string;
}

export type ApiRoutes = (app: FastifyInstance, context: ApiContext) => Promise<void> | void;

export const API_PREFIX = '/api/v1';

/** A route as registered, for checks such as "every route is in the OpenAPI document". */
export interface RegisteredRoute {
  method: string;
  url: string;
  hidden: boolean;
  public: boolean;
}

const registered = new WeakMap<FastifyInstance, RegisteredRoute[]>();

/** Every route `app` registered (collected with the onRoute hook). */
export function registeredRoutes(app: FastifyInstance): RegisteredRoute[] {
  return [...(registered.get(app) ?? [])];
}

/** Limits at the boundary: JSON bodies are small; uploads use their own streamed routes. */
const JSON_BODY_LIMIT = 1024 * 1024;

/**
 * Every route answers errors in the one shape; this documents the ones any route can give, so
 * that no route's OpenAPI entry misses them: 400 where something is validated, 401 unless
 * public, 404 where the path names a resource, 500 everywhere.
 */
function documentErrors(route: RouteOptions): void {
  const schema = route.schema as (FastifySchema & { hide?: boolean; response?: Record<string, unknown> }) | undefined;
  if (!schema || schema.hide) return;
  const response = (schema.response ??= {});
  const add = (status: number, when: boolean) => {
    if (when && response[status] === undefined && response[String(status)] === undefined) response[status] = ErrorSchema;
  };
  add(400, Boolean(schema.body || schema.querystring || schema.params));
  add(401, !(route.config as { public?: boolean } | undefined)?.public);
  add(404, Boolean(schema.params));
  add(500, true);
}

export async function buildApiServer(context: ApiContext, extraRoutes: ApiRoutes[] = [], rootRoutes: ApiRoutes[] = []): Promise<FastifyInstance> {
  const app = Fastify({
    logger: { level: setting('COCOON_LOG_LEVEL'), redact: ['req.headers.authorization'] },
    bodyLimit: JSON_BODY_LIMIT,
    routerOptions: { maxParamLength: 300 },
    ajv: { customOptions: { removeAdditional: false, coerceTypes: 'array', allErrors: false } },
    // A request without Host is refused below, in the one error shape (Node's own refusal has
    // an empty body).
    http: { requireHostHeader: false },
    // Errors found before routing (a URL that does not decode, a path parameter over
    // maxParamLength) and HTTP that does not parse: the same error shape as everything else.
    frameworkErrors: (error, request, reply) => handleError(error, request, reply),
    clientErrorHandler: (error, socket) => {
      if ((error as NodeJS.ErrnoException).code === 'ECONNRESET' || socket.destroyed) return;
      if (socket.writable) socket.write(clientErrorResponse(error));
      socket.destroy();
    },
  }).withTypeProvider<TypeBoxTypeProvider>();
  const routes: RegisteredRoute[] = [];
  registered.set(app, routes);
  app.addHook('onRoute', (route) => {
    documentErrors(route);
    for (const method of [route.method].flat()) {
      routes.push({
        method: String(method).toUpperCase(),
        url: route.url,
        hidden: Boolean((route.schema as { hide?: boolean } | undefined)?.hide),
        public: Boolean((route.config as { public?: boolean } | undefined)?.public),
      });
    }
  });

  await app.register(swagger, {
    openapi: {
      openapi: '3.1.0',
      info: { title: 'Cocoon API', version: '1.0.0', description: 'Stateful, isolated microVMs: images, microVMs, tokens.' },
      components: { securitySchemes: { apiKey: { type: 'http', scheme: 'bearer' } } },
      security: [{ apiKey: [] }],
    },
  });
  app.setErrorHandler(handleError);
  app.setNotFoundHandler((request, reply) => {
    void reply.status(404).send(errorBody('not_found', `no route ${request.method} ${request.url.split('?')[0]}`));
  });
  app.addHook('onRequest', async (request) => {
    if (request.raw.httpVersionMajor === 1 && request.raw.httpVersionMinor >= 1 && request.headers.host === undefined) {
      throw new CocoonError('invalid_request', 'an HTTP/1.1 request needs a Host header', { status: 400 });
    }
  });
  registerAuth(app, context.db);
  // After the API key check (a request refused here is not forwarded): microVMs another host runs.
  app.addHook('onRequest', async (request, reply) => {
    const forwarding = context.forwarding;
    if (forwarding) await forwarding.request(request.raw, reply.raw, () => reply.hijack());
  });

  await app.register(
    async (api) => {
      for (const routes of [healthRoutes, infoRoutes, tenantRoutes, apiKeyRoutes, ...extraRoutes]) await routes(api, context);
      api.get(
        '/openapi.json',
        {
          config: { public: true },
          schema: {
            summary: 'This OpenAPI 3.1 document',
            security: [],
            response: { 200: { description: 'The OpenAPI document', type: 'object', additionalProperties: true } },
          },
        },
        async () => app.swagger(),
      );
    },
    { prefix: API_PREFIX },
  );
  // The web dashboard at `/` (public assets; the API key stays in the browser).
  await app.register(async (root) => dashboardRoutes(root, context));
  // Compatibility surfaces (e.g. E2B under /e2b): each registers its own prefix, auth and error shape.
  for (const routes of rootRoutes) await app.register(async (root) => routes(root, context));
  return app;
}
