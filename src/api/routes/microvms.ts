/**
 * MicroVMs and their tokens (docs/contract.md): start from an image with an idle policy, get, list,
 * suspend, resume, terminate; issue and revoke gateway tokens; read the microVM's log.
 * Another tenant's microVM is answered exactly like a missing one (404).
 */
import type { FastifyInstance, FastifyRequest } from 'fastify';
import { Type, type Static } from 'typebox';
import { CocoonError } from '../../common/errors.ts';
import { MAX_FORKS, type MicrovmService } from '../../lifecycle/service.ts';
import { IMAGE_NAME } from '../../store/images.ts';
import { ImageSchema, imageView } from './images.ts';
import { findTenantImage } from '../../store/images.ts';
import {
  MAX_RUN_HOOK_PAYLOAD_BYTES,
  MAX_SESSION_SECONDS,
  MICROVM_STATES,
  findTenantMicrovm,
  listMicrovms,
  type Microvm,
  type MicrovmState,
} from '../../store/microvms.ts';
import { MAX_TOKEN_MINUTES, createToken, getToken, listTokens, revokeToken, type Token } from '../../store/tokens.ts';
import type { ApiContext } from '../app.ts';
import { ErrorSchema, PageQuery } from '../schemas.ts';

export interface MicrovmRouteServices {
  /** The lifecycle's operations (a function: the service exists once the server started). */
  microvms: () => MicrovmService;
  urlFor: (microvmId: string) => string;
}

/** How long suspend/resume answers wait for the operation before answering with the state so far. */
const OPERATION_WAIT_MS = 30_000;

const Nullable = <T extends Parameters<typeof Type.Union>[0][number]>(schema: T) => Type.Union([schema, Type.Null()]);
const Seconds = (description: string) => Type.Integer({ minimum: 1, maximum: MAX_SESSION_SECONDS, description });
const Port = Type.Integer({ minimum: 1, maximum: 65535 });

const IdlePolicyInput = Type.Object(
  {
    autoResumeEnabled: Type.Optional(Type.Boolean({ description: 'A request wakes a SUSPENDED microVM (default true)' })),
    maxIdleDurationSeconds: Type.Optional(Seconds('No traffic for this long → SUSPENDED (default 300)')),
    suspendedDurationSeconds: Type.Optional(Nullable(Seconds('SUSPENDED this long → TERMINATED (default: until the session ends)'))),
  },
  { additionalProperties: false },
);

const CreateMicrovm = Type.Object(
  {
    image: Type.String({ minLength: 1, maxLength: 300, description: 'Image ARN or id' }),
    idlePolicy: Type.Optional(IdlePolicyInput),
    maximumDurationSeconds: Type.Optional(Seconds(`The session ends after this long, whatever the state (default and maximum ${MAX_SESSION_SECONDS})`)),
    clientToken: Type.Optional(Type.String({ pattern: '^[\\x21-\\x7e]{1,64}$', description: 'Makes the start idempotent' })),
    runHookPayload: Type.Optional(
      Type.String({
        maxLength: MAX_RUN_HOOK_PAYLOAD_BYTES,
        description: `The body of the image's HTTP run hook (POST /aws/lambda-microvms/runtime/v1/run), at most ${MAX_RUN_HOOK_PAYLOAD_BYTES} bytes of UTF-8; sensitive: never logged nor shown`,
      }),
    ),
  },
  { additionalProperties: false },
);

const MicrovmSchema = Type.Object({
  id: Type.String(),
  arn: Type.String(),
  image: Type.String({ description: 'The image ARN' }),
  imageId: Nullable(Type.String()),
  state: Type.Union(MICROVM_STATES.map((s) => Type.Literal(s))),
  error: Nullable(Type.String()),
  idlePolicy: Type.Object({
    autoResumeEnabled: Type.Boolean(),
    maxIdleDurationSeconds: Type.Integer(),
    suspendedDurationSeconds: Nullable(Type.Integer()),
  }),
  maximumDurationSeconds: Type.Integer(),
  vcpus: Type.Integer(),
  memoryMiB: Type.Integer(),
  port: Nullable(Type.Integer({ description: 'The app port; null: its image has none' })),
  url: Type.String({ description: 'The microVM through the gateway (send X-Cocoon-Token with every request)' }),
  createdAt: Type.String(),
  expiresAt: Type.String({ description: 'End of the session' }),
  lastActivityAt: Type.String(),
  suspendedAt: Nullable(Type.String()),
  terminatedAt: Nullable(Type.String()),
});

const StartedMicrovm = Type.Intersect([
  MicrovmSchema,
  Type.Object({
    token: Nullable(Type.String({ description: 'A gateway token (shown once); null when the microVM (an idempotent replay) has ended' })),
    tokenId: Nullable(Type.String()),
    tokenExpiresAt: Nullable(Type.String()),
  }),
]);

const PortRangeSchema = Type.Object(
  { from: Port, to: Port },
  { additionalProperties: false, description: 'An inclusive range of guest ports (AWS PortRange)' },
);
const PortSpecSchema = Type.Union([Port, PortRangeSchema]);
const TokenScopeSchema = Type.Union([Type.Literal('http'), Type.Literal('shell')], { description: "What it opens through the gateway: 'http' app requests (default) or 'shell', the PTY WebSocket /.cocoon/shell" });
const TokenSchema = Type.Object({
  id: Type.String(),
  scope: TokenScopeSchema,
  expiresAt: Type.String(),
  allowedPorts: Nullable(Type.Array(PortSpecSchema, { description: 'Ports and {from, to} ranges; null: every port' })),
  createdAt: Type.String(),
  revokedAt: Nullable(Type.String()),
});
const IssuedToken = Type.Object({
  id: Type.String(),
  token: Type.String({ description: 'Send it as X-Cocoon-Token; shown once' }),
  scope: TokenScopeSchema,
  expiresAt: Type.String(),
  allowedPorts: Nullable(Type.Array(PortSpecSchema)),
});
const IssueToken = Type.Object(
  {
    expirationMinutes: Type.Optional(Type.Integer({ minimum: 1, maximum: MAX_TOKEN_MINUTES, description: 'Default 60' })),
    allowedPorts: Type.Optional(
      Type.Array(PortSpecSchema, {
        minItems: 1,
        maxItems: 64,
        description: 'Guest ports and {"from", "to"} ranges (inclusive) the token opens; default: every port (http scope only)',
      }),
    ),
    scope: Type.Optional(TokenScopeSchema),
  },
  { additionalProperties: false },
);

const ForkBody = Type.Object(
  {
    count: Type.Optional(Type.Integer({ minimum: 1, maximum: MAX_FORKS, description: `How many forks (1–${MAX_FORKS}, default 1)` })),
    idlePolicy: Type.Optional(IdlePolicyInput),
    maximumDurationSeconds: Type.Optional(Seconds("Each fork's session (default: the source's maximumDurationSeconds, counted from the fork)")),
    suspended: Type.Optional(
      Type.Boolean({
        description: 'Leave the forks SUSPENDED (default false): none is started; each wakes on its first request or resume. Answers once they are committed',
      }),
    ),
  },
  { additionalProperties: false },
);
const CheckpointBody = Type.Object(
  {
    name: Type.Optional(Type.String({ pattern: IMAGE_NAME.source, description: "The image's name (default: the source image's name: a new version of it)" })),
  },
  { additionalProperties: false },
);

const IdParams = Type.Object({ id: Type.String({ minLength: 1, maxLength: 300 }) });
const TokenParams = Type.Object({ id: Type.String({ minLength: 1, maxLength: 300 }), tokenId: Type.String({ minLength: 1, maxLength: 100 }) });
const ListQuery = Type.Intersect([
  PageQuery,
  Type.Object({
    state: Type.Optional(Type.Array(Type.Union(MICROVM_STATES.map((s) => Type.Literal(s))), { description: 'One or more states (repeat the parameter)' })),
    image: Type.Optional(Type.String({ maxLength: 300, description: 'Image ARN or id' })),
  }),
]);

const errors = { 400: ErrorSchema, 401: ErrorSchema, 404: ErrorSchema, 409: ErrorSchema };

function notFound(idOrArn: string): CocoonError {
  return new CocoonError('microvm_not_found', `no microVM '${idOrArn}'`, { status: 404 });
}

function tokenView(token: Token) {
  return { id: token.id, scope: token.scope, expiresAt: token.expiresAt, allowedPorts: token.allowedPorts, createdAt: token.createdAt, revokedAt: token.revokedAt };
}

async function withDeadline(work: Promise<void>, ms: number): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<void>((resolve) => {
    timer = setTimeout(resolve, ms);
  });
  try {
    await Promise.race([work, late]);
  } finally {
    clearTimeout(timer);
  }
}

export function microvmRoutes(app: FastifyInstance, context: ApiContext, services: MicrovmRouteServices): void {
  const { db } = context;
  const view = (m: Microvm) => ({
    id: m.id,
    arn: m.arn,
    image: m.imageArn,
    imageId: m.imageId,
    state: m.state,
    error: m.error,
    idlePolicy: m.idlePolicy,
    maximumDurationSeconds: m.maximumDurationSeconds,
    vcpus: m.vcpus,
    memoryMiB: m.memoryMiB,
    port: m.hasAppPort ? m.port : null,
    url: services.urlFor(m.id),
    createdAt: m.createdAt,
    expiresAt: m.expiresAt,
    lastActivityAt: m.lastActivityAt,
    suspendedAt: m.suspendedAt,
    terminatedAt: m.terminatedAt,
  });
  const find = async (request: FastifyRequest, idOrArn: string): Promise<Microvm> => {
    const microvm = await findTenantMicrovm(db, request.tenant.id, idOrArn);
    if (!microvm) throw notFound(idOrArn);
    return microvm;
  };

  app.post<{ Body: Static<typeof CreateMicrovm> }>(
    '/microvms',
    {
      schema: {
        summary: 'Start a microVM from an image (restored from its snapshot); answers at once with a gateway token',
        body: CreateMicrovm,
        response: { 201: StartedMicrovm, ...errors },
      },
    },
    async (request, reply) => {
      const body = request.body;
      const image = await findTenantImage(db, request.tenant.id, body.image);
      if (!image) throw new CocoonError('image_not_found', `no image '${body.image}'`, { status: 404 });
      // In a cluster, placement may pick another host: the request is forwarded there whole.
      const size = { vcpus: image.vcpus, memoryMiB: image.memoryMiB, diskMiB: image.diskMiB, imageId: image.id };
      if (await context.forwarding?.place?.(request.raw, reply.raw, () => reply.hijack(), size, body)) return reply;
      const { microvm } = await services.microvms().start({
        tenantId: request.tenant.id,
        image,
        idlePolicy: body.idlePolicy,
        maximumDurationSeconds: body.maximumDurationSeconds,
        clientToken: body.clientToken,
        runHookPayload: body.runHookPayload,
      });
      let token: { token: Token; secret: string } | undefined;
      try {
        token = await createToken(db, { microvmId: microvm.id, tenantId: request.tenant.id });
      } catch (error) {
        if (!(error instanceof CocoonError && error.code === 'microvm_terminated')) throw error;
      }
      return reply.status(201).send({
        ...view(microvm),
        token: token?.secret ?? null,
        tokenId: token?.token.id ?? null,
        tokenExpiresAt: token?.token.expiresAt ?? null,
      });
    },
  );

  app.get<{ Querystring: Static<typeof ListQuery> }>(
    '/microvms',
    {
      schema: {
        summary: "List the tenant's microVMs, newest first (filter by state and image)",
        querystring: ListQuery,
        response: { 200: Type.Object({ items: Type.Array(MicrovmSchema), nextCursor: Nullable(Type.String()) }), ...errors },
      },
    },
    async (request) => {
      const { state, image, limit, cursor } = request.query;
      let imageFilter: { imageId?: string; imageArn?: string } = {};
      if (image !== undefined) {
        const found = await findTenantImage(db, request.tenant.id, image);
        imageFilter = found ? { imageId: found.id } : image.startsWith('arn:') ? { imageArn: image } : { imageId: image };
      }
      const page = await listMicrovms(db, {
        tenantId: request.tenant.id,
        ...(state ? { state: state as MicrovmState[] } : {}),
        ...imageFilter,
        limit,
        cursor,
      });
      return { items: page.items.map(view), nextCursor: page.nextCursor };
    },
  );

  app.get<{ Params: Static<typeof IdParams> }>(
    '/microvms/:id',
    { schema: { summary: 'A microVM (id or ARN)', params: IdParams, response: { 200: MicrovmSchema, ...errors } } },
    async (request) => view(await find(request, request.params.id)),
  );

  app.post<{ Params: Static<typeof IdParams> }>(
    '/microvms/:id/suspend',
    {
      schema: {
        summary: 'Suspend: memory and disk saved as files, no QEMU process; answers once done (or with SUSPENDING after 30 s)',
        params: IdParams,
        response: { 200: MicrovmSchema, ...errors },
      },
    },
    async (request) => {
      const microvm = await find(request, request.params.id);
      await withDeadline(services.microvms().suspend(microvm.id), OPERATION_WAIT_MS);
      return view(await find(request, microvm.id));
    },
  );

  app.post<{ Params: Static<typeof IdParams> }>(
    '/microvms/:id/resume',
    {
      schema: {
        summary: 'Resume a SUSPENDED microVM (also when autoResumeEnabled is false); answers once RUNNING (or after 30 s)',
        params: IdParams,
        response: { 200: MicrovmSchema, ...errors, 503: ErrorSchema },
      },
    },
    async (request) => {
      const microvm = await find(request, request.params.id);
      await withDeadline(services.microvms().resume(microvm.id), OPERATION_WAIT_MS);
      return view(await find(request, microvm.id));
    },
  );

  app.post<{ Params: Static<typeof IdParams>; Body: Static<typeof ForkBody> }>(
    '/microvms/:id/fork',
    {
      schema: {
        summary:
          "Fork: new microVMs that each continue the source's memory, disk and processes from this moment (copy-on-write), " +
          'with their own token, session and idle policy; a RUNNING source is paused briefly, a SUSPENDED one stays suspended. ' +
          'Answers once the forks run (or after 60 s with their state so far)',
        params: IdParams,
        body: ForkBody,
        response: {
          201: Type.Object({ items: Type.Array(StartedMicrovm), sourcePausedMs: Type.Number({ description: "How long the source's vCPUs were stopped" }) }),
          ...errors,
          503: ErrorSchema,
          507: ErrorSchema,
        },
      },
      preValidation: async (request) => {
        if (request.body === undefined) request.body = {};
      },
    },
    async (request, reply) => {
      const microvm = await find(request, request.params.id);
      const body = request.body;
      const { forks, pausedMs } = await services.microvms().fork(microvm, {
        count: body.count ?? 1,
        ...(body.idlePolicy
          ? {
              idlePolicy: {
                autoResumeEnabled: body.idlePolicy.autoResumeEnabled ?? microvm.idlePolicy.autoResumeEnabled,
                maxIdleDurationSeconds: body.idlePolicy.maxIdleDurationSeconds ?? microvm.idlePolicy.maxIdleDurationSeconds,
                suspendedDurationSeconds:
                  body.idlePolicy.suspendedDurationSeconds === undefined ? microvm.idlePolicy.suspendedDurationSeconds : body.idlePolicy.suspendedDurationSeconds,
              },
            }
          : {}),
        ...(body.maximumDurationSeconds ? { maximumDurationSeconds: body.maximumDurationSeconds } : {}),
        ...(body.suspended ? { suspended: true } : {}),
      });
      const items = [];
      for (const fork of forks) {
        const current = (await findTenantMicrovm(db, request.tenant.id, fork.id)) ?? fork;
        const { token, secret } = await createToken(db, { microvmId: fork.id, tenantId: request.tenant.id });
        items.push({ ...view(current), token: secret, tokenId: token.id, tokenExpiresAt: token.expiresAt });
      }
      return reply.status(201).send({ items, sourcePausedMs: Math.round(pausedMs * 100) / 100 });
    },
  );

  app.post<{ Params: Static<typeof IdParams>; Body: Static<typeof CheckpointBody> }>(
    '/microvms/:id/checkpoint',
    {
      schema: {
        summary:
          "Checkpoint: a new image (a new version of `name`, default the source image's name) whose snapshot is this microVM's " +
          'state at this moment; SNAPSHOTTING at once, READY once committed; microVMs started from it begin exactly there',
        params: IdParams,
        body: CheckpointBody,
        response: { 202: ImageSchema, ...errors },
      },
      preValidation: async (request) => {
        if (request.body === undefined) request.body = {};
      },
    },
    async (request, reply) => {
      const microvm = await find(request, request.params.id);
      const { image } = await services.microvms().checkpoint(microvm, request.body.name);
      return reply.status(202).send(imageView(image));
    },
  );

  app.delete<{ Params: Static<typeof IdParams> }>(
    '/microvms/:id',
    { schema: { summary: 'Terminate: the VM and its files are removed, the gateway answers 410', params: IdParams, response: { 204: Type.Null(), ...errors } } },
    async (request, reply) => {
      const microvm = await find(request, request.params.id);
      await withDeadline(services.microvms().terminate(microvm.id), OPERATION_WAIT_MS);
      return reply.status(204).send();
    },
  );

  app.get<{ Params: Static<typeof IdParams> }>(
    '/microvms/:id/logs',
    {
      schema: {
        summary: "The microVM's log: its console (workload output, hook output) and lifecycle notes, last 256 KiB",
        params: IdParams,
        response: {
          200: { description: "The microVM's log", content: { 'text/plain': { schema: { type: 'string' } } } },
          ...errors,
        },
      },
    },
    async (request, reply) => {
      const microvm = await find(request, request.params.id);
      return reply.type('text/plain; charset=utf-8').send(await services.microvms().logTail(microvm.id));
    },
  );

  app.post<{ Params: Static<typeof IdParams>; Body: Static<typeof IssueToken> }>(
    '/microvms/:id/tokens',
    {
      schema: {
        summary: 'Issue a gateway token for this microVM (≤ 60 minutes, optionally only some ports; scope shell: a PTY through the gateway)',
        params: IdParams,
        body: IssueToken,
        response: { 201: IssuedToken, ...errors },
      },
      // No body at all means every default (a JSON `null` is a body, and not an object).
      preValidation: async (request) => {
        if (request.body === undefined) request.body = {};
      },
    },
    async (request, reply) => {
      const microvm = await find(request, request.params.id);
      const body = request.body;
      const { token, secret } = await createToken(db, {
        microvmId: microvm.id,
        tenantId: request.tenant.id,
        ...(body.expirationMinutes !== undefined ? { expirationMinutes: body.expirationMinutes } : {}),
        allowedPorts: body.allowedPorts ?? null,
        scope: body.scope ?? 'http',
      });
      return reply.status(201).send({ id: token.id, token: secret, scope: token.scope, expiresAt: token.expiresAt, allowedPorts: token.allowedPorts });
    },
  );

  app.get<{ Params: Static<typeof IdParams> }>(
    '/microvms/:id/tokens',
    {
      schema: {
        summary: "The microVM's tokens (never their secrets)",
        params: IdParams,
        response: { 200: Type.Object({ items: Type.Array(TokenSchema) }), ...errors },
      },
    },
    async (request) => {
      const microvm = await find(request, request.params.id);
      return { items: (await listTokens(db, microvm.id)).map(tokenView) };
    },
  );

  app.delete<{ Params: Static<typeof TokenParams> }>(
    '/microvms/:id/tokens/:tokenId',
    { schema: { summary: 'Revoke a token (effective at once)', params: TokenParams, response: { 204: Type.Null(), ...errors } } },
    async (request, reply) => {
      const microvm = await find(request, request.params.id);
      const token = await getToken(db, request.params.tokenId);
      if (!token || token.microvmId !== microvm.id) {
        throw new CocoonError('token_not_found', `microVM ${microvm.id} has no token '${request.params.tokenId}'`, { status: 404 });
      }
      await revokeToken(db, microvm.id, token.id);
      return reply.status(204).send();
    },
  );
}
