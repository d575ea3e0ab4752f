/**
 * Every error the SDK throws is a `CocoonError`. Answers of the API with a 4xx/5xx status are
 * `CocoonApiError`s carrying the server's stable `code`, the HTTP `status` and a `kind` to
 * switch on; the subclasses (`NotFoundError`, `AuthenticationError`…) allow `instanceof`.
 *
 *   try { await cocoon.images.get(id) }
 *   catch (e) { if (e instanceof NotFoundError) … else if (isCocoonApiError(e, 'conflict')) … }
 */

/** What kind of failure an API error is, whatever its specific `code`. */
export type ApiErrorKind =
  | 'invalid_request' // 400, 413, 415, 422: fix the request
  | 'unauthenticated' // 401: the API key is missing, unknown or revoked
  | 'forbidden' // 403: the key may not do this
  | 'not_found' // 404: no such resource for this tenant
  | 'gone' // 410
  | 'conflict' // 409: wrong state (e.g. an image still in use)
  | 'rate_limited' // 429
  | 'unavailable' // 502, 503, 504: try again later
  | 'server' // other 5xx
  | 'other';

export function errorKind(status: number): ApiErrorKind {
  if (status === 400 || status === 413 || status === 415 || status === 422) return 'invalid_request';
  if (status === 401) return 'unauthenticated';
  if (status === 403) return 'forbidden';
  if (status === 404) return 'not_found';
  if (status === 409) return 'conflict';
  if (status === 410) return 'gone';
  if (status === 429) return 'rate_limited';
  if (status === 502 || status === 503 || status === 504) return 'unavailable';
  if (status >= 500) return 'server';
  return 'other';
}

/** The base of every error the SDK throws. */
export class CocoonError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'CocoonError';
  }
}

/** A call's arguments are wrong (a path that is no bundle, a bad URL…): nothing was sent. */
export class InvalidArgumentError extends CocoonError {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'InvalidArgumentError';
  }
}

/** The API answered with an error: `{"error": {"code", "message"}}` and a 4xx/5xx status. */
export class CocoonApiError extends CocoonError {
  /** The server's stable code, e.g. `image_not_found`, `invalid_request`, `image_in_use`. */
  readonly code: string;
  /** The HTTP status. */
  readonly status: number;
  readonly kind: ApiErrorKind;
  /** `METHOD /path` of the request that failed. */
  readonly request: string;

  constructor(init: { code: string; message: string; status: number; request: string }) {
    super(init.message);
    this.name = 'CocoonApiError';
    this.code = init.code;
    this.status = init.status;
    this.kind = errorKind(init.status);
    this.request = init.request;
  }
}

export class InvalidRequestError extends CocoonApiError {
  override name = 'InvalidRequestError';
}
export class AuthenticationError extends CocoonApiError {
  override name = 'AuthenticationError';
}
export class PermissionError extends CocoonApiError {
  override name = 'PermissionError';
}
export class NotFoundError extends CocoonApiError {
  override name = 'NotFoundError';
}
export class ConflictError extends CocoonApiError {
  override name = 'ConflictError';
}
export class GoneError extends CocoonApiError {
  override name = 'GoneError';
}
export class RateLimitError extends CocoonApiError {
  override name = 'RateLimitError';
}
export class UnavailableError extends CocoonApiError {
  override name = 'UnavailableError';
}
export class ServerError extends CocoonApiError {
  override name = 'ServerError';
}

const CLASSES: Record<ApiErrorKind, typeof CocoonApiError> = {
  invalid_request: InvalidRequestError,
  unauthenticated: AuthenticationError,
  forbidden: PermissionError,
  not_found: NotFoundError,
  conflict: ConflictError,
  gone: GoneError,
  rate_limited: RateLimitError,
  unavailable: UnavailableError,
  server: ServerError,
  other: CocoonApiError,
};

/** The right subclass for an error answer. */
export function apiError(init: { code: string; message: string; status: number; request: string }): CocoonApiError {
  return new CLASSES[errorKind(init.status)](init);
}

/** The server could not be reached (refused, DNS, reset) — nothing was answered. */
export class CocoonConnectionError extends CocoonError {
  readonly url: string;
  constructor(url: string, cause: unknown) {
    const reason = describeCause(cause);
    super(`cannot reach the Cocoon API at ${url}${reason ? ` (${reason})` : ''}: is the server running and the URL right?`, { cause });
    this.name = 'CocoonConnectionError';
    this.url = url;
  }
}

/** A request, or a wait for a state, took longer than its timeout. */
export class CocoonTimeoutError extends CocoonError {
  readonly timeoutMs: number;
  constructor(what: string, timeoutMs: number) {
    super(`${what} did not finish within ${timeoutMs} ms`);
    this.name = 'CocoonTimeoutError';
    this.timeoutMs = timeoutMs;
  }
}

/** An image that was awaited ended FAILED. `image` is its last state, with `error`. */
export class ImageBuildFailedError extends CocoonError {
  readonly image: { id: string; arn: string; error: string | null };
  constructor(image: { id: string; arn: string; error: string | null }) {
    super(`image ${image.id} failed to build: ${image.error ?? 'no reason given'} (see its build log)`);
    this.name = 'ImageBuildFailedError';
    this.image = image;
  }
}

/** A microVM that was awaited reached a state it cannot leave (FAILED, TERMINATED). */
export class MicroVMStateError extends CocoonError {
  readonly microvm: { id: string; state: string; error?: string | null };
  constructor(microvm: { id: string; state: string; error?: string | null }, wanted: readonly string[]) {
    super(
      `microVM ${microvm.id} is ${microvm.state}${microvm.error ? ` (${microvm.error})` : ''} and will never be ${wanted.join(' or ')}`,
    );
    this.name = 'MicroVMStateError';
    this.microvm = microvm;
  }
}

export function isCocoonApiError(error: unknown, kind?: ApiErrorKind): error is CocoonApiError {
  return error instanceof CocoonApiError && (kind === undefined || error.kind === kind);
}

function describeCause(cause: unknown): string {
  let current: unknown = cause;
  let innermost = cause instanceof Error ? cause.message : '';
  for (let depth = 0; depth < 5 && current; depth++) {
    const code = (current as { code?: unknown }).code;
    if (typeof code === 'string') return code;
    if (current instanceof Error && current.message) innermost = current.message;
    current = (current as { cause?: unknown }).cause;
  }
  return innermost;
}
