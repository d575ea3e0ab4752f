/**
 * The project's docs and source name no file outside the repository: every `something.md` that
 * README, docs/, bench/, packages/, src/ and test/ mention, and every relative Markdown link,
 * resolves to a file in the repository (next to the mentioning file, at the root, or in docs/).
 * (The design notes and the public contract live in docs/design.md and docs/contract.md.)
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { ROOT } from './source-scan.ts';

const tracked = execFileSync('git', ['ls-files', '--cached', '--others', '--exclude-standard'], { cwd: ROOT, encoding: 'utf8' })
  .split('\n')
  .filter((f) => /\.(md|ts|js|c|h|sh|py)$/.test(f) && /^(README\.md|docs\/|bench\/|packages\/|src\/|test\/|scripts\/)/.test(f));

function exists(from: string, name: string): boolean {
  const clean = name.split('#')[0]!;
  if (clean === '') return true;
  return [path.join(path.dirname(from), clean), clean, path.join('docs', clean)].some((c) => fs.existsSync(path.join(ROOT, c)));
}

test('every .md file named in docs and source is in the repository', () => {
  const missing: string[] = [];
  for (const file of tracked) {
    if (!fs.existsSync(path.join(ROOT, file))) continue;
    const text = fs.readFileSync(path.join(ROOT, file), 'utf8');
    text.split('\n').forEach((line, i) => {
      for (const m of line.matchAll(/(?<![\w/.:-])([\w./-]*[A-Za-z0-9_-]\.md)\b/g)) {
        const name = m[1]!;
        if (name.startsWith('/') || name.includes('//')) continue; // a URL's path
        if (file === 'test/contracts/docs-links.test.ts') continue;
        if (!exists(file, name)) missing.push(`${file}:${i + 1} names ${name}`);
      }
      if (file.endsWith('.md')) {
        for (const m of line.matchAll(/\]\(([^)\s]+)\)/g)) {
          const target = m[1]!;
          if (/^[a-z]+:/.test(target) || target.startsWith('#') || !/^[\w./#-]+$/.test(target)) continue;
          if (!exists(file, target)) missing.push(`${file}:${i + 1} links ${target}`);
        }
      }
    });
  }
  assert.deepEqual(missing, [], `files named but not in the repository (bring what is needed into docs/ and point there):\n${missing.join('\n')}`);
});

/** Paths the docs name that are not files of this repository, on purpose (with why). */
const NOT_OURS = new Set([
  'docs/e2b.md src/index.ts', // a file of the E2B SDK's test harness that the page tells you to write
]);

test('every repository path the docs name (src/…, test/…, bench/…, scripts/…, packages/…) exists', () => {
  const missing: string[] = [];
  for (const file of tracked.filter((f) => f.endsWith('.md'))) {
    if (!fs.existsSync(path.join(ROOT, file))) continue;
    fs.readFileSync(path.join(ROOT, file), 'utf8').split('\n').forEach((line, i) => {
      for (const m of line.matchAll(/(?<![\w/.-])((?:src|test|bench|scripts|packages)\/[\w./-]+\.(?:ts|js|c|h|sh|py|json))\b/g)) {
        const name = m[1]!;
        if (NOT_OURS.has(`${file} ${name}`)) continue;
        if (!fs.existsSync(path.join(ROOT, name)) && !fs.existsSync(path.join(ROOT, path.dirname(file), name))) missing.push(`${file}:${i + 1} names ${name}`);
      }
    });
  }
  assert.deepEqual(missing, [], `paths named in the docs that are not in the repository (moved or never written?):\n${missing.join('\n')}`);
});
