import { errorStatus, type ErrorCode } from './error-codes.ts';

export type { ErrorCode } from './error-codes.ts';

/**
 * One error type for the whole platform. `code` is stable (scripts and the SDK match on it) and
 * registered in src/common/error-codes.ts; `message` is for humans and says what to do; `status`
 * is the HTTP status the API answers with: the code's registered status unless the throw site
 * names one of the others the registry lists for it (`also`).
 */
export class CocoonError extends Error {
  readonly code: ErrorCode;
  readonly status: number;
  readonly details: Record<string, unknown> | undefined;

  constructor(
    code: ErrorCode,
    message: string,
    options: { status?: number; cause?: unknown; details?: Record<string, unknown> } = {},
  ) {
    super(message, { cause: options.cause });
    this.name = 'CocoonError';
    this.code = code;
    this.status = options.status ?? errorStatus(code);
    this.details = options.details;
  }
}

export function isCocoonError(error: unknown, code?: ErrorCode): error is CocoonError {
  return error instanceof CocoonError && (code === undefined || error.code === code);
}

/** The message of anything thrown, for logs and wrapped errors. */
export function errorMessage(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}
