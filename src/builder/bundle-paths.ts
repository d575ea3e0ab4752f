import { posix } from 'node:path';
import { invalidBundle, quoteName } from './bundle-errors.ts';
import type { BundleLimits } from './bundle-limits.ts';

/** Linux's limit for one file name. */
const MAX_NAME_BYTES = 255;
/** Linux follows at most 40 symlinks when resolving a path. */
const MAX_SYMLINK_HOPS = 40;

/**
 * An archive entry's name as a clean relative path (`a/b/c`, no '.', no empty parts; '' for the
 * root itself), or an `invalid_bundle` error saying what is wrong with it. Names are refused,
 * not repaired: a bundle with '/etc/x' or 'a/../../b' in it was made by mistake or by an
 * attacker, and silently extracting something else would surprise either.
 */
export function normalizeEntryPath(raw: string, limits: BundleLimits, what = 'entry'): string {
  const shown = `${what} ${quoteName(raw)}`;
  if (raw.length === 0) throw invalidBundle(`an ${what} has an empty name`);
  if (raw.includes('\0')) throw invalidBundle(`${shown} has a NUL character in its name`);
  if (raw.includes('\\')) throw invalidBundle(`${shown} uses '\\' in its name; bundles use '/' between directories`);
  if (raw.startsWith('/')) throw invalidBundle(`${shown} has an absolute path; names must be relative to the bundle's root`);
  if (/^[A-Za-z]:/.test(raw)) throw invalidBundle(`${shown} looks like a Windows absolute path`);
  const parts = raw.split('/').filter((part) => part !== '' && part !== '.');
  if (parts.includes('..')) {
    const resolved = posix.normalize(parts.join('/'));
    if (resolved === '..' || resolved.startsWith('../')) throw invalidBundle(`${shown} escapes the bundle`);
    throw invalidBundle(`${shown} contains '..'; names in a bundle must not go up a directory`);
  }
  if (parts.length > limits.maxPathDepth) {
    throw invalidBundle(`${shown} is ${parts.length} directories deep; the limit is ${limits.maxPathDepth}`);
  }
  for (const part of parts) {
    if (Buffer.byteLength(part) > MAX_NAME_BYTES) throw invalidBundle(`${shown} has a name part longer than ${MAX_NAME_BYTES} bytes`);
  }
  const path = parts.join('/');
  if (Buffer.byteLength(path) > limits.maxPathLength) {
    throw invalidBundle(`${shown} has a path longer than ${limits.maxPathLength} bytes`);
  }
  return path;
}

/**
 * First check of a symlink's target, on its text alone: it must be relative and, resolved
 * from the link's directory without following other links, stay inside the bundle.
 * `checkSymlinksResolveInside` later follows the links themselves.
 */
export function checkSymlinkTarget(linkPath: string, target: string, limits: BundleLimits): void {
  const shown = `symlink ${quoteName(linkPath)}`;
  if (target.length === 0) throw invalidBundle(`${shown} has an empty target`);
  if (target.includes('\0')) throw invalidBundle(`${shown} has a NUL character in its target`);
  if (Buffer.byteLength(target) > limits.maxPathLength) {
    throw invalidBundle(`${shown} has a target longer than ${limits.maxPathLength} bytes`);
  }
  if (target.startsWith('/')) throw invalidBundle(`${shown} points to the absolute path ${quoteName(target)}, outside the bundle`);
  const resolved = posix.normalize(posix.join(posix.dirname(linkPath), target));
  if (resolved === '..' || resolved.startsWith('../')) {
    throw invalidBundle(`${shown} points outside the bundle (${quoteName(target)})`);
  }
}

/**
 * Resolves every symlink the way the kernel would, following links through links, with the
 * bundle's root as the top: `links` maps each symlink's clean path to its target. Textual
 * checks alone miss chains such as `d -> .` and `e -> d/d/..`, which only escape once `d` is
 * followed. Throws `invalid_bundle` for a link that ends up outside, or a loop.
 */
export function checkSymlinksResolveInside(links: ReadonlyMap<string, string>): void {
  for (const [linkPath, target] of links) {
    const stack = posix.dirname(linkPath) === '.' ? [] : posix.dirname(linkPath).split('/');
    const pending = target.split('/');
    let hops = 0;
    while (pending.length > 0) {
      const part = pending.shift() as string;
      if (part === '' || part === '.') continue;
      if (part === '..') {
        if (stack.length === 0) {
          throw invalidBundle(`symlink ${quoteName(linkPath)} resolves outside the bundle (through other links)`);
        }
        stack.pop();
        continue;
      }
      stack.push(part);
      const next = links.get(stack.join('/'));
      if (next !== undefined) {
        if (++hops > MAX_SYMLINK_HOPS) throw invalidBundle(`symlink ${quoteName(linkPath)} is part of a loop of links`);
        if (next.startsWith('/')) throw invalidBundle(`symlink ${quoteName(linkPath)} leads to an absolute path`);
        stack.pop(); // the link is replaced by its target, relative to the link's directory
        pending.unshift(...next.split('/'));
      }
    }
  }
}
