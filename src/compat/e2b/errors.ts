/**
 * E2B's error body: `{"code": <HTTP status as an integer>, "message"}`. The SDK reads the
 * integer (404 → SandboxNotFoundError, 409 on pause → "already paused", 401 → AuthenticationError),
 * so every answer of the E2B surface uses this shape, whatever Cocoon error caused it.
 */
import type { FastifyError, FastifyReply, FastifyRequest } from 'fastify';
import { CocoonError } from '../../common/errors.ts';

export class E2bError extends Error {
  readonly status: number;
  constructor(status: number, message: string) {
    super(message);
    this.status = status;
  }
}

export function e2bBody(status: number, message: string): { code: number; message: string } {
  return { code: status, message };
}

export function e2bErrorHandler(error: FastifyError | Error, request: FastifyRequest, reply: FastifyReply): void {
  if (error instanceof E2bError) {
    void reply.status(error.status).send(e2bBody(error.status, error.message));
    return;
  }
  if (error instanceof CocoonError) {
    if (error.status >= 500) request.log.error({ err: error }, error.message);
    void reply.status(error.status).send(e2bBody(error.status, `${error.code}: ${error.message}`));
    return;
  }
  const fastifyError = error as FastifyError;
  const status = fastifyError.validation ? 400 : (fastifyError.statusCode ?? 500);
  if (status >= 500) {
    request.log.error({ err: error }, 'unhandled error in the E2B surface');
    void reply.status(500).send(e2bBody(500, 'internal error; see the server log'));
    return;
  }
  void reply.status(status).send(e2bBody(status, fastifyError.message));
}
