/**
 * AWS's rest-json error shape, which both clients read: the status, the `x-amzn-ErrorType`
 * header (the JS client takes the code from it first: @smithy/core loadRestJsonErrorCode order
 * header, code, __type; botocore lets the header override the body), and a body
 * `{"__type": code, "message": …}`. The code picks the exception class: one of the model's
 * (ValidationException, ResourceNotFoundException, …) or, for authentication, the ones every AWS
 * service shares (InvalidSignatureException, UnrecognizedClientException), which the clients raise
 * as a generic service exception carrying that name.
 *
 * Every answer of the AWS surface uses this shape, whatever caused it: Cocoon's own errors are
 * mapped by status, and their stable Cocoon code is kept at the start of the message.
 */
import type { FastifyError, FastifyReply, FastifyRequest } from 'fastify';
import { CocoonError } from '../../common/errors.ts';

export type AwsErrorCode =
  | 'ValidationException'
  | 'AccessDeniedException'
  | 'ResourceNotFoundException'
  | 'ConflictException'
  | 'ServiceQuotaExceededException'
  | 'ThrottlingException'
  | 'InternalServerException'
  | 'InvalidSignatureException'
  | 'UnrecognizedClientException'
  | 'MissingAuthenticationTokenException'
  | 'IncompleteSignatureException'
  | 'RequestEntityTooLargeException'
  | 'UnknownOperationException';

const STATUS: Record<AwsErrorCode, number> = {
  ValidationException: 400,
  AccessDeniedException: 403,
  ResourceNotFoundException: 404,
  ConflictException: 409,
  ServiceQuotaExceededException: 402,
  ThrottlingException: 429,
  InternalServerException: 500,
  InvalidSignatureException: 403,
  UnrecognizedClientException: 403,
  MissingAuthenticationTokenException: 403,
  IncompleteSignatureException: 400,
  RequestEntityTooLargeException: 413,
  UnknownOperationException: 404,
};

export interface AwsErrorExtra {
  /** ThrottlingException, InternalServerException: seconds, sent as `Retry-After`. */
  retryAfterSeconds?: number;
  resourceType?: string;
  resourceId?: string;
}

export class AwsError extends Error {
  readonly code: AwsErrorCode;
  readonly status: number;
  readonly extra: AwsErrorExtra;

  constructor(code: AwsErrorCode, message: string, extra: AwsErrorExtra = {}) {
    super(message);
    this.name = 'AwsError';
    this.code = code;
    this.status = STATUS[code];
    this.extra = extra;
  }
}

export const validation = (message: string): AwsError => new AwsError('ValidationException', message);
export const notFound = (resourceType: string, id: string, message?: string): AwsError =>
  new AwsError('ResourceNotFoundException', message ?? `${resourceType} '${id}' does not exist`, { resourceType, resourceId: id });
export const conflict = (message: string, resourceType?: string, resourceId?: string): AwsError =>
  new AwsError('ConflictException', message, { ...(resourceType ? { resourceType } : {}), ...(resourceId ? { resourceId } : {}) });

/** The AWS error for a Cocoon error, by its HTTP status; Cocoon's code stays in the message. */
export function fromCocoonError(error: CocoonError): AwsError {
  const message = `${error.code}: ${error.message}`;
  switch (error.status) {
    case 400:
    case 413:
      return new AwsError('ValidationException', message);
    case 401:
      return new AwsError('UnrecognizedClientException', message);
    case 403:
      return new AwsError('AccessDeniedException', message);
    case 404:
    case 410:
      return new AwsError('ResourceNotFoundException', message);
    case 409:
      return new AwsError('ConflictException', message);
    case 402:
    case 507:
      return new AwsError('ServiceQuotaExceededException', message);
    case 429:
      return new AwsError('ThrottlingException', message, { retryAfterSeconds: 5 });
    case 503:
      return new AwsError('InternalServerException', message, { retryAfterSeconds: 2 });
    default:
      return new AwsError(error.status < 500 ? 'ValidationException' : 'InternalServerException', message);
  }
}

export function sendAwsError(reply: FastifyReply, error: AwsError): void {
  if (error.extra.retryAfterSeconds !== undefined) void reply.header('Retry-After', String(error.extra.retryAfterSeconds));
  const body: Record<string, unknown> = { __type: error.code, message: error.message };
  if (error.extra.resourceType !== undefined) body.resourceType = error.extra.resourceType;
  if (error.extra.resourceId !== undefined) body.resourceId = error.extra.resourceId;
  void reply.status(error.status).header('x-amzn-ErrorType', error.code).type('application/json').send(body);
}

export function awsErrorHandler(error: FastifyError | Error, request: FastifyRequest, reply: FastifyReply): void {
  if (error instanceof AwsError) {
    sendAwsError(reply, error);
    return;
  }
  if (error instanceof CocoonError) {
    if (error.status >= 500) request.log.error({ err: error }, error.message);
    sendAwsError(reply, fromCocoonError(error));
    return;
  }
  const fastifyError = error as FastifyError;
  if (fastifyError.code === 'FST_ERR_CTP_BODY_TOO_LARGE') {
    sendAwsError(reply, new AwsError('RequestEntityTooLargeException', 'the request body is too large'));
    return;
  }
  const status = fastifyError.validation ? 400 : (fastifyError.statusCode ?? 500);
  if (status >= 500) {
    request.log.error({ err: error }, 'unhandled error in the AWS surface');
    sendAwsError(reply, new AwsError('InternalServerException', 'internal error; see the server log'));
    return;
  }
  sendAwsError(reply, new AwsError('ValidationException', fastifyError.message));
}
