/**
 * `cocoon-sparse` (native/cocoon-sparse.c): the sparse-file operations Node lacks (SEEK_DATA,
 * fallocate, FIEMAP). Built with the host's C compiler into the cache directory, named by the
 * hash of its source so that a changed source is rebuilt, and built at most once per process.
 * `npm run setup` builds it ahead of time; the first use builds it otherwise (~0.2 s).
 *
 *   node src/vmm/native/helper.ts   # build it now and print its path
 */
import { execFile, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { CocoonError, errorMessage } from '../../common/errors.ts';
import { cacheDir } from '../../config/paths.ts';

const run = promisify(execFile);
const SOURCE = path.join(path.dirname(fileURLToPath(import.meta.url)), 'cocoon-sparse.c');
const COMPILER = process.env.CC ?? 'gcc';

let building: Promise<string> | undefined;

/** The path of the built helper, building it first when needed. */
export function sparseHelper(): Promise<string> {
  building ??= build().catch((error: unknown) => {
    building = undefined; // a later call may try again (e.g. after `npm run setup`)
    throw error;
  });
  return building;
}

async function build(): Promise<string> {
  const source = await fs.promises.readFile(SOURCE);
  const hash = createHash('sha256').update(source).digest('hex').slice(0, 16);
  const dir = path.join(cacheDir(), 'host');
  const binary = path.join(dir, `cocoon-sparse-${hash}`);
  if (fs.existsSync(binary)) return binary;
  await fs.promises.mkdir(dir, { recursive: true });
  const temp = `${binary}.${process.pid}.tmp`;
  try {
    await run(COMPILER, ['-O2', '-Wall', '-Wextra', '-pthread', '-o', temp, SOURCE]);
    await fs.promises.chmod(temp, 0o755);
    await fs.promises.rename(temp, binary); // atomic: concurrent builders each rename a whole file
  } catch (error) {
    await fs.promises.rm(temp, { force: true });
    throw new CocoonError(
      'helper_missing',
      `cannot build the sparse-file helper with ${COMPILER} (${errorMessage(error)}); run \`npm run setup\``,
      { cause: error },
    );
  }
  return binary;
}

/**
 * Runs the helper; its exit status 28 (ENOSPC) becomes `no_space`. `fds` are handed to it as
 * file descriptors 3, 4, ... (name them `/dev/fd/3`...): the files it reads then stay the same
 * even if they are renamed meanwhile.
 */
export async function runSparseHelper(args: string[], fds: number[] = []): Promise<string> {
  const binary = await sparseHelper();
  const child = spawn(binary, args, { stdio: ['ignore', 'pipe', 'pipe', ...fds] });
  const out: Buffer[] = [];
  const err: Buffer[] = [];
  child.stdout?.on('data', (chunk: Buffer) => out.push(chunk));
  child.stderr?.on('data', (chunk: Buffer) => err.push(chunk));
  const code = await new Promise<number | null>((resolve, reject) => {
    child.once('error', reject);
    child.once('close', (status) => resolve(status));
  });
  const stdout = Buffer.concat(out).toString('utf8');
  if (code === 0) return stdout;
  const message = Buffer.concat(err).toString('utf8').trim() || `cocoon-sparse ${args[0]} exited with ${code}`;
  if (code === 28) throw new CocoonError('no_space', `no space left on the data directory's disk: ${message}`, { status: 507 });
  throw new CocoonError('sparse_helper_failed', message);
}

if (import.meta.main) console.log(await sparseHelper());

/**
 * A helper run started ahead and held until told to go (`cocoon-sparse snap`, `diff … wait`): it
 * prints "ready" once prepared, then waits for a byte on stdin. Resolves once it is ready;
 * `go()` lets it run and resolves with its output after "ready" (rejects as `runSparseHelper`
 * does); `cancel()` ends it without running.
 */
export async function startHeldHelper(args: string[]): Promise<{ go: () => Promise<string>; cancel: () => void }> {
  const binary = await sparseHelper();
  const child = spawn(binary, args, { stdio: ['pipe', 'pipe', 'pipe'] });
  let out = '';
  const err: Buffer[] = [];
  child.stderr?.on('data', (chunk: Buffer) => err.push(chunk));
  child.stdin?.on('error', () => undefined); // a helper that died is reported by its exit
  const exit = new Promise<number | null>((resolve, reject) => {
    child.once('error', reject);
    child.once('close', (status) => resolve(status));
  });
  const failure = (code: number | null) => {
    const message = Buffer.concat(err).toString('utf8').trim() || `cocoon-sparse ${args[0]} exited with ${code}`;
    return code === 28
      ? new CocoonError('no_space', `no space left on the data directory's disk: ${message}`, { status: 507 })
      : new CocoonError('sparse_helper_failed', message);
  };
  await new Promise<void>((resolve, reject) => {
    child.stdout?.on('data', (chunk: Buffer) => {
      out += chunk.toString('utf8');
      if (out.startsWith('ready\n')) resolve();
    });
    void exit.then((code) => reject(failure(code)), reject);
  });
  return {
    go: async () => {
      child.stdin?.end('g');
      const code = await exit;
      if (code !== 0) throw failure(code);
      return out.slice('ready\n'.length);
    },
    cancel: () => {
      child.kill('SIGKILL');
    },
  };
}

/**
 * `cocoon-sparse snap`: a helper started ahead of a pause that copies `pairs` ([source, target])
 * when told to. Resolves once it is ready; `go()` starts the copies and resolves when they are
 * done (rejects as `runSparseHelper` does); `cancel()` ends it without copying.
 */
export async function prepareSnapCopy(pairs: Array<[string, string]>): Promise<{ go: () => Promise<void>; cancel: () => void }> {
  const held = await startHeldHelper(['snap', ...pairs.flat()]);
  return {
    go: async () => {
      if (!(await held.go()).includes('done\n')) throw new CocoonError('sparse_helper_failed', 'cocoon-sparse snap ended without copying');
    },
    cancel: held.cancel,
  };
}
