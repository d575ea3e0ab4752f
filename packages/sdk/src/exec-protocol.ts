/**
 * The wire shapes of exec, processes and interactive sessions (docs/api.md, "Exec"): the
 * newline-delimited JSON events of `POST /microvms/{id}/exec` and `GET …/processes/{pid}/output`,
 * and the WebSocket messages of `GET /microvms/{id}/exec/ws`. Pure functions, no I/O: the same
 * code runs in Node and in browsers, and every answer from the server is checked before use
 * (a hostile or confused peer gets a CocoonError, never a crash).
 */
import { apiError, CocoonError, InvalidArgumentError, type CocoonApiError } from './errors.ts';

/** How a process ended. */
export interface ExitStatus {
  /** The exit code, or null when a signal ended it. */
  exitCode: number | null;
  /** The signal that ended it (`SIGKILL`…), or null. */
  signal: string | null;
  /** Killed because its `timeoutSeconds` ran out. */
  timedOut: boolean;
  /** Why the server ended the session, when it did (e.g. `suspended`). */
  reason?: string;
}

export type ExecEvent =
  | { type: 'start'; pid: number }
  | { type: 'stdout'; data: Uint8Array }
  | { type: 'stderr'; data: Uint8Array }
  | ({ type: 'exit' } & ExitStatus)
  | { type: 'error'; error: CocoonApiError };

/** Stream numbers: the first byte of a server → client binary WebSocket frame. */
export const STREAM_STDOUT = 1;
export const STREAM_STDERR = 2;

/** Guest paths the API takes: absolute, no NUL, at most 4096 bytes. */
export const MAX_PATH_BYTES = 4096;

// ------------------------------------------------------------------ base64

/** Bytes → base64 (both Node and browsers; `btoa` wants a binary string). */
export function toBase64(bytes: Uint8Array): string {
  const from = (Uint8Array.prototype as { toBase64?: () => string }).toBase64;
  if (from) return from.call(bytes);
  let binary = '';
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(binary);
}

/** Base64 → bytes; throws a CocoonError on anything that is not base64. */
export function fromBase64(text: string): Uint8Array {
  const native = (Uint8Array as { fromBase64?: (s: string) => Uint8Array }).fromBase64;
  try {
    if (native) return native(text);
    const binary = atob(text);
    const bytes = new Uint8Array(binary.length);
    for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
    return bytes;
  } catch (error) {
    throw new CocoonError('the server sent output that is not base64', { cause: error });
  }
}

// ------------------------------------------------------------------ errors in a stream

/**
 * An error inside a stream or a WebSocket carries a code but no HTTP status; the status (and
 * so the error's class and `kind`) is inferred from the code, as the API's codes are named.
 */
export function statusForCode(code: string): number {
  const known = CODE_STATUS[code];
  if (known) return known;
  if (code.endsWith('_not_found')) return 404;
  if (code.startsWith('invalid_')) return 400;
  if (code.startsWith('too_many_')) return 429;
  if (code.endsWith('_unavailable')) return 503;
  return 500;
}

/** The statuses of the codes the exec and files API use (and its guest agent reports). */
const CODE_STATUS: Record<string, number> = {
  unauthenticated: 401,
  forbidden: 403,
  permission_denied: 403,
  not_found: 404,
  gone: 410,
  microvm_terminated: 410,
  payload_too_large: 413,
  too_many_items: 413,
  rate_limited: 429,
  no_space: 507,
  no_shell: 400,
  command_not_found: 400,
  exec_failed: 400,
  is_a_directory: 400,
  not_a_directory: 400,
  not_a_tty: 400,
  path_too_long: 400,
  cross_device: 400,
  unknown_user: 400,
  file_exists: 409,
  directory_not_empty: 409,
  read_only: 409,
  detached: 409,
  process_exited: 409,
  microvm_not_running: 409,
  auto_resume_disabled: 409,
  conflict: 409,
  unavailable: 503,
  agent_unreachable: 503,
};

export function streamError(raw: unknown, request: string): CocoonApiError {
  const error = (raw && typeof raw === 'object' ? raw : {}) as { code?: unknown; message?: unknown; status?: unknown };
  const code = typeof error.code === 'string' && error.code ? error.code : 'error';
  const message = typeof error.message === 'string' && error.message ? error.message : `the server reported ${code}`;
  const status = typeof error.status === 'number' && error.status >= 400 && error.status < 600 ? error.status : statusForCode(code);
  return apiError({ code, message, status, request });
}

// ------------------------------------------------------------------ events (ndjson and WebSocket text)

function exitFrom(value: Record<string, unknown>): ExitStatus {
  const exitCode = value.exitCode;
  const signal = value.signal;
  if (!(exitCode === null || exitCode === undefined || (Number.isInteger(exitCode) && (exitCode as number) >= 0 && (exitCode as number) <= 255))) {
    throw new CocoonError(`the server sent an exit event with a bad exitCode: ${JSON.stringify(exitCode)}`);
  }
  if (!(signal === null || signal === undefined || typeof signal === 'string')) {
    throw new CocoonError('the server sent an exit event with a bad signal');
  }
  const status: ExitStatus = {
    exitCode: (exitCode as number | null | undefined) ?? null,
    signal: (signal as string | null | undefined) ?? null,
    timedOut: value.timedOut === true,
  };
  if (typeof value.reason === 'string') status.reason = value.reason;
  return status;
}

function pidFrom(value: unknown): number {
  if (!Number.isInteger(value) || (value as number) <= 0) throw new CocoonError(`the server sent a bad pid: ${JSON.stringify(value)}`);
  return value as number;
}

/** One line of the ndjson stream → an event. Unknown event types are ignored (undefined): the server may add some. */
export function parseExecEvent(line: string, request = 'exec'): ExecEvent | undefined {
  let value: unknown;
  try {
    value = JSON.parse(line);
  } catch (error) {
    throw new CocoonError(`the server sent a line that is not JSON in ${request}`, { cause: error });
  }
  if (!value || typeof value !== 'object' || Array.isArray(value)) throw new CocoonError(`the server sent an event that is not an object in ${request}`);
  const event = value as Record<string, unknown>;
  switch (event.type) {
    case 'start':
    case 'started':
      return { type: 'start', pid: pidFrom(event.pid) };
    case 'stdout':
    case 'stderr':
      if (typeof event.data !== 'string') throw new CocoonError(`the server sent a ${event.type} event without data`);
      return { type: event.type, data: fromBase64(event.data) };
    case 'exit':
      return { type: 'exit', ...exitFrom(event) };
    case 'error':
      return { type: 'error', error: streamError(event.error, request) };
    default:
      return undefined;
  }
}

/** A binary WebSocket frame from the server: stream byte, then the bytes. */
export function decodeOutputFrame(frame: Uint8Array): { stream: 'stdout' | 'stderr'; data: Uint8Array } | undefined {
  if (frame.length === 0) return undefined;
  if (frame[0] === STREAM_STDOUT) return { stream: 'stdout', data: frame.subarray(1) };
  if (frame[0] === STREAM_STDERR) return { stream: 'stderr', data: frame.subarray(1) };
  return undefined;
}

/** What the server puts in a frame (tests and servers use it; clients decode). */
export function encodeOutputFrame(stream: 'stdout' | 'stderr', data: Uint8Array): Uint8Array {
  const frame = new Uint8Array(data.length + 1);
  frame[0] = stream === 'stdout' ? STREAM_STDOUT : STREAM_STDERR;
  frame.set(data, 1);
  return frame;
}

// ------------------------------------------------------------------ requests

/** A command: an argv list, or a string run by `/bin/sh -c` (images without a shell refuse it). */
export type CommandLine = string | readonly string[];

export interface ProcessSpec {
  /** Environment variables added to the image's. */
  env?: Record<string, string>;
  /** Working directory (absolute; default the image's WORKDIR). */
  cwd?: string;
  /** A user name or uid (default the image's USER). */
  user?: string | number;
  /** Kill the process (SIGKILL) after this many seconds; its exit says `timedOut: true`. 1–86400. */
  timeoutSeconds?: number;
}

export function checkCommand(command: CommandLine | undefined, optional = false): void {
  if (command === undefined && optional) return;
  if (typeof command === 'string') {
    if (command.trim() === '') throw new InvalidArgumentError('the command is empty');
    return;
  }
  if (!Array.isArray(command) || command.length === 0) throw new InvalidArgumentError('the command is a string or a non-empty list of strings');
  for (const arg of command) {
    if (typeof arg !== 'string') throw new InvalidArgumentError('every argument of the command must be a string');
    if (arg.includes('\0')) throw new InvalidArgumentError('an argument of the command holds a NUL byte');
  }
  if ((command[0] ?? '') === '') throw new InvalidArgumentError('the command\'s program is empty');
}

export function checkGuestPath(path: string, what = 'path'): void {
  if (typeof path !== 'string' || !path.startsWith('/')) {
    throw new InvalidArgumentError(`the ${what} must be an absolute path in the microVM (starting with /), got ${JSON.stringify(path)}`);
  }
  if (path.includes('\0')) throw new InvalidArgumentError(`the ${what} holds a NUL byte`);
  if (new TextEncoder().encode(path).length > MAX_PATH_BYTES) throw new InvalidArgumentError(`the ${what} is longer than ${MAX_PATH_BYTES} bytes`);
}

/** The spec's fields as the API names them, validated; undefined ones left out. */
export function processFields(spec: ProcessSpec): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  if (spec.env !== undefined) {
    if (!spec.env || typeof spec.env !== 'object') throw new InvalidArgumentError('env is an object of strings');
    for (const [key, value] of Object.entries(spec.env)) {
      if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(key)) throw new InvalidArgumentError(`env: ${JSON.stringify(key)} is not a variable name`);
      if (typeof value !== 'string' || value.includes('\0')) throw new InvalidArgumentError(`env: ${key}'s value must be a string without NUL`);
    }
    out.env = spec.env;
  }
  if (spec.cwd !== undefined) {
    checkGuestPath(spec.cwd, 'cwd');
    out.cwd = spec.cwd;
  }
  if (spec.user !== undefined) {
    if (typeof spec.user === 'number') {
      if (!Number.isInteger(spec.user) || spec.user < 0) throw new InvalidArgumentError('user is a name or a uid (a whole number ≥ 0)');
      out.user = String(spec.user);
    } else {
      if (spec.user === '' || spec.user.includes('\0') || spec.user.includes(':')) throw new InvalidArgumentError(`user ${JSON.stringify(spec.user)} is not a user name or uid`);
      out.user = spec.user;
    }
  }
  if (spec.timeoutSeconds !== undefined) {
    if (!Number.isInteger(spec.timeoutSeconds) || spec.timeoutSeconds < 1 || spec.timeoutSeconds > 86_400) {
      throw new InvalidArgumentError('timeoutSeconds is a whole number from 1 to 86400');
    }
    out.timeoutSeconds = spec.timeoutSeconds;
  }
  return out;
}

/** Stdin sent with a non-interactive exec is at most 1 MiB (stream more over a session). */
export const MAX_EXEC_STDIN = 1024 * 1024;

/** The body of `POST /microvms/{id}/exec`. */
export function execBody(command: CommandLine, spec: ProcessSpec & { stdin?: string | Uint8Array; background?: boolean }): Record<string, unknown> {
  checkCommand(command);
  const body: Record<string, unknown> = { command: typeof command === 'string' ? command : [...command], ...processFields(spec) };
  if (spec.stdin !== undefined) {
    const bytes = typeof spec.stdin === 'string' ? new TextEncoder().encode(spec.stdin) : spec.stdin;
    if (!(bytes instanceof Uint8Array)) throw new InvalidArgumentError('stdin is a string or bytes');
    if (bytes.length > MAX_EXEC_STDIN) {
      throw new InvalidArgumentError(`stdin is ${bytes.length} bytes, more than ${MAX_EXEC_STDIN}: stream it with exec.session() instead`);
    }
    body.stdin = toBase64(bytes);
  }
  if (spec.background) body.background = true;
  return body;
}

export interface SessionSpec extends ProcessSpec {
  /** The command; default the user's login shell (else /bin/sh). */
  command?: CommandLine;
  /** A pseudo-terminal (stdout and stderr then arrive as one stream). */
  tty?: boolean;
  cols?: number;
  rows?: number;
}

/** The largest terminal the API takes, in columns and in rows. */
export const MAX_TERMINAL_SIZE = 1000;

function checkSize(cols: number | undefined, rows: number | undefined): void {
  for (const [name, value] of [['cols', cols], ['rows', rows]] as const) {
    if (value !== undefined && (!Number.isInteger(value) || value < 1 || value > MAX_TERMINAL_SIZE)) {
      throw new InvalidArgumentError(`${name} is a whole number from 1 to ${MAX_TERMINAL_SIZE}`);
    }
  }
}

/** The first message on `/exec/ws`. `apiKey` only where no Authorization header could be sent (browsers). */
export function startMessage(spec: SessionSpec, apiKey?: string): string {
  checkCommand(spec.command, true);
  checkSize(spec.cols, spec.rows);
  const message: Record<string, unknown> = { type: 'start' };
  if (apiKey) message.apiKey = apiKey;
  if (spec.command !== undefined) message.command = typeof spec.command === 'string' ? spec.command : [...spec.command];
  message.tty = Boolean(spec.tty);
  if (spec.cols !== undefined) message.cols = spec.cols;
  if (spec.rows !== undefined) message.rows = spec.rows;
  Object.assign(message, processFields(spec));
  return JSON.stringify(message);
}

export function resizeMessage(cols: number, rows: number): string {
  if (cols === undefined || rows === undefined) throw new InvalidArgumentError('resize needs cols and rows');
  checkSize(cols, rows);
  return JSON.stringify({ type: 'resize', cols, rows });
}

/** Signal names the API takes (the common POSIX ones). */
export const SIGNALS = ['SIGHUP', 'SIGINT', 'SIGQUIT', 'SIGKILL', 'SIGUSR1', 'SIGUSR2', 'SIGTERM', 'SIGCONT', 'SIGSTOP', 'SIGTSTP', 'SIGWINCH'] as const;
export type SignalName = (typeof SIGNALS)[number];

export function checkSignal(signal: string): SignalName {
  const name = (signal.startsWith('SIG') ? signal : `SIG${signal}`).toUpperCase();
  if (!(SIGNALS as readonly string[]).includes(name)) throw new InvalidArgumentError(`unknown signal ${signal}; one of ${SIGNALS.join(', ')}`);
  return name as SignalName;
}

export function signalMessage(signal: string): string {
  return JSON.stringify({ type: 'signal', signal: checkSignal(signal) });
}

export const EOF_MESSAGE = JSON.stringify({ type: 'eof' });

/** The usual shell convention for a status: the code, or 128 + the signal's number. */
export function shellStatus(exit: ExitStatus): number {
  if (exit.exitCode !== null) return exit.exitCode;
  const numbers: Record<string, number> = { SIGHUP: 1, SIGINT: 2, SIGQUIT: 3, SIGILL: 4, SIGTRAP: 5, SIGABRT: 6, SIGBUS: 7, SIGFPE: 8, SIGKILL: 9, SIGUSR1: 10, SIGSEGV: 11, SIGUSR2: 12, SIGPIPE: 13, SIGALRM: 14, SIGTERM: 15 };
  return 128 + (exit.signal ? numbers[exit.signal] ?? 1 : 1);
}
