import assert from 'node:assert/strict';
import { posix } from 'node:path';
import { test } from 'node:test';
import fc from 'fast-check';
import { isCocoonError } from '../../src/common/errors.ts';
import { DEFAULT_BUNDLE_LIMITS } from '../../src/builder/bundle-limits.ts';
import { checkSymlinksResolveInside, checkSymlinkTarget, normalizeEntryPath } from '../../src/builder/bundle-paths.ts';

const limits = { ...DEFAULT_BUNDLE_LIMITS };
const pathPart = fc.oneof(
  fc.constantFrom('..', '.', '', 'a', 'b', '..a', 'a..', '...', ' ', '\\', 'C:', '\u0000'),
  fc.string({ maxLength: 6 }),
);

test('property: an accepted entry name is relative, clean and stays under the root', () => {
  fc.assert(
    fc.property(fc.array(pathPart, { maxLength: 8 }), fc.boolean(), (parts, leadingSlash) => {
      const raw = `${leadingSlash ? '/' : ''}${parts.join('/')}`;
      let path: string;
      try {
        path = normalizeEntryPath(raw, limits);
      } catch (error) {
        assert.ok(isCocoonError(error, 'invalid_bundle'), String(error));
        return;
      }
      assert.ok(!path.startsWith('/'));
      const segments = path === '' ? [] : path.split('/');
      assert.ok(segments.every((s) => s !== '' && s !== '.' && s !== '..'));
      const joined = posix.join('/root', path);
      assert.ok(joined === '/root' || joined.startsWith('/root/'), `${JSON.stringify(raw)} → ${joined}`);
    }),
    { numRuns: 2000 },
  );
});

test('property: a symlink accepted by both checks resolves inside, following every link', () => {
  // Random small trees of links between a few names; an independent resolver follows them
  // with an explicit root and must never climb above it when both checks passed.
  const name = fc.constantFrom('a', 'b', 'c', 'd/e', 'd');
  const target = fc.array(fc.constantFrom('a', 'b', 'c', 'd', 'e', '..', '.'), { minLength: 1, maxLength: 4 }).map((p) => p.join('/'));
  fc.assert(
    fc.property(fc.uniqueArray(fc.tuple(name, target), { selector: ([n]) => n, maxLength: 4 }), (pairs) => {
      const links = new Map(pairs);
      let accepted = true;
      try {
        for (const [path, to] of links) checkSymlinkTarget(path, to, limits);
        checkSymlinksResolveInside(links);
      } catch (error) {
        assert.ok(isCocoonError(error, 'invalid_bundle'));
        accepted = false;
      }
      if (!accepted) return;
      for (const [path, to] of links) assert.ok(resolvesInside(path, to, links), `${path} -> ${to} in ${JSON.stringify(pairs)}`);
    }),
    { numRuns: 2000 },
  );
});

/** A second, recursive resolver: depth counts from the root; false if it goes negative. */
function resolvesInside(path: string, to: string, links: Map<string, string>, hops = 0): boolean {
  if (hops > 40) return true; // loops are refused separately
  const dir = posix.dirname(path) === '.' ? [] : posix.dirname(path).split('/');
  const stack = [...dir];
  const parts = to.split('/');
  for (let i = 0; i < parts.length; i++) {
    const part = parts[i] as string;
    if (part === '.' || part === '') continue;
    if (part === '..') {
      if (stack.length === 0) return false;
      stack.pop();
      continue;
    }
    stack.push(part);
    const link = links.get(stack.join('/'));
    if (link !== undefined) {
      const linkPath = stack.join('/');
      const rest = parts.slice(i + 1).join('/');
      const combined = rest ? `${link}/${rest}` : link;
      return resolvesInside(linkPath, combined, links, hops + 1);
    }
  }
  return true;
}

test('names that are refused say why', () => {
  const cases: Array<[string, RegExp]> = [
    ['x/../../etc', /entry 'x\/\.\.\/\.\.\/etc' escapes the bundle/],
    ['/abs', /absolute path/],
    ['a\u0001b/../../c', /'a\\x01b\/\.\.\/\.\.\/c' escapes/],
    [`${'d/'.repeat(70)}f`, /71 directories deep/],
    ['x'.repeat(256), /longer than 255 bytes/],
  ];
  for (const [raw, reason] of cases) {
    assert.throws(() => normalizeEntryPath(raw, limits), (e) => isCocoonError(e, 'invalid_bundle') && reason.test(e.message), raw);
  }
  assert.equal(normalizeEntryPath('./a//b/./c/', limits), 'a/b/c');
  assert.equal(normalizeEntryPath('./', limits), '');
});
