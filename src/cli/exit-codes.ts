/**
 * `cocoon`'s exit codes, for scripts (docs/cli.md lists them). Stable: add, never renumber.
 */
import {
  CocoonApiError,
  CocoonConnectionError,
  CocoonTimeoutError,
  InvalidArgumentError,
} from '../../packages/sdk/src/index.ts';

export const EXIT = {
  /** It worked. */
  ok: 0,
  /** It did not work: a build or microVM FAILED, a server error, anything else. */
  failure: 1,
  /** The command line or the request is invalid (unknown flag, bad value, 400 from the API). */
  usage: 2,
  /** No such image, microVM, token, key or tenant (404). */
  notFound: 3,
  /** No API key, or the key is unknown, revoked or not allowed (401, 403). */
  auth: 4,
  /** The resource is in the wrong state for this (409, 410): e.g. an image still in use. */
  conflict: 5,
  /** The server could not be reached. */
  unreachable: 6,
  /** A wait (--wait, --timeout) ran out of time. */
  timeout: 7,
} as const;

/** An error in what the user typed (exit 2). */
export class UsageError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'UsageError';
  }
}

/** A failure with its own exit code and a hint about what to do next. */
export class CliError extends Error {
  readonly exitCode: number;
  readonly code: string;
  readonly hint: string | undefined;
  constructor(code: string, message: string, exitCode: number, hint?: string) {
    super(message);
    this.name = 'CliError';
    this.code = code;
    this.exitCode = exitCode;
    this.hint = hint;
  }
}

export function exitCodeFor(error: unknown): number {
  if (error instanceof CliError) return error.exitCode;
  if (error instanceof UsageError || error instanceof InvalidArgumentError) return EXIT.usage;
  if (error instanceof CocoonApiError) {
    switch (error.kind) {
      case 'invalid_request': return EXIT.usage;
      case 'not_found': return EXIT.notFound;
      case 'unauthenticated':
      case 'forbidden': return EXIT.auth;
      case 'conflict':
      case 'gone': return EXIT.conflict;
      default: return EXIT.failure;
    }
  }
  if (error instanceof CocoonConnectionError) return EXIT.unreachable;
  if (error instanceof CocoonTimeoutError) return EXIT.timeout;
  return EXIT.failure;
}
