/**
 * Exec inside a microVM (docs/exec.md): streamed non-interactive exec (ndjson), background
 * processes and their handles, and the interactive WebSocket (`/exec/ws`, stdin and PTY).
 * Everything goes through the ExecService (src/exec/types.ts): tenant check, wake, sessions.
 */
import type { IncomingMessage } from 'node:http';
import type { Duplex } from 'node:stream';
import { Readable } from 'node:stream';
import type { FastifyInstance } from 'fastify';
import { Type, type Static } from 'typebox';
import { WebSocketServer } from 'ws';
import { CocoonError } from '../../common/errors.ts';
import { errorBody } from '../errors.ts';
import { type ExecService, type ExecEvent, type ExecRequest } from '../../exec/types.ts';
import { MAX_WS_MESSAGE, defaultCommand, serveExecWebSocket } from '../../exec/ws-session.ts';
import { authenticateApiKey } from '../../store/api-keys.ts';
import type { ApiContext } from '../app.ts';
import { API_PREFIX } from '../app.ts';
import { ErrorSchema } from '../schemas.ts';
import { fileRoutes } from './files.ts';

const MAX_STDIN_BASE64 = Math.ceil((1024 * 1024 * 4) / 3) + 4;
const MAX_STDIN_BODY = 64 * 1024 * 1024;

const IdParams = Type.Object({ id: Type.String({ minLength: 1, maxLength: 300 }) });
const PidParams = Type.Object({ id: Type.String({ minLength: 1, maxLength: 300 }), pid: Type.Integer({ minimum: 1, maximum: 4194304 }) });

export const ExecBody = Type.Object(
  {
    command: Type.Union([Type.String({ minLength: 1, maxLength: 60000 }), Type.Array(Type.String({ maxLength: 32768 }), { minItems: 1, maxItems: 256 })], {
      description: 'argv, or a string run with /bin/sh -c (400 no_shell when the image has none)',
    }),
    env: Type.Optional(Type.Record(Type.String({ pattern: '^[A-Za-z_][A-Za-z0-9_]*$', maxLength: 256 }), Type.String({ maxLength: 32768 }))),
    cwd: Type.Optional(Type.String({ minLength: 1, maxLength: 4096, pattern: '^/' })),
    user: Type.Optional(Type.String({ minLength: 1, maxLength: 64, description: 'User name or numeric uid (default: the image USER)' })),
    stdin: Type.Optional(Type.String({ maxLength: MAX_STDIN_BASE64, description: 'Base64, at most 1 MiB; stdin is closed after it' })),
    timeoutSeconds: Type.Optional(Type.Integer({ minimum: 1, maximum: 86400, description: 'SIGKILL after this long (timedOut: true)' })),
    background: Type.Optional(Type.Boolean({ description: 'true: 201 {pid} at once; the process keeps running' })),
  },
  { additionalProperties: false },
);

const Signal = Type.Object({ signal: Type.String({ pattern: '^(SIG)?[A-Z0-9]{1,10}$' }) }, { additionalProperties: false });
const Resize = Type.Object({ cols: Type.Integer({ minimum: 1, maximum: 1000 }), rows: Type.Integer({ minimum: 1, maximum: 1000 }) }, { additionalProperties: false });
const ProcessSchema = Type.Object({ pid: Type.Integer(), command: Type.Array(Type.String()), tty: Type.Boolean(), startedAt: Type.String() });
const NdjsonResponse = {
  description:
    'application/x-ndjson, one event per line: {"type":"start","pid"}, {"type":"stdout"|"stderr","data":base64}, and last {"type":"exit","exitCode","signal","timedOut","reason"?} or {"type":"error","error":{code,message}}',
  content: { 'application/x-ndjson': { schema: { type: 'string' } } },
};

const commands = new WeakMap<object, unknown>();

/** The command as the client sent it (a string or a list of strings), else the validated one. */
function exactCommand(raw: unknown, validated: string | string[]): string | string[] {
  if (typeof raw === 'string') return raw;
  if (Array.isArray(raw) && raw.every((a) => typeof a === 'string')) return [...raw];
  return validated;
}

function eventLine(event: ExecEvent): string {
  if (event.type === 'stdout' || event.type === 'stderr') return JSON.stringify({ type: event.type, data: event.data.toString('base64') }) + '\n';
  return JSON.stringify(event) + '\n';
}

/** Streams a session's events as ndjson lines; pulled by the response, so back-pressured. */
function ndjson(pid: number, events: AsyncIterable<ExecEvent>, close: () => void): Readable {
  async function* lines(): AsyncGenerator<string> {
    try {
      yield JSON.stringify({ type: 'start', pid }) + '\n';
      for await (const event of events) yield eventLine(event);
    } finally {
      close();
    }
  }
  return Readable.from(lines(), { objectMode: false });
}

/** Registers exec and files routes in a scope of their own (their raw-body parser stays theirs). */
export async function execApiRoutes(parent: FastifyInstance, context: ApiContext, exec: () => ExecService): Promise<void> {
  await parent.register(async (app) => {
    // Raw bodies (stdin, uploads) as streams: never read whole into memory.
    app.addContentTypeParser('application/octet-stream', (_request, payload, done) => done(null, payload));
    execRoutes(app, context, exec);
    fileRoutes(app, exec);
  });
}

function execRoutes(app: FastifyInstance, context: ApiContext, exec: () => ExecService): void {
  const { db } = context;

  app.post<{ Params: Static<typeof IdParams>; Body: Static<typeof ExecBody> }>(
    '/microvms/:id/exec',
    {
      schema: {
        summary: 'Run a command in the microVM (wakes a SUSPENDED one); streams ndjson events, or 201 {pid} with background',
        tags: ['exec'],
        params: IdParams,
        body: ExecBody,
        response: { 200: NdjsonResponse, 201: Type.Object({ pid: Type.Integer() }), 409: ErrorSchema, 429: ErrorSchema, 503: ErrorSchema },
      },
      // The validator coerces ["x"] to "x" and back (coerceTypes "array"), which would turn a
      // one-word argv into a shell string: keep the command as sent.
      preValidation: async (request) => {
        const raw = (request.body as { command?: unknown } | undefined)?.command;
        commands.set(request, raw);
      },
    },
    async (request, reply) => {
      const body = request.body;
      const command = exactCommand(commands.get(request), body.command);
      const stdin = body.stdin === undefined ? undefined : Buffer.from(body.stdin, 'base64');
      if (stdin && stdin.length > 1024 * 1024) throw new CocoonError('payload_too_large', 'stdin is limited to 1 MiB; use the WebSocket for more', { status: 413 });
      const execRequest: ExecRequest = { command };
      if (body.env) execRequest.env = body.env;
      if (body.cwd) execRequest.cwd = body.cwd;
      if (body.user) execRequest.user = body.user;
      if (body.timeoutSeconds) execRequest.timeoutSeconds = body.timeoutSeconds;
      if (body.background) {
        const started = await exec().start(request.tenant.id, request.params.id, execRequest);
        return reply.status(201).send(started);
      }
      execRequest.stdin = stdin !== undefined;
      const session = await exec().exec(request.tenant.id, request.params.id, execRequest);
      if (stdin !== undefined) {
        void session.write(stdin).then(() => session.closeStdin(), () => undefined);
      }
      const stream = ndjson(session.pid, session.events(), () => session.close());
      reply.raw.once('close', () => session.close());
      return reply.status(200).header('content-type', 'application/x-ndjson').header('cache-control', 'no-store').send(stream);
    },
  );

  app.get<{ Params: Static<typeof IdParams> }>(
    '/microvms/:id/exec/ws',
    {
      schema: {
        summary:
          'Interactive exec over a WebSocket (stdin, PTY): upgrade this URL; first message {"type":"start","command"?,"tty"?,"cols"?,"rows"?,"env"?,"cwd"?,"user"?,"apiKey"?}. See docs/exec.md',
        tags: ['exec'],
        params: IdParams,
        response: { 101: { description: 'Switching Protocols: the WebSocket of the exec session' }, 426: ErrorSchema },
      },
    },
    async (_request, reply) => reply.status(426).send(errorBody('upgrade_required', 'open this URL as a WebSocket')),
  );

  app.get<{ Params: Static<typeof IdParams> }>(
    '/microvms/:id/processes',
    {
      schema: {
        summary: 'Processes started through exec that are still running',
        tags: ['exec'],
        params: IdParams,
        response: { 200: Type.Object({ items: Type.Array(ProcessSchema) }) },
      },
    },
    async (request) => ({ items: await exec().listProcesses(request.tenant.id, request.params.id) }),
  );

  app.get<{ Params: Static<typeof PidParams> }>(
    '/microvms/:id/processes/:pid/output',
    {
      schema: {
        summary: "Attach to a running process's output from now on (ndjson, as exec; ends with its exit)",
        tags: ['exec'],
        params: PidParams,
        response: { 200: NdjsonResponse, 409: ErrorSchema, 429: ErrorSchema },
      },
    },
    async (request, reply) => {
      const session = await exec().attach(request.tenant.id, request.params.id, request.params.pid);
      const stream = ndjson(session.pid, session.events(), () => session.close());
      reply.raw.once('close', () => session.close());
      return reply.status(200).header('content-type', 'application/x-ndjson').header('cache-control', 'no-store').send(stream);
    },
  );

  app.post<{ Params: Static<typeof PidParams>; Querystring: { eof?: string } }>(
    '/microvms/:id/processes/:pid/stdin',
    {
      bodyLimit: MAX_STDIN_BODY,
      schema: {
        summary: "Write raw bytes (application/octet-stream) to a process's stdin; eof=1 closes it after them",
        tags: ['exec'],
        params: PidParams,
        querystring: Type.Object({ eof: Type.Optional(Type.Union([Type.Literal('1'), Type.Literal('0'), Type.Literal('true'), Type.Literal('false')])) }),
        body: { content: { 'application/octet-stream': { schema: { type: 'string', format: 'binary' } } } },
        response: { 204: Type.Null(), 409: ErrorSchema },
      },
      // The body is a stream: checked by hand below.
      validatorCompiler: () => () => true,
    },
    async (request, reply) => {
      const pid = Number(request.params.pid);
      if (!Number.isInteger(pid) || pid < 1 || pid > 4194304) throw new CocoonError('invalid_request', 'pid is a process id', { status: 400 });
      const body = request.body as Readable | Buffer | string | undefined;
      const data = body === undefined ? Buffer.alloc(0) : typeof body === 'string' ? Buffer.from(body) : body;
      const eof = request.query.eof === '1' || request.query.eof === 'true';
      await exec().writeStdin(request.tenant.id, request.params.id, pid, data, { eof });
      return reply.status(204).send();
    },
  );

  app.post<{ Params: Static<typeof PidParams>; Body: Static<typeof Signal> }>(
    '/microvms/:id/processes/:pid/signal',
    { schema: { summary: 'Send a signal to a process (its process group)', tags: ['exec'], params: PidParams, body: Signal, response: { 204: Type.Null() } } },
    async (request, reply) => {
      await exec().signal(request.tenant.id, request.params.id, request.params.pid, request.body.signal);
      return reply.status(204).send();
    },
  );

  app.post<{ Params: Static<typeof PidParams>; Body: Static<typeof Resize> }>(
    '/microvms/:id/processes/:pid/resize',
    { schema: { summary: "Resize a PTY process's terminal", tags: ['exec'], params: PidParams, body: Resize, response: { 204: Type.Null() } } },
    async (request, reply) => {
      await exec().resize(request.tenant.id, request.params.id, request.params.pid, request.body.cols, request.body.rows);
      return reply.status(204).send();
    },
  );

  // ---- the WebSocket: upgrades are not routed by Fastify, so the HTTP server's event is used.
  const wss = new WebSocketServer({ noServer: true, maxPayload: MAX_WS_MESSAGE });
  const pattern = new RegExp(`^${API_PREFIX}/microvms/([^/?]{1,300})/exec/ws(?:\\?.*)?$`);
  app.server.on('upgrade', (req: IncomingMessage, socket: Duplex, head: Buffer) => {
    const forwarding = context.forwarding;
    if (!forwarding) {
      serveUpgrade(req, socket, head);
      return;
    }
    // In a cluster, a microVM another host runs is served by that host's API.
    forwarding.upgrade(req, socket, head).then(
      (taken: boolean) => {
        if (!taken) serveUpgrade(req, socket, head);
      },
      () => socket.destroy(),
    );
  });
  const serveUpgrade = (req: IncomingMessage, socket: Duplex, head: Buffer): void => {
    const match = pattern.exec(req.url ?? '');
    if (!match) {
      socket.end('HTTP/1.1 404 Not Found\r\nConnection: close\r\nContent-Length: 0\r\n\r\n');
      return;
    }
    const microvmId = decodeURIComponent(match[1]!);
    const header = req.headers.authorization;
    const headerKey = typeof header === 'string' ? /^Bearer ([\x21-\x7e]{1,200})$/.exec(header)?.[1] : undefined;
    wss.handleUpgrade(req, socket, head, (ws) => {
      serveExecWebSocket(ws, {
        forceTty: false,
        open: async (start) => {
          const key = headerKey ?? start.apiKey;
          const found = key ? await authenticateApiKey(db, key) : undefined;
          if (!found) throw new CocoonError('unauthenticated', 'send your API key as `Authorization: Bearer <key>` or in the start message as apiKey', { status: 401 });
          const { apiKey: _ignored, ...execRequest } = start;
          return exec().exec(found.tenant.id, microvmId, { ...execRequest, command: defaultCommand(start) });
        },
      });
    });
  };
  app.addHook('onClose', async () => {
    for (const client of wss.clients) client.terminate();
    wss.close();
  });
}
