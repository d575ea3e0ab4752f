/** Writing small file trees for tests (bundles, app folders). */
import fs from 'node:fs';
import path from 'node:path';

/** File name → content, or a file with a mode, or a symbolic link. */
export type Tree = Record<string, string | { content: string; mode?: number } | { symlink: string }>;

/** Writes `files` under `dir`, making parent folders as needed. */
export function writeTree(dir: string, files: Tree): void {
  for (const [name, spec] of Object.entries(files)) {
    const file = path.join(dir, name);
    fs.mkdirSync(path.dirname(file), { recursive: true });
    if (typeof spec === 'string') fs.writeFileSync(file, spec);
    else if ('symlink' in spec) fs.symlinkSync(spec.symlink, file);
    else fs.writeFileSync(file, spec.content, { mode: spec.mode ?? 0o644 });
  }
}
