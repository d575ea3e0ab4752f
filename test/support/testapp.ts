/** Builds test/support/testapp.c (static, musl) for the test guests. */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const TESTAPP_SOURCE = path.join(path.dirname(fileURLToPath(import.meta.url)), 'testapp.c');

/** Compiles the test app into `dir` and answers the binary's path. */
export function buildTestApp(dir: string): string {
  const out = path.join(dir, 'testapp');
  if (fs.existsSync(out)) return out;
  fs.mkdirSync(dir, { recursive: true });
  execFileSync('musl-gcc', ['-static', '-O2', '-Wall', '-Wno-unused-parameter', '-o', `${out}.tmp`, TESTAPP_SOURCE], { stdio: 'pipe' });
  fs.renameSync(`${out}.tmp`, out);
  return out;
}
