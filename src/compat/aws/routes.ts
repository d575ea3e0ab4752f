/**
 * The AWS Lambda MicroVMs API (2025-09-09) at the root of the API port: the model's routes
 * (`/2025-09-09/…`, `/2017-03-31/tags/…`), each request SigV4-verified against the raw bytes it
 * arrived with, every answer (errors included) in rest-json's shape. Hidden from Cocoon's own
 * OpenAPI document; Cocoon's Bearer auth does not apply (`public`), SigV4 does.
 */
import { randomUUID } from 'node:crypto';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import type { SecretSealer } from '../../store/sealed-secrets.ts';
import type { Tenant } from '../../store/tenants.ts';
import { apiKeySecrets } from './auth.ts';
import type { AwsServices, OperationRoute } from './context.ts';
import { AwsError, awsErrorHandler, sendAwsError } from './errors.ts';
import { OPERATIONS } from './operations.ts';
import { parseQuery, verifySigV4 } from './sigv4.ts';
import { jsonBody } from './validate.ts';

/** The largest request body (CreateMicrovmImage with 50 environment variables of 4 KiB is ~210 KiB). */
export const MAX_BODY_BYTES = 512 * 1024;
export const AWS_PREFIXES = ['/2025-09-09', '/2017-03-31'] as const;

export function awsRoutes(app: FastifyInstance, services: AwsServices, sealer: () => SecretSealer, operations: readonly OperationRoute[] = OPERATIONS): void {
  const secrets = apiKeySecrets(services.db, sealer);
  for (const prefix of AWS_PREFIXES) {
    void app.register(
      async (aws) => {
        aws.setErrorHandler(awsErrorHandler);
        // Anything else under the prefix, before Cocoon's Bearer check (a route marked public).
        const unknown = (request: FastifyRequest, reply: FastifyReply) => {
          sendAwsError(reply, new AwsError('UnknownOperationException', `no Lambda MicroVMs operation at ${request.method} ${request.url.split('?')[0]}`));
        };
        aws.setNotFoundHandler(unknown);
        aws.route({ method: ['GET', 'POST', 'PUT', 'PATCH', 'DELETE', 'OPTIONS'], url: '/*', config: { public: true }, schema: { hide: true }, handler: unknown });
        // The signature covers the body's bytes: keep them raw, whatever the content type.
        aws.removeAllContentTypeParsers();
        aws.addContentTypeParser('*', { parseAs: 'buffer', bodyLimit: MAX_BODY_BYTES }, (_request, body, done) => done(null, body));
        aws.addHook('onRequest', async (request, reply) => {
          void reply.header('x-amzn-RequestId', randomUUID());
        });
        for (const operation of operations.filter((o) => o.path.startsWith(`${prefix}/`) || o.path === prefix)) {
          aws.route({
            method: operation.method,
            url: operation.path.slice(prefix.length) || '/',
            config: { public: true },
            schema: { hide: true },
            bodyLimit: MAX_BODY_BYTES,
            handler: async (request, reply) => {
              const raw = Buffer.isBuffer(request.body) ? request.body : Buffer.alloc(0);
              const url = request.raw.url ?? '/';
              const q = url.indexOf('?');
              const { principal: tenant } = await verifySigV4<Tenant>(
                {
                  method: request.method,
                  rawPath: q < 0 ? url : url.slice(0, q),
                  rawQuery: q < 0 ? '' : url.slice(q + 1),
                  headers: request.headers,
                  body: raw,
                },
                secrets,
              );
              const answer = await operation.handler(services, {
                tenant,
                params: request.params as Record<string, string>,
                query: parseQuery(q < 0 ? '' : url.slice(q + 1)),
                body: jsonBody(raw),
              });
              const status = answer.status ?? 200;
              if (answer.body === undefined) return reply.status(status).send();
              return reply.status(status).type('application/json').send(answer.body);
            },
          });
        }
      },
      { prefix },
    );
  }
}
