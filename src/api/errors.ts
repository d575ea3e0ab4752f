/**
 * One error shape for the whole API: `{"error": {"code", "message"}}` with the right status.
 * CocoonErrors carry their own code and status; schema validation failures become 400
 * `invalid_request`; anything else is a 500 whose details stay in the server log.
 */
import type { FastifyError, FastifyReply, FastifyRequest } from 'fastify';
import { CocoonError, type ErrorCode } from '../common/errors.ts';

export interface ErrorBody {
  error: { code: ErrorCode; message: string };
}

export function errorBody(code: ErrorCode, message: string): ErrorBody {
  return { error: { code, message } };
}

export function handleError(error: FastifyError | Error, request: FastifyRequest, reply: FastifyReply): void {
  if (error instanceof CocoonError) {
    if (error.status >= 500) request.log.error({ err: error }, error.message);
    void reply.status(error.status).send(errorBody(error.code, error.message));
    return;
  }
  const fastifyError = error as FastifyError;
  if (fastifyError.validation) {
    const context = fastifyError.validationContext ?? 'request';
    let message = fastifyError.message.startsWith(`${context} `) || fastifyError.message.startsWith(`${context}/`)
      ? fastifyError.message
      : `${context} ${fastifyError.message}`;
    if (context === 'body' && request.body === undefined) message = 'send a JSON object as the body (at least {}) with content-type application/json';
    void reply.status(400).send(errorBody('invalid_request', message));
    return;
  }
  const status = fastifyError.statusCode ?? 500;
  if (status >= 400 && status < 500) {
    const code: ErrorCode = fastifyError.code === 'FST_ERR_CTP_BODY_TOO_LARGE' ? 'payload_too_large'
      : fastifyError.code === 'FST_ERR_MAX_PARAM_LENGTH' ? 'uri_too_long'
      : fastifyError.code === 'FST_ERR_CTP_INVALID_MEDIA_TYPE' ? 'unsupported_media_type'
      : 'invalid_request';
    void reply.status(status).send(errorBody(code, fastifyError.message));
    return;
  }
  request.log.error({ err: error }, 'unhandled error');
  void reply.status(500).send(errorBody('internal', 'internal error; see the server log'));
}

/**
 * The raw answer to a request that is not valid HTTP (or too large, or too slow to arrive):
 * written on the socket before Fastify sees a request, in the one error shape.
 */
export function clientErrorResponse(error: Error): string {
  const code = (error as NodeJS.ErrnoException).code;
  const [status, reason, errorCode, message]: [number, string, ErrorCode, string] =
    code === 'HPE_HEADER_OVERFLOW' ? [431, 'Request Header Fields Too Large', 'headers_too_large', 'the request head is larger than the server accepts']
    : code === 'ERR_HTTP_REQUEST_TIMEOUT' ? [408, 'Request Timeout', 'request_timeout', 'the request did not arrive in time']
    : [400, 'Bad Request', 'invalid_request', 'the request is not valid HTTP/1.1'];
  const body = JSON.stringify(errorBody(errorCode, message));
  return `HTTP/1.1 ${status} ${reason}\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`;
}
