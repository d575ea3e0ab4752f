/**
 * What runs inside a microVM, as a service: processes, PTYs and files through the guest agent
 * (src/guest/agent/). The REST/WebSocket API (src/api/routes/exec.ts, files.ts), the gateway's
 * shell and the compatibility surfaces (E2B, AWS) all sit on this interface; none of them
 * speaks the agent protocol itself.
 *
 * Every call takes the caller's tenant: another tenant's microVM is `microvm_not_found` (404),
 * like a missing one. Every call on a SUSPENDED microVM wakes it, exactly as a gateway request
 * does (`microvm_suspended`, 409, when its autoResumeEnabled is false). An open session counts
 * as activity (idle suspend never cuts it); an explicit suspend or a termination ends open
 * sessions with an exit event whose `reason` says so.
 */
import type { ErrorCode } from '../common/error-codes.ts';
import type { Readable } from 'node:stream';

export interface ExecRequest {
  /** argv, or a shell string run with `/bin/sh -c` (`no_shell`, 400, when the image has none). */
  command: string[] | string;
  env?: Record<string, string>;
  cwd?: string;
  /** A user name or numeric uid; default: the image's USER. */
  user?: string;
  /** A PTY instead of pipes (stdout only; stderr is merged, as on a terminal). */
  tty?: boolean;
  cols?: number;
  rows?: number;
  /** Keep stdin open for `write` (otherwise stdin is /dev/null). */
  stdin?: boolean;
  /** SIGKILL after this long; the exit event then says `timedOut: true`. */
  timeoutSeconds?: number;
  /** Keeps running when its session ends (a background process); otherwise ending the session kills it. */
  background?: boolean;
}

export type ExecEvent =
  | { type: 'stdout'; data: Buffer }
  | { type: 'stderr'; data: Buffer }
  | { type: 'exit'; exitCode: number | null; signal: string | null; timedOut: boolean; reason?: ExitReason }
  | { type: 'error'; error: { code: ErrorCode; message: string } };

/** Why a session ended without the process's own exit: the microVM was suspended, terminated… */
export type ExitReason = 'suspended' | 'terminated' | 'failed' | 'agent_gone';

/** An open connection to one process: its output (pulled, back-pressured), its input and controls. */
export interface ExecSession {
  readonly pid: number;
  readonly tty: boolean;
  /** Output events in order, ending with one `exit` or `error`. Pulling slowly slows the guest. */
  events(): AsyncIterable<ExecEvent>;
  /** Sends stdin bytes (resolves once the guest took them within its credit). */
  write(data: Buffer): Promise<void>;
  /** Closes stdin (on a PTY: sends end-of-input). */
  closeStdin(): void;
  resize(cols: number, rows: number): void;
  /** `signal`: a name such as SIGTERM, SIGINT, SIGKILL. */
  kill(signal: string): void;
  /** Ends the session. A foreground process is killed; a background one keeps running. */
  close(): void;
}

export interface ProcessInfo {
  pid: number;
  command: string[];
  tty: boolean;
  startedAt: string;
}

export interface FileStat {
  path: string;
  name: string;
  type: 'file' | 'directory' | 'symlink' | 'other';
  size: number;
  /** Octal permission bits, e.g. "0644". */
  mode: string;
  uid: number;
  gid: number;
  mtime: string;
  linkTarget?: string;
}

/** A change in a watched directory (not recursive). `gone`: the directory itself was removed (last event). */
export interface WatchEvent {
  type: 'create' | 'write' | 'remove' | 'rename_from' | 'rename_to' | 'chmod' | 'gone';
  name: string;
  isDir: boolean;
}

export interface DirWatch {
  /** Events as they happen, back-pressured; ends when the directory goes or the watch is closed. */
  events(): AsyncIterable<WatchEvent>;
  close(): void;
}

export interface ExecService {
  /** Starts a process and opens a session on it (a background one survives the session). */
  exec(tenantId: string, microvmId: string, request: ExecRequest): Promise<ExecSession>;
  /** Starts a background process and returns at once. */
  start(tenantId: string, microvmId: string, request: ExecRequest): Promise<{ pid: number }>;
  listProcesses(tenantId: string, microvmId: string): Promise<ProcessInfo[]>;
  /** Attaches to a running process's output from now on (and its stdin). */
  attach(tenantId: string, microvmId: string, pid: number): Promise<ExecSession>;
  writeStdin(tenantId: string, microvmId: string, pid: number, data: Readable | Buffer, options?: { eof?: boolean }): Promise<void>;
  signal(tenantId: string, microvmId: string, pid: number, signal: string): Promise<void>;
  resize(tenantId: string, microvmId: string, pid: number, cols: number, rows: number): Promise<void>;

  /** A file's bytes, streamed (back-pressured); `file_not_found` 404, `is_a_directory` 400. */
  readFile(tenantId: string, microvmId: string, path: string): Promise<{ stat: FileStat; body: Readable }>;
  /** Writes a file from a stream (replaced atomically once complete); `no_space` 507 when the guest disk is full. */
  writeFile(tenantId: string, microvmId: string, path: string, body: Readable | Buffer, options?: { mode?: string }): Promise<FileStat>;
  stat(tenantId: string, microvmId: string, path: string): Promise<FileStat>;
  list(tenantId: string, microvmId: string, path: string): Promise<FileStat[]>;
  mkdir(tenantId: string, microvmId: string, path: string, options?: { mode?: string; parents?: boolean }): Promise<FileStat>;
  remove(tenantId: string, microvmId: string, path: string, options?: { recursive?: boolean }): Promise<void>;
  rename(tenantId: string, microvmId: string, from: string, to: string): Promise<FileStat>;
  chmod(tenantId: string, microvmId: string, path: string, options: { mode?: string; uid?: number; gid?: number }): Promise<FileStat>;

  /** Watches a directory (inotify in the guest); an open watch is a session (it counts as activity). */
  watchDir(tenantId: string, microvmId: string, path: string): Promise<DirWatch>;

  /** Open sessions on a microVM (tests, metrics). */
  sessionCount(microvmId: string): number;
  close(): Promise<void>;
}
