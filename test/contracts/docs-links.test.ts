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
