/**
 * A bundle (.tar.gz) of a busybox image that runs the C test app (test/support/testapp.c) on
 * 8080: a counter in memory (`/count`), a WebSocket echo (`/ws`), uploads and downloads. For
 * tests and benchmarks that build an image through the real pipeline (buildah) in seconds.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { buildTestApp } from './testapp.ts';
import { writeTree } from './tree.ts';

/** Writes the bundle under `dir` (scratch) and answers its bytes. */
export function testAppBundle(dir: string): Buffer {
  const root = path.join(dir, 'bundle');
  fs.mkdirSync(root, { recursive: true });
  writeTree(root, { Dockerfile: ['FROM busybox', 'COPY testapp /testapp', 'EXPOSE 8080', 'CMD ["/testapp", "8080"]', ''].join('\n') });
  fs.copyFileSync(buildTestApp(path.join(dir, 'testapp-build')), path.join(root, 'testapp'));
  fs.chmodSync(path.join(root, 'testapp'), 0o755);
  const out = path.join(dir, 'bundle.tar.gz');
  execFileSync('tar', ['-czf', out, '-C', root, '.']);
  return fs.readFileSync(out);
}
