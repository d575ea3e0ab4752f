/**
 * `cocoon-listen.so` (native/cocoon-listen.c): preloaded into QEMU so that its user-mode
 * network's forwarded ports listen with a real backlog instead of libslirp's `listen(s, 1)`
 * (docs/gateway.md "Connections to guests"). Built with the host's C compiler into the cache
 * directory, named by the hash of its source, at most once per process; `npm run setup` builds
 * it ahead of time. Without a compiler QEMU runs without it (backlog 1: the gateway then opens
 * new connections to a guest port a few at a time, and some wait for a retransmission).
 *
 *   node src/vmm/native/listen-shim.ts   # build it now and print its path
 */
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { log } from '../../common/log.ts';
import { cacheDir } from '../../config/paths.ts';

const run = promisify(execFile);
const SOURCE = path.join(path.dirname(fileURLToPath(import.meta.url)), 'cocoon-listen.c');
const COMPILER = process.env.CC ?? 'gcc';

/** The backlog the shim gives every listening socket of QEMU (cocoon-listen.c COCOON_MIN_BACKLOG). */
export const SHIM_BACKLOG = 256;

let building: Promise<string | undefined> | undefined;

/** The path of the built shim (readable by all), or undefined where it cannot be built. */
export function listenShim(): Promise<string | undefined> {
  building ??= build().catch((error: unknown) => {
    log.warn({ err: error }, `cannot build ${path.basename(SOURCE)} with ${COMPILER}: QEMU's forwarded ports keep a backlog of 1 (run \`npm run setup\`)`);
    return undefined;
  });
  return building;
}

async function build(): Promise<string> {
  const source = await fs.promises.readFile(SOURCE);
  const hash = createHash('sha256').update(source).digest('hex').slice(0, 16);
  const dir = path.join(cacheDir(), 'host');
  const library = path.join(dir, `cocoon-listen-${hash}.so`);
  if (fs.existsSync(library)) return library;
  await fs.promises.mkdir(dir, { recursive: true });
  const temp = `${library}.${process.pid}.tmp`;
  try {
    await run(COMPILER, ['-O2', '-Wall', '-Wextra', '-shared', '-fPIC', '-o', temp, SOURCE]);
    await fs.promises.chmod(temp, 0o644);
    await fs.promises.rename(temp, library); // atomic: concurrent builders each rename a whole file
  } finally {
    await fs.promises.rm(temp, { force: true });
  }
  return library;
}

if (import.meta.main) {
  const built = await listenShim();
  if (built === undefined) process.exitCode = 1;
  else console.log(built);
}
