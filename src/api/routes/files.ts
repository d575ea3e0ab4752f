/**
 * Files inside a microVM (docs/exec.md, "Files"): streamed upload and download (bounded by the
 * guest's disk: 507 no_space), stat, list, mkdir, remove, rename, chmod. Paths are absolute
 * guest paths; the guest agent does the work (src/exec/).
 */
import { Readable } from 'node:stream';
import type { FastifyInstance } from 'fastify';
import { Type, type Static } from 'typebox';
import type { ExecService } from '../../exec/types.ts';
import { ErrorSchema } from '../schemas.ts';

const IdParams = Type.Object({ id: Type.String({ minLength: 1, maxLength: 300 }) });
const GuestPath = Type.String({ minLength: 1, maxLength: 4096, pattern: '^/', description: 'Absolute guest path' });
const Mode = Type.String({ pattern: '^0?[0-7]{3,4}$', description: 'Octal permission bits, e.g. 0644' });
const PathQuery = Type.Object({ path: GuestPath });
const binary = { schema: { type: 'string', format: 'binary' } };

export const StatSchema = Type.Object({
  path: Type.String(),
  name: Type.String(),
  type: Type.Union([Type.Literal('file'), Type.Literal('directory'), Type.Literal('symlink'), Type.Literal('other')]),
  size: Type.Integer(),
  mode: Type.String(),
  uid: Type.Integer(),
  gid: Type.Integer(),
  mtime: Type.String(),
  linkTarget: Type.Optional(Type.String()),
});

/** Uploads are bounded by the guest's disk, not by the API: this only stops absurd declared sizes. */
const MAX_UPLOAD = 64 * 1024 * 1024 * 1024;

export function fileRoutes(app: FastifyInstance, exec: () => ExecService): void {
  app.put<{ Params: Static<typeof IdParams>; Querystring: { path: string; mode?: string } }>(
    '/microvms/:id/files',
    {
      bodyLimit: MAX_UPLOAD,
      schema: {
        summary: 'Upload a file (raw body, streamed; replaced atomically once complete; parent directories must exist)',
        tags: ['files'],
        params: IdParams,
        querystring: Type.Object({ path: GuestPath, mode: Type.Optional(Mode) }),
        body: { content: { 'application/octet-stream': binary } },
        response: { 201: StatSchema, 409: ErrorSchema, 507: ErrorSchema },
      },
      // The body is a stream (nothing for a JSON validator); path and mode are checked by the service.
      validatorCompiler: () => () => true,
    },
    async (request, reply) => {
      const body = (request.body ?? Buffer.alloc(0)) as Readable | Buffer;
      const options = request.query.mode ? { mode: request.query.mode } : {};
      const stat = await exec().writeFile(request.tenant.id, request.params.id, request.query.path, body, options);
      return reply.status(201).send(stat);
    },
  );

  app.get<{ Params: Static<typeof IdParams>; Querystring: Static<typeof PathQuery> }>(
    '/microvms/:id/files',
    {
      schema: {
        summary: 'Download a file (raw bytes, streamed)',
        tags: ['files'],
        params: IdParams,
        querystring: PathQuery,
        response: { 200: { description: 'The file', content: { 'application/octet-stream': binary } } },
      },
    },
    async (request, reply) => {
      const { stat, body } = await exec().readFile(request.tenant.id, request.params.id, request.query.path);
      reply.raw.once('close', () => body.destroy());
      void reply.header('content-type', 'application/octet-stream');
      if (stat.type === 'file') void reply.header('content-length', String(stat.size));
      return reply.status(200).send(body);
    },
  );

  app.get<{ Params: Static<typeof IdParams>; Querystring: Static<typeof PathQuery> }>(
    '/microvms/:id/files/stat',
    { schema: { summary: 'Stat a path (symlinks not followed)', tags: ['files'], params: IdParams, querystring: PathQuery, response: { 200: StatSchema } } },
    async (request) => exec().stat(request.tenant.id, request.params.id, request.query.path),
  );

  app.get<{ Params: Static<typeof IdParams>; Querystring: Static<typeof PathQuery> }>(
    '/microvms/:id/files/list',
    {
      schema: {
        summary: 'List a directory (at most 10,000 entries)',
        tags: ['files'],
        params: IdParams,
        querystring: PathQuery,
        response: { 200: Type.Object({ items: Type.Array(StatSchema) }), 413: ErrorSchema },
      },
    },
    async (request) => ({ items: await exec().list(request.tenant.id, request.params.id, request.query.path) }),
  );

  app.get<{ Params: Static<typeof IdParams>; Querystring: Static<typeof PathQuery> }>(
    '/microvms/:id/files/watch',
    {
      schema: {
        summary: 'Watch a directory (not recursive): ndjson events {"type":"create"|"write"|"remove"|"rename_from"|"rename_to"|"chmod"|"gone","name","isDir"} until the client leaves',
        tags: ['files'],
        params: IdParams,
        querystring: PathQuery,
        response: { 200: { description: 'application/x-ndjson', content: { 'application/x-ndjson': { schema: { type: 'string' } } } }, 429: ErrorSchema },
      },
    },
    async (request, reply) => {
      const watch = await exec().watchDir(request.tenant.id, request.params.id, request.query.path);
      async function* lines(): AsyncGenerator<string> {
        yield JSON.stringify({ type: 'watching', path: request.query.path }) + '\n';
        for await (const event of watch.events()) yield JSON.stringify(event) + '\n';
      }
      reply.raw.once('close', () => watch.close());
      return reply.status(200).header('content-type', 'application/x-ndjson').header('cache-control', 'no-store').send(Readable.from(lines()));
    },
  );

  const Mkdir = Type.Object({ path: GuestPath, mode: Type.Optional(Mode), parents: Type.Optional(Type.Boolean()) }, { additionalProperties: false });
  app.post<{ Params: Static<typeof IdParams>; Body: Static<typeof Mkdir> }>(
    '/microvms/:id/files/mkdir',
    { schema: { summary: 'Make a directory', tags: ['files'], params: IdParams, body: Mkdir, response: { 201: StatSchema, 409: ErrorSchema } } },
    async (request, reply) => {
      const { path, ...options } = request.body;
      return reply.status(201).send(await exec().mkdir(request.tenant.id, request.params.id, path, options));
    },
  );

  const Remove = Type.Object({ path: GuestPath, recursive: Type.Optional(Type.Boolean()) }, { additionalProperties: false });
  app.post<{ Params: Static<typeof IdParams>; Body: Static<typeof Remove> }>(
    '/microvms/:id/files/remove',
    { schema: { summary: 'Remove a file or directory (recursive for a non-empty directory)', tags: ['files'], params: IdParams, body: Remove, response: { 204: Type.Null(), 409: ErrorSchema } } },
    async (request, reply) => {
      await exec().remove(request.tenant.id, request.params.id, request.body.path, { recursive: request.body.recursive ?? false });
      return reply.status(204).send();
    },
  );

  const Rename = Type.Object({ from: GuestPath, to: GuestPath }, { additionalProperties: false });
  app.post<{ Params: Static<typeof IdParams>; Body: Static<typeof Rename> }>(
    '/microvms/:id/files/rename',
    { schema: { summary: 'Rename (move) a path', tags: ['files'], params: IdParams, body: Rename, response: { 200: StatSchema } } },
    async (request) => exec().rename(request.tenant.id, request.params.id, request.body.from, request.body.to),
  );

  const Chmod = Type.Object(
    { path: GuestPath, mode: Type.Optional(Mode), uid: Type.Optional(Type.Integer({ minimum: 0, maximum: 4294967294 })), gid: Type.Optional(Type.Integer({ minimum: 0, maximum: 4294967294 })) },
    { additionalProperties: false },
  );
  app.post<{ Params: Static<typeof IdParams>; Body: Static<typeof Chmod> }>(
    '/microvms/:id/files/chmod',
    { schema: { summary: 'Change mode and/or owner', tags: ['files'], params: IdParams, body: Chmod, response: { 200: StatSchema } } },
    async (request) => {
      const { path, ...options } = request.body;
      return exec().chmod(request.tenant.id, request.params.id, path, options);
    },
  );
}
