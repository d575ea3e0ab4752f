/**
 * E2B's control plane under `/e2b` on the API port (E2B_API_URL=http://<api>/e2b), authenticated
 * by a Cocoon API key sent as `X-API-KEY`. Shapes follow E2B's OpenAPI document and what the
 * `e2b` SDK reads; both the 2.51+ routes (`/v2/sandboxes`, `/v2/sandboxes/{id}/connect`) and the
 * older ones (`/sandboxes`, `/sandboxes/{id}/connect`, 1.x `/resume`) are served. Every error is
 * `{"code": <status>, "message"}` (errors.ts). Hidden from Cocoon's own OpenAPI document.
 */
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import type { ApiContext } from '../../api/app.ts';
import { authenticateApiKey } from '../../store/api-keys.ts';
import type { Tenant } from '../../store/tenants.ts';
import { E2bError, e2bBody, e2bErrorHandler } from './errors.ts';
import { ENVD_VERSION, type E2bSandboxes, type SandboxView } from './sandboxes.ts';

export const E2B_PREFIX = '/e2b';
const MAX_PAGE = 100;

interface Params {
  id: string;
}
type Body = Record<string, unknown> | undefined;

function optionalInt(body: Body, key: string): number | undefined {
  const value = body?.[key];
  if (value === undefined || value === null) return undefined;
  if (typeof value !== 'number' || !Number.isInteger(value)) throw new E2bError(400, `${key} must be an integer`);
  return value;
}

function optionalBool(body: Body, key: string): boolean | undefined {
  const value = body?.[key];
  if (value === undefined || value === null) return undefined;
  if (typeof value !== 'boolean') throw new E2bError(400, `${key} must be a boolean`);
  return value;
}

/** `metadata` query: `k1=v1&k2=v2`, itself URL-encoded (as the SDK sends it). */
function metadataFilter(raw: unknown): Record<string, string> {
  if (typeof raw !== 'string' || raw === '') return {};
  if (raw.length > 4096) throw new E2bError(400, 'metadata filter too long');
  const out: Record<string, string> = {};
  for (const [k, v] of new URLSearchParams(raw)) out[decodeURIComponent(k)] = decodeURIComponent(v);
  return out;
}

export async function e2bControlRoutes(app: FastifyInstance, context: ApiContext, sandboxes: () => E2bSandboxes): Promise<void> {
  await app.register(
    async (e2b) => {
      e2b.setErrorHandler(e2bErrorHandler);
      e2b.setNotFoundHandler((request, reply) => {
        void reply.status(404).send(e2bBody(404, `not served by Cocoon's E2B surface: ${request.method} ${request.url.split('?')[0]}`));
      });
      e2b.decorateRequest('e2bTenant', null);
      e2b.addHook('onRequest', async (request) => {
        const header = request.headers['x-api-key'];
        const bearer = /^Bearer ([\x21-\x7e]{1,200})$/.exec(request.headers.authorization ?? '')?.[1];
        const key = typeof header === 'string' && header !== '' ? header : bearer;
        if (!key || key.length > 200) throw new E2bError(401, 'send a Cocoon API key as X-API-KEY');
        const found = await authenticateApiKey(context.db, key);
        if (!found) throw new E2bError(401, 'Invalid API key');
        (request as FastifyRequest & { e2bTenant: Tenant }).e2bTenant = found.tenant;
      });
      const tenant = (request: FastifyRequest): string => (request as FastifyRequest & { e2bTenant: Tenant }).e2bTenant.id;
      const opts = { config: { public: true }, schema: { hide: true } } as const;
      const body = (request: FastifyRequest): Body => {
        const b = request.body;
        if (b === undefined || b === null || b === '') return undefined;
        if (typeof b !== 'object' || Array.isArray(b)) throw new E2bError(400, 'the body must be a JSON object');
        return b as Record<string, unknown>;
      };

      const sandboxJson = (v: SandboxView) => ({
        sandboxID: v.sandbox.microvmId,
        templateID: v.sandbox.templateId,
        alias: v.sandbox.alias ?? undefined,
        clientID: 'cocoon',
        envdVersion: ENVD_VERSION,
        envdAccessToken: sandboxes().accessToken(v.sandbox.microvmId),
        trafficAccessToken: null,
        domain: null,
      });
      const detailJson = (v: SandboxView) => ({
        ...sandboxJson(v),
        startedAt: v.sandbox.startedAt,
        endAt: v.sandbox.endAt,
        cpuCount: v.microvm.vcpus,
        memoryMB: v.microvm.memoryMiB,
        diskSizeMB: v.microvm.diskMiB,
        metadata: v.sandbox.metadata,
        state: v.state,
        lifecycle: { onTimeout: v.sandbox.autoPause ? 'pause' : 'kill', autoResume: v.sandbox.autoResume },
        volumeMounts: [],
      });
      const listedJson = (v: SandboxView) => {
        const { envdAccessToken: _t, trafficAccessToken: _x, domain: _d, ...rest } = detailJson(v);
        return rest;
      };

      const create = async (request: FastifyRequest, reply: FastifyReply) => {
        const b = body(request) ?? {};
        const autoResume = b.autoResume as { enabled?: unknown } | undefined;
        if (b.volumeMounts !== undefined) throw new E2bError(400, 'volume mounts are not supported by Cocoon');
        // In a cluster, placement may pick another host: the request is forwarded there whole.
        const image = await sandboxes().template(tenant(request), typeof b.templateID === 'string' ? b.templateID : '');
        const size = { vcpus: image.vcpus, memoryMiB: image.memoryMiB, diskMiB: image.diskMiB, imageId: image.id };
        if (await context.forwarding?.place?.(request.raw, reply.raw, () => reply.hijack(), size, b)) return reply;
        const view = await sandboxes().create(tenant(request), {
          template: typeof b.templateID === 'string' ? b.templateID : '',
          timeoutSeconds: optionalInt(b, 'timeout'),
          metadata: b.metadata as Record<string, string> | undefined,
          envs: b.envVars as Record<string, string> | undefined,
          autoPause: optionalBool(b, 'autoPause'),
          autoResume: typeof autoResume?.enabled === 'boolean' ? autoResume.enabled : undefined,
        });
        return reply.status(201).send(sandboxJson(view));
      };
      e2b.post('/sandboxes', opts, create);
      e2b.post('/v2/sandboxes', opts, create);

      const list = async (request: FastifyRequest, all: boolean) => {
        const query = request.query as Record<string, unknown>;
        const wanted = metadataFilter(query.metadata);
        const states = typeof query.state === 'string' ? query.state.split(',') : Array.isArray(query.state) ? (query.state as string[]).flatMap((s) => s.split(',')) : all ? ['running', 'paused'] : ['running'];
        for (const s of states) if (s !== 'running' && s !== 'paused') throw new E2bError(400, `unknown state '${s}' (running or paused)`);
        let views = (await sandboxes().list(tenant(request))).filter(
          (v) => states.includes(v.state) && Object.entries(wanted).every(([k, val]) => v.sandbox.metadata[k] === val),
        );
        if (typeof query.template === 'string' && query.template) views = views.filter((v) => v.sandbox.templateId === query.template || v.sandbox.alias === query.template);
        return views;
      };
      e2b.get('/sandboxes', opts, async (request) => (await list(request, false)).map(listedJson));
      e2b.get('/v2/sandboxes', opts, async (request, reply) => {
        const query = request.query as Record<string, unknown>;
        const limit = query.limit === undefined ? MAX_PAGE : Number(query.limit);
        if (!Number.isInteger(limit) || limit < 1 || limit > MAX_PAGE) throw new E2bError(400, `limit must be from 1 to ${MAX_PAGE}`);
        let views = await list(request, true);
        if (typeof query.startedAfter === 'string' && query.startedAfter) {
          const after = Date.parse(query.startedAfter);
          if (Number.isNaN(after)) throw new E2bError(400, 'startedAfter must be an RFC 3339 time');
          views = views.filter((v) => Date.parse(v.sandbox.startedAt) >= after);
        }
        if (query.order !== undefined && query.order !== 'asc' && query.order !== 'desc') throw new E2bError(400, 'order must be asc or desc');
        const asc = query.order === 'asc';
        // By id, which sorts by creation time (newest first unless asc); the next token is the
        // last id handed out.
        views.sort((a, b) => (a.sandbox.microvmId < b.sandbox.microvmId ? -1 : 1) * (asc ? 1 : -1));
        if (typeof query.nextToken === 'string' && query.nextToken) {
          const after = query.nextToken;
          views = views.filter((v) => (asc ? v.sandbox.microvmId > after : v.sandbox.microvmId < after));
        }
        const page = views.slice(0, limit);
        if (views.length > limit) void reply.header('x-next-token', page[page.length - 1]!.sandbox.microvmId);
        return page.map(listedJson);
      });

      e2b.get<{ Params: Params }>('/sandboxes/:id', opts, async (request) => detailJson(await sandboxes().get(tenant(request), request.params.id)));
      e2b.delete<{ Params: Params }>('/sandboxes/:id', opts, async (request, reply) => {
        await sandboxes().kill(tenant(request), request.params.id);
        return reply.status(204).send();
      });
      e2b.post<{ Params: Params }>('/sandboxes/:id/timeout', opts, async (request, reply) => {
        const timeout = optionalInt(body(request), 'timeout');
        if (timeout === undefined) throw new E2bError(400, 'timeout (seconds) is required');
        await sandboxes().setTimeout(tenant(request), request.params.id, timeout);
        return reply.status(204).send();
      });
      // Older SDKs keep a sandbox alive with refreshes: the same as a timeout of `duration`.
      e2b.post<{ Params: Params }>('/sandboxes/:id/refreshes', opts, async (request, reply) => {
        await sandboxes().setTimeout(tenant(request), request.params.id, optionalInt(body(request), 'duration') ?? 60);
        return reply.status(204).send();
      });
      e2b.post<{ Params: Params }>('/sandboxes/:id/pause', opts, async (request, reply) => {
        if (body(request)?.memory === false) throw new E2bError(400, 'Cocoon always keeps memory when pausing (memory: false is not supported)');
        if (!(await sandboxes().pause(tenant(request), request.params.id))) throw new E2bError(409, `sandbox ${request.params.id} is already paused`);
        return reply.status(204).send();
      });
      const connect = (legacyResume: boolean) => async (request: FastifyRequest<{ Params: Params }>, reply: FastifyReply) => {
        const b = body(request);
        if (b?.memory === false) throw new E2bError(400, 'Cocoon always resumes with memory (onResume: reboot is not supported)');
        const { view, resumed } = await sandboxes().connect(tenant(request), request.params.id, optionalInt(b, 'timeout'));
        if (legacyResume && !resumed) throw new E2bError(409, `sandbox ${request.params.id} is already running`);
        return reply.status(resumed ? 201 : 200).send(sandboxJson(view));
      };
      e2b.post<{ Params: Params }>('/sandboxes/:id/connect', opts, connect(false));
      e2b.post<{ Params: Params }>('/v2/sandboxes/:id/connect', opts, connect(false));
      e2b.post<{ Params: Params }>('/sandboxes/:id/resume', opts, connect(true));

      e2b.post<{ Params: Params }>('/sandboxes/:id/fork', opts, async (request) => {
        const b = body(request);
        const views = await sandboxes().fork(tenant(request), request.params.id, optionalInt(b, 'count'), optionalInt(b, 'timeout'));
        return views.map((v) => ({ sandbox: sandboxJson(v) }));
      });
      e2b.post<{ Params: Params }>('/sandboxes/:id/snapshots', opts, async (request, reply) => {
        const name = body(request)?.name;
        if (name !== undefined && typeof name !== 'string') throw new E2bError(400, 'name must be a string');
        const image = await sandboxes().snapshot(tenant(request), request.params.id, name);
        return reply.status(201).send({ snapshotID: image.id, names: [image.name] });
      });
      e2b.get<{ Params: Params }>('/sandboxes/:id/metrics', opts, async (request) => {
        await sandboxes().get(tenant(request), request.params.id);
        return [];
      });
    },
    { prefix: E2B_PREFIX },
  );
}
