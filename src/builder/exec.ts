import { spawn } from 'node:child_process';
import { CocoonError, type ErrorCode } from '../common/errors.ts';

export interface ExecOptions {
  /** Extra environment; merged over process.env. */
  env?: Record<string, string>;
  cwd?: string;
  /** Written to the child's stdin, then stdin is closed. */
  input?: string | Buffer;
  /** Called for every complete line of stdout and stderr, in arrival order. */
  onLine?: (line: string, stream: 'stdout' | 'stderr') => void;
  /** Do not keep stdout/stderr in memory (use with onLine for chatty programs). */
  discardOutput?: boolean;
  /**
   * Stops the child when aborted: SIGTERM to it, then SIGKILL to its process group after
   * `killGraceMs`. The promise settles only once the child has exited, then rejects with the
   * signal's reason.
   */
  signal?: AbortSignal;
  killGraceMs?: number;
  /** Resolve (with `aborted: true`) instead of rejecting when the signal stopped the child. */
  resolveOnAbort?: boolean;
  /** Resolve with the result instead of throwing on a non-zero exit. */
  allowFailure?: boolean;
  /** Error code used when the command fails (default `command_failed`). */
  errorCode?: ErrorCode;
}

export interface ExecResult {
  code: number;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  /** The signal fired while the child ran (it was stopped). */
  aborted: boolean;
  /** The child had to be killed with SIGKILL after an abort. */
  forceKilled: boolean;
}

/**
 * Runs a program without a shell (arguments are never parsed) in its own process group and
 * collects its output. A non-zero exit throws a CocoonError whose message carries the command
 * and the tail of its output.
 */
export function exec(file: string, args: readonly string[], options: ExecOptions = {}): Promise<ExecResult> {
  return new Promise((resolve, reject) => {
    if (options.signal?.aborted) {
      reject(abortReason(options.signal));
      return;
    }
    const child = spawn(file, args, {
      cwd: options.cwd,
      env: options.env ? { ...process.env, ...options.env } : process.env,
      stdio: [options.input === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe'],
      detached: true, // own process group, so that an abort reaches its children too
    });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    const splitters = {
      stdout: new LineSplitter((l) => options.onLine?.(l, 'stdout')),
      stderr: new LineSplitter((l) => options.onLine?.(l, 'stderr')),
    };
    child.stdout!.on('data', (b: Buffer) => {
      if (!options.discardOutput) out.push(b);
      if (options.onLine) splitters.stdout.push(b);
    });
    child.stderr!.on('data', (b: Buffer) => {
      if (!options.discardOutput) err.push(b);
      if (options.onLine) splitters.stderr.push(b);
    });
    if (options.input !== undefined) {
      child.stdin!.on('error', () => { /* the child may exit without reading it */ });
      child.stdin!.end(options.input);
    }

    let killTimer: NodeJS.Timeout | undefined;
    let forceKilled = false;
    const killGroup = (sig: NodeJS.Signals): void => {
      try {
        if (child.pid !== undefined) process.kill(-child.pid, sig);
      } catch {
        child.kill(sig);
      }
    };
    const onAbort = (): void => {
      // The program itself first, so that it can clean up after its children...
      child.kill('SIGTERM');
      // ...and its whole process group when it does not stop in time.
      killTimer = setTimeout(() => {
        forceKilled = true;
        killGroup('SIGKILL');
      }, options.killGraceMs ?? 5000);
    };
    options.signal?.addEventListener('abort', onAbort, { once: true });

    child.on('error', (e) => {
      options.signal?.removeEventListener('abort', onAbort);
      if (killTimer) clearTimeout(killTimer);
      reject(new CocoonError(options.errorCode ?? 'command_failed',
        `Could not run ${file}: ${e.message}. Is it installed and on PATH?`, { cause: e }));
    });
    child.on('close', (code, sig) => {
      options.signal?.removeEventListener('abort', onAbort);
      if (killTimer) clearTimeout(killTimer);
      splitters.stdout.end();
      splitters.stderr.end();
      const result: ExecResult = {
        code: code ?? 128,
        signal: sig,
        stdout: Buffer.concat(out).toString('utf8'),
        stderr: Buffer.concat(err).toString('utf8'),
        aborted: options.signal?.aborted ?? false,
        forceKilled,
      };
      if (result.aborted && options.resolveOnAbort) {
        resolve(result);
      } else if (result.aborted) {
        reject(abortReason(options.signal!));
      } else if (result.code !== 0 && !options.allowFailure) {
        reject(new CocoonError(options.errorCode ?? 'command_failed',
          `${file} ${args.join(' ')} failed (${sig ?? `exit ${result.code}`}): ${tail(result.stderr || result.stdout)}`,
          { details: { stderr: result.stderr } }));
      } else {
        resolve(result);
      }
    });
  });
}

/** The last lines of a command's output, for error messages. */
export function tail(text: string, lines = 20): string {
  return text.trimEnd().split('\n').slice(-lines).join('\n');
}

export function abortReason(signal: AbortSignal): unknown {
  return signal.reason ?? new DOMException('This operation was aborted', 'AbortError');
}

/** Splits a byte stream into lines (without the newline; a trailing `\r` is dropped too). */
class LineSplitter {
  private rest = '';
  private readonly decoder = new TextDecoder('utf-8');
  private readonly emit: (line: string) => void;

  constructor(emit: (line: string) => void) {
    this.emit = emit;
  }

  push(chunk: Buffer): void {
    const text = this.rest + this.decoder.decode(chunk, { stream: true });
    const parts = text.split('\n');
    this.rest = parts.pop() ?? '';
    for (const p of parts) this.emit(p.endsWith('\r') ? p.slice(0, -1) : p);
  }

  end(): void {
    const last = this.rest + this.decoder.decode();
    this.rest = '';
    if (last !== '') this.emit(last.endsWith('\r') ? last.slice(0, -1) : last);
  }
}
