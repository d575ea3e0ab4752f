/**
 * One error type for the whole platform. `code` is stable (scripts and the SDK match on it);
 * `message` is for humans and says what to do; `status` is the HTTP status the API answers with.
 */
export class CocoonError extends Error {
  readonly code: string;
  readonly status: number;
  readonly details: Record<string, unknown> | undefined;

  constructor(
    code: string,
    message: string,
    options: { status?: number; cause?: unknown; details?: Record<string, unknown> } = {},
  ) {
    super(message, { cause: options.cause });
    this.name = 'CocoonError';
    this.code = code;
    this.status = options.status ?? 500;
    this.details = options.details;
  }
}

export function isCocoonError(error: unknown, code?: string): error is CocoonError {
  return error instanceof CocoonError && (code === undefined || error.code === code);
}

/** The message of anything thrown, for logs and wrapped errors. */
export function errorMessage(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}
