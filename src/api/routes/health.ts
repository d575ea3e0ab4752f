import type { FastifyInstance } from 'fastify';
import { Type } from 'typebox';
import type { ApiContext } from '../app.ts';

export function healthRoutes(app: FastifyInstance, context: ApiContext): void {
  app.get(
    '/health',
    {
      config: { public: true },
      schema: {
        summary: 'Whether the server accepts work',
        security: [],
        response: { 200: Type.Object({ status: Type.Literal('ok') }), 503: Type.Object({ status: Type.Literal('starting') }) },
      },
    },
    async (_request, reply) => {
      if (!context.ready()) return reply.status(503).send({ status: 'starting' as const });
      return { status: 'ok' as const };
    },
  );
}
