/**
 * One `cocoon-sparse serve` per process for the memory diffs of suspends (issue 12): starting a
 * helper per suspend cost ~10-20 ms of its `prepare` phase on a busy 2-core host (a spawn from a
 * large Node process, exec, the loader). The server is started once (ahead, `warmDiffServer`),
 * forks one job per diff (a crash ends that job, not the server), runs at most 64 jobs at once,
 * and is started again on the next request if it died. It ends with this process (its stdin
 * closes) or `stopDiffServer()`.
 *
 * A job is `cocoon-sparse diff … wait` or `sumheld` (cocoon-sparse.c): prepared at once, held
 * until `go`.
 */
import { type ChildProcessByStdio, spawn } from 'node:child_process';
import type { Readable, Writable } from 'node:stream';
import { CocoonError } from '../../common/errors.ts';
import { sparseHelper } from './helper.ts';

interface Job {
  ready: (value: void) => void;
  done: (output: string) => void;
  failed: (error: Error) => void;
}

/** Longest request line the server reads (cocoon-sparse.c SERVE_LINE less room). */
const MAX_REQUEST = 16_000;

class DiffServer {
  readonly #child: ChildProcessByStdio<Writable, Readable, null>;
  readonly #jobs = new Map<string, Job>();
  #nextId = 1;
  #buffer = '';
  gone = false;

  constructor(binary: string) {
    this.#child = spawn(binary, ['serve'], { stdio: ['pipe', 'pipe', 'ignore'] });
    this.#child.stdin.on('error', () => undefined); // a server that died is reported by its exit
    this.#child.stdout.setEncoding('utf8');
    this.#child.stdout.on('data', (chunk: string) => this.#onData(chunk));
    const ended = (why: string) => {
      if (this.gone) return;
      this.gone = true;
      for (const job of this.#jobs.values()) {
        const error = new CocoonError('sparse_helper_failed', `the memory diff helper ended (${why})`);
        serverGone.add(error);
        job.failed(error);
      }
      this.#jobs.clear();
    };
    this.#child.once('error', (error) => ended(error.message));
    this.#child.once('exit', (code, signal) => ended(signal ?? `status ${code}`));
    this.#idle();
  }

  /** Starts a held diff (`args`: ['diff', BASE, MEM, OUT, option...]); resolves once it is ready. */
  async request(args: string[]): Promise<{ go: () => Promise<string>; cancel: () => void }> {
    if (args.some((arg) => /[\t\n\0]/.test(arg))) throw new CocoonError('sparse_helper_failed', 'a path with a tab or newline cannot go to the diff helper');
    const id = String(this.#nextId++);
    const line = `${id}\t${args.join('\t')}\n`;
    if (line.length > MAX_REQUEST) throw new CocoonError('sparse_helper_failed', 'the memory diff request is too long');
    let job!: Job;
    let done!: Promise<string>;
    const ready = new Promise<void>((resolveReady, rejectReady) => {
      done = new Promise<string>((resolveDone, rejectDone) => {
        job = {
          ready: resolveReady,
          done: resolveDone,
          failed: (error) => {
            rejectReady(error);
            rejectDone(error);
          },
        };
      });
    });
    done.catch(() => undefined); // a failure before `go` is reported by `ready`
    this.#jobs.set(id, job);
    this.#busy();
    this.#child.stdin.write(line);
    try {
      await ready;
    } catch (error) {
      this.#jobs.delete(id);
      this.#idle();
      throw error;
    }
    return {
      go: async () => {
        this.#child.stdin.write(`${id}\tgo\n`);
        try {
          return await done;
        } finally {
          this.#jobs.delete(id);
          this.#idle();
        }
      },
      cancel: () => {
        if (!this.#jobs.delete(id)) return;
        this.#child.stdin.write(`${id}\tcancel\n`);
        this.#idle();
      },
    };
  }

  stop(): void {
    this.#child.stdin.end();
  }

  get pid(): number | undefined {
    return this.#child.pid;
  }

  #onData(chunk: string): void {
    this.#buffer += chunk;
    for (let end = this.#buffer.indexOf('\n'); end >= 0; end = this.#buffer.indexOf('\n')) {
      const line = this.#buffer.slice(0, end);
      this.#buffer = this.#buffer.slice(end + 1);
      const [id = '', word = '', ...rest] = line.split(' ');
      const job = this.#jobs.get(id);
      if (!job) continue; // cancelled
      const text = rest.join(' ');
      if (word === 'ready') job.ready();
      else if (word === 'ok') job.done(text.split('\t').join('\n') + '\n');
      else if (word === 'fail') {
        const [code = '1', ...message] = text.split(' ');
        job.failed(failure(Number(code), message.join(' ').replaceAll('\t', '; ')));
      }
    }
  }

  // The server keeps this process alive only while a diff is under way.
  #busy(): void {
    this.#child.ref();
    handleOf(this.#child.stdout).ref?.();
  }

  #idle(): void {
    if (this.#jobs.size > 0) return;
    this.#child.unref();
    handleOf(this.#child.stdout).unref?.();
    handleOf(this.#child.stdin).unref?.();
  }
}

/** A child's pipe is a net.Socket: it can be ref'd and unref'd like the child. */
function handleOf(stream: Readable | Writable): { ref?: () => void; unref?: () => void } {
  return stream as unknown as { ref?: () => void; unref?: () => void };
}

function failure(code: number, message: string): CocoonError {
  const text = message || `cocoon-sparse exited with ${code}`;
  if (code === 28) return new CocoonError('no_space', `no space left on the data directory's disk: ${text}`, { status: 507 });
  // 5: an fdatasync failed; its cause says so, so that the snapshot is abandoned and the file
  // never synced again (snapshot-commit.ts `fsyncFailure`).
  const cause = code === 5 ? Object.assign(new Error(text), { syscall: 'fdatasync', code: 'EIO' }) : undefined;
  return new CocoonError('sparse_helper_failed', text, cause ? { cause } : {});
}

/** Failures that say only that the server died (its exit not seen when the request went out). */
const serverGone = new WeakSet<Error>();

let server: DiffServer | undefined;
let starting: Promise<DiffServer> | undefined;

/** A request to the server; once more to a new one if the server turns out to have died. */
async function requestJob(args: string[]): Promise<HeldSum> {
  try {
    return await (await running()).request(args);
  } catch (error) {
    if (!serverGone.has(error as Error)) throw error;
    return (await running()).request(args);
  }
}

async function running(): Promise<DiffServer> {
  if (server && !server.gone) return server;
  starting ??= sparseHelper()
    .then((binary) => (server = new DiffServer(binary)))
    .finally(() => {
      starting = undefined;
    });
  return starting;
}

/**
 * A held memory diff from the server (as `startHeldHelper(['diff', …, 'wait'])` gives one from a
 * helper of its own): resolves once the job is ready; `go()` resolves with the diff's output.
 */
export async function startHeldDiff(args: string[]): Promise<HeldSum> {
  return requestJob(args);
}

/**
 * A held checksum of `file` (`cocoon-sparse sumheld`): the file is opened at once (it may be
 * renamed afterwards); `go()` checksums it, fdatasyncs it when `sync`, and resolves with its
 * checksum line. A suspend's disk layer, without a helper started (and this process forked)
 * while the VM is paused.
 */
export interface HeldSum {
  go: () => Promise<string>;
  cancel: () => void;
}
export async function startHeldSum(file: string, sync: boolean): Promise<HeldSum> {
  return requestJob(['sumheld', file, ...(sync ? ['sync'] : [])]);
}

/** Starts the server now, so that the first suspend does not (errors are left to that suspend). */
export function warmDiffServer(): void {
  running().catch(() => undefined);
}

/** Ends the server (tests; it also ends with this process). */
export function stopDiffServer(): void {
  server?.stop();
  server = undefined;
}

/** The server's pid, if it runs (tests). */
export function diffServerPid(): number | undefined {
  return server && !server.gone ? server.pid : undefined;
}
