import type { FastifyInstance } from 'fastify';
import { Type } from 'typebox';
import type { ApiContext } from '../app.ts';

export const SERVER_VERSION = '0.1.0';

const InfoSchema = Type.Object(
  {
    version: Type.String(),
    region: Type.String({ description: 'The region field of ARNs' }),
    gateway: Type.Object({
      domain: Type.String({ description: 'A microVM is reached at <microvm id>.<domain>' }),
      port: Type.Union([Type.Integer(), Type.Null()], { description: "The gateway's port (null: no gateway runs)" }),
    }),
  },
  { $id: 'ServerInfo', description: 'Public facts about this server' },
);

/** `GET /info`: what a client (the dashboard) needs before it has a key: where the gateway is. */
export function infoRoutes(app: FastifyInstance, context: ApiContext): void {
  app.get(
    '/info',
    {
      config: { public: true },
      schema: { summary: 'Public facts about this server: version, region, where the gateway listens', security: [], response: { 200: InfoSchema } },
    },
    async () => ({
      version: SERVER_VERSION,
      region: context.config.region,
      gateway: { domain: context.config.gatewayDomain, port: context.gatewayPort?.() ?? null },
    }),
  );
}
