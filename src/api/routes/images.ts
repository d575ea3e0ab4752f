import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { Readable } from 'node:stream';
import { Type, type Static } from 'typebox';
import { CocoonError } from '../../common/errors.ts';
import { DEFAULT_DISK_MIB, DEFAULT_HTTP_BUILD_HOOK_TIMEOUT_SECONDS, DEFAULT_MEMORY_MIB, DEFAULT_READINESS_TIMEOUT_SECONDS, DEFAULT_VCPUS, MIN_DISK_MIB, type ImageOperations } from '../../images/image-service.ts';
import { DEFAULT_PORT } from '../../images/pipeline.ts';
import { imageTimings } from '../../images/records.ts';
import { findTenantImage, IMAGE_NAME, listImages, type Image } from '../../store/images.ts';
import type { ApiContext, ApiRoutes } from '../app.ts';
import { ErrorSchema, PageQuery } from '../schemas.ts';

const StateSchema = Type.Union([
  Type.Literal('PENDING'), Type.Literal('BUILDING'), Type.Literal('BOOTING'),
  Type.Literal('SNAPSHOTTING'), Type.Literal('READY'), Type.Literal('FAILED'),
]);

const ReadinessInput = Type.Object(
  {
    httpPath: Type.Optional(Type.String({ pattern: '^/[\\x21-\\x7e]{0,1023}$', description: 'GET this path on the app port; ready on a 2xx answer' })),
    timeoutSeconds: Type.Optional(Type.Integer({ minimum: 1, maximum: 3600, description: `default ${DEFAULT_READINESS_TIMEOUT_SECONDS}` })),
  },
  { additionalProperties: false },
);

const HookInput = Type.Object(
  {
    command: Type.String({ minLength: 1, maxLength: 4000, pattern: '^[^\\n\\r]+$', description: 'Run with /bin/sh -c inside the guest, as the workload user' }),
    timeoutSeconds: Type.Optional(Type.Integer({ minimum: 1, maximum: 60, description: 'default 10' })),
  },
  { additionalProperties: false },
);

const HooksInput = Type.Object(
  {
    run: Type.Optional(HookInput),
    suspend: Type.Optional(HookInput),
    resume: Type.Optional(HookInput),
    terminate: Type.Optional(HookInput),
  },
  { additionalProperties: false, description: 'Guest hooks: commands cocoon-init runs after launch, before a suspend, after a resume, before termination' },
);

const HttpHookInput = (max: number, fallback: number) =>
  Type.Object(
    { timeoutSeconds: Type.Optional(Type.Integer({ minimum: 1, maximum: max, description: `default ${fallback}` })) },
    { additionalProperties: false },
  );

const HttpHooksInput = Type.Object(
  {
    port: Type.Integer({ minimum: 1, maximum: 65535, description: 'The guest port the hooks listener answers on' }),
    ready: Type.Optional(HttpHookInput(3600, DEFAULT_HTTP_BUILD_HOOK_TIMEOUT_SECONDS)),
    validate: Type.Optional(HttpHookInput(3600, DEFAULT_HTTP_BUILD_HOOK_TIMEOUT_SECONDS)),
    run: Type.Optional(HttpHookInput(60, 10)),
    resume: Type.Optional(HttpHookInput(60, 10)),
    suspend: Type.Optional(HttpHookInput(60, 10)),
    terminate: Type.Optional(HttpHookInput(60, 10)),
  },
  {
    additionalProperties: false,
    description:
      'AWS Lambda MicroVMs-style HTTP hooks: Cocoon POSTs /aws/lambda-microvms/runtime/v1/<name> to port in the guest (200 = done). ' +
      'ready and validate run during the build before the snapshot (503 = not yet, asked again until the timeout); run (with the ' +
      "microVM's runHookPayload as body), resume, suspend and terminate at the same points as the command hooks. A present key enables that hook.",
  },
);

const CreateImage = Type.Object(
  {
    name: Type.String({ pattern: IMAGE_NAME.source, maxLength: 64, description: 'Letters, digits, ".", "_", "-"; part of the ARN' }),
    bundle: Type.String({ minLength: 1, maxLength: 1100, description: 'The uri from POST /bundles, or s3://bucket/key' }),
    port: Type.Optional(Type.Union([Type.Integer({ minimum: 1, maximum: 65535 }), Type.Null()], { description: `The app port; default the Dockerfile's EXPOSE, else ${DEFAULT_PORT}; null: no app port (READY once the workload started; driven by exec)` })),
    vcpus: Type.Optional(Type.Integer({ minimum: 1, maximum: 16, description: `default ${DEFAULT_VCPUS}` })),
    memoryMiB: Type.Optional(Type.Integer({ minimum: 128, maximum: 32768, description: `default ${DEFAULT_MEMORY_MIB}` })),
    diskMiB: Type.Optional(Type.Integer({ minimum: MIN_DISK_MIB, maximum: 32768, description: `default ${DEFAULT_DISK_MIB}` })),
    readiness: Type.Optional(ReadinessInput),
    networkEgress: Type.Optional(Type.Boolean({ description: 'Let the guest reach the network (default false)' })),
    hooks: Type.Optional(HooksInput),
    httpHooks: Type.Optional(HttpHooksInput),
  },
  { additionalProperties: false },
);

const Nullable = <T extends ReturnType<typeof Type.String>>(schema: T) => Type.Union([schema, Type.Null()]);

const TimingsSchema = Type.Object(
  {
    queuedMs: Type.Optional(Type.Number()),
    fetchMs: Type.Optional(Type.Number()),
    buildMs: Type.Optional(Type.Number()),
    diskMs: Type.Optional(Type.Number()),
    bootMs: Type.Optional(Type.Number()),
    readyMs: Type.Optional(Type.Number()),
    snapshotMs: Type.Optional(Type.Number()),
    totalMs: Type.Optional(Type.Number()),
  },
  { description: 'Duration of each build phase so far, milliseconds' },
);

export const ImageSchema = Type.Object(
  {
    id: Type.String(),
    arn: Type.String({ description: 'arn:cocoon:<region>:<account>:microvm-image/<name>:<version>' }),
    name: Type.String(),
    version: Type.Integer(),
    state: StateSchema,
    error: Nullable(Type.String()),
    bundle: Type.String(),
    bundleSha256: Nullable(Type.String()),
    vcpus: Type.Integer(),
    memoryMiB: Type.Integer(),
    diskMiB: Type.Integer(),
    port: Type.Union([Type.Integer(), Type.Null()], { description: 'null: no app port' }),
    readiness: Type.Object({ httpPath: Nullable(Type.String()), timeoutSeconds: Type.Integer() }),
    networkEgress: Type.Boolean(),
    hooks: Type.Record(Type.String(), Type.Object({ command: Type.String(), timeoutSeconds: Type.Integer() })),
    httpHooks: Type.Union([
      Type.Object(
        { port: Type.Integer() },
        { additionalProperties: Type.Object({ timeoutSeconds: Type.Integer() }), description: 'The enabled HTTP hooks with their timeouts; null: none' },
      ),
      Type.Null(),
    ]),
    timings: TimingsSchema,
    createdAt: Type.String({ format: 'date-time' }),
    updatedAt: Type.String({ format: 'date-time' }),
  },
  { $id: 'Image', description: 'A built (or building) image' },
);

export type ImageView = Static<typeof ImageSchema>;

export function imageView(image: Image): ImageView {
  return {
    id: image.id,
    arn: image.arn,
    name: image.name,
    version: image.version,
    state: image.state,
    error: image.error,
    bundle: image.bundleUri,
    bundleSha256: image.bundleSha256,
    vcpus: image.vcpus,
    memoryMiB: image.memoryMiB,
    diskMiB: image.diskMiB,
    port: image.hasAppPort ? image.port : null,
    readiness: { httpPath: image.readiness.httpPath, timeoutSeconds: image.readiness.timeoutSeconds },
    networkEgress: image.networkEgress,
    hooks: image.hooks,
    httpHooks: image.httpHooks as ImageView['httpHooks'],
    timings: imageTimings(image),
    createdAt: image.createdAt,
    updatedAt: image.updatedAt,
  };
}

const IdParams = Type.Object({ id: Type.String({ minLength: 1, maxLength: 300, description: 'Image id or URL-encoded ARN' }) });
const ListQuery = Type.Intersect([
  PageQuery,
  Type.Object({
    state: Type.Optional(Type.Array(StateSchema, { description: 'One or more states (repeat the parameter)' })),
    name: Type.Optional(Type.String({ pattern: IMAGE_NAME.source })),
  }),
]);
const LogQuery = Type.Object({
  follow: Type.Optional(Type.Union([Type.Literal('1'), Type.Literal('0'), Type.Literal('true'), Type.Literal('false')], {
    description: '1: stream the log until the build ends',
  })),
});

function notFound(id: string): CocoonError {
  return new CocoonError('image_not_found', `no image '${id}'`, { status: 404 });
}

async function lookup(context: ApiContext, request: FastifyRequest, id: string): Promise<Image> {
  const image = await findTenantImage(context.db, request.tenant.id, id);
  if (!image) throw notFound(id);
  return image;
}

export function imageRoutes(service: () => ImageOperations): ApiRoutes {
  return (app: FastifyInstance, context: ApiContext) => {
    // Followed logs end when the server closes (else closing would wait for builds to end).
    const followers = new Set<AbortController>();
    app.addHook('preClose', async () => {
      for (const follower of followers) follower.abort();
    });
    app.post<{ Body: Static<typeof CreateImage> }>(
      '/images',
      {
        schema: {
          summary: 'Create an image from a bundle; builds in the background (poll GET /images/{id} or follow its logs)',
          body: CreateImage,
          response: { 202: ImageSchema, 400: ErrorSchema, 401: ErrorSchema, 404: ErrorSchema, 429: ErrorSchema, 503: ErrorSchema },
        },
      },
      async (request, reply) => {
        const image = await service().create(request.tenant.id, request.body);
        return reply.status(202).header('location', `/api/v1/images/${image.id}`).send(imageView(image));
      },
    );

    app.get<{ Querystring: Static<typeof ListQuery> }>(
      '/images',
      {
        schema: {
          summary: "The tenant's images, newest first",
          querystring: ListQuery,
          response: { 200: Type.Object({ items: Type.Array(ImageSchema), nextCursor: Type.Union([Type.String(), Type.Null()]) }), 400: ErrorSchema, 401: ErrorSchema },
        },
      },
      async (request) => {
        const { limit, cursor, state, name } = request.query;
        const page = await listImages(context.db, {
          tenantId: request.tenant.id,
          ...(limit !== undefined ? { limit } : {}),
          ...(cursor !== undefined ? { cursor } : {}),
          ...(state !== undefined ? { state } : {}),
          ...(name !== undefined ? { name } : {}),
        });
        return { items: page.items.map(imageView), nextCursor: page.nextCursor };
      },
    );

    app.get<{ Params: Static<typeof IdParams> }>(
      '/images/:id',
      {
        schema: {
          summary: 'One image, by id or URL-encoded ARN',
          params: IdParams,
          response: { 200: ImageSchema, 401: ErrorSchema, 404: ErrorSchema },
        },
      },
      async (request) => imageView(await lookup(context, request, request.params.id)),
    );

    app.get<{ Params: Static<typeof IdParams>; Querystring: Static<typeof LogQuery> }>(
      '/images/:id/logs',
      {
        schema: {
          summary: 'The build log (text/plain); with follow=1 it streams until the build ends',
          params: IdParams,
          querystring: LogQuery,
          response: {
            200: { description: 'The build log', content: { 'text/plain': { schema: { type: 'string' } } } },
            401: ErrorSchema,
            404: ErrorSchema,
          },
        },
      },
      async (request, reply: FastifyReply) => {
        const image = await lookup(context, request, request.params.id);
        const follow = request.query.follow === '1' || request.query.follow === 'true';
        const stop = new AbortController();
        followers.add(stop);
        stop.signal.addEventListener('abort', () => followers.delete(stop), { once: true });
        request.raw.once('close', () => stop.abort());
        reply.raw.once('close', () => stop.abort());
        const stream = Readable.from(service().logChunks(image.id, follow, stop.signal), { objectMode: false });
        stream.once('close', () => stop.abort());
        reply.header('cache-control', 'no-store');
        // A followed log is one long answer: the connection ends with it (a kept-alive one
        // would hold a closing server for the keep-alive timeout).
        if (follow) reply.header('x-content-type-options', 'nosniff').header('connection', 'close');
        return reply.type('text/plain; charset=utf-8').send(stream);
      },
    );

    app.delete<{ Params: Static<typeof IdParams> }>(
      '/images/:id',
      {
        schema: {
          summary: 'Delete an image and its files (a build in progress is cancelled); 409 while microVMs use it',
          params: IdParams,
          response: { 204: Type.Null(), 401: ErrorSchema, 404: ErrorSchema, 409: ErrorSchema },
        },
      },
      async (request, reply) => {
        const image = await lookup(context, request, request.params.id);
        const result = await service().delete(request.tenant.id, image.id);
        if (result === 'not_found') throw notFound(request.params.id);
        if (result === 'in_use') {
          throw new CocoonError('image_in_use', `image ${image.arn} is used by microVMs; terminate them first`, { status: 409 });
        }
        return reply.status(204).send();
      },
    );
  };
}
