/**
 * Node only (loaded on demand by `bundles.push` when given a path): a `.tar.gz`/`.zip` file is
 * sent as is; a folder is packed into a tar.gz on the fly (streamed, never whole in memory).
 */
import fs from 'node:fs';
import path from 'node:path';
import { InvalidArgumentError } from './errors.ts';
import { gzip, tarStream, type TarEntry } from './tar.ts';

export interface BundleBody {
  body: Blob | ReadableStream<Uint8Array>;
  contentType: string;
  /** What was sent, for messages. */
  description: string;
}

/** The content type for the first bytes of an archive, or undefined when it is neither. */
export function sniffArchive(head: Uint8Array): 'application/gzip' | 'application/zip' | undefined {
  if (head[0] === 0x1f && head[1] === 0x8b) return 'application/gzip';
  if (head[0] === 0x50 && head[1] === 0x4b && (head[2] === 0x03 || head[2] === 0x05) && (head[3] === 0x04 || head[3] === 0x06)) {
    return 'application/zip';
  }
  return undefined;
}

export async function openBundlePath(source: string): Promise<BundleBody> {
  let stat: fs.Stats;
  try {
    stat = await fs.promises.stat(source);
  } catch (error) {
    throw new InvalidArgumentError(`cannot read ${source}: ${(error as NodeJS.ErrnoException).code ?? String(error)}`, { cause: error });
  }
  if (stat.isDirectory()) {
    if (!fs.existsSync(path.join(source, 'Dockerfile'))) {
      throw new InvalidArgumentError(`${source} has no Dockerfile at its root; a bundle is a folder with a Dockerfile`);
    }
    return { body: gzip(tarStream(walk(path.resolve(source)))), contentType: 'application/gzip', description: `folder ${source}` };
  }
  if (!stat.isFile()) throw new InvalidArgumentError(`${source} is neither a folder nor a file`);
  const blob = await fs.openAsBlob(source);
  const type = sniffArchive(new Uint8Array(await blob.slice(0, 4).arrayBuffer()));
  if (!type) throw new InvalidArgumentError(`${source} is not a .tar.gz or .zip archive (nor a folder)`);
  return { body: blob, contentType: type, description: `file ${source}` };
}

/** Every entry under `root`, depth first, sorted by name (the same folder packs the same way). */
async function* walk(root: string): AsyncGenerator<TarEntry> {
  async function* visit(dir: string, prefix: string): AsyncGenerator<TarEntry> {
    const names = (await fs.promises.readdir(dir)).sort();
    for (const name of names) {
      const full = path.join(dir, name);
      const rel = prefix ? `${prefix}/${name}` : name;
      const stat = await fs.promises.lstat(full);
      const mtime = Math.floor(stat.mtimeMs / 1000);
      if (stat.isDirectory()) {
        yield { type: 'directory', name: rel, mode: stat.mode, mtime };
        yield* visit(full, rel);
      } else if (stat.isFile()) {
        yield { type: 'file', name: rel, mode: stat.mode, mtime, size: stat.size, content: fs.createReadStream(full) };
      } else if (stat.isSymbolicLink()) {
        yield { type: 'symlink', name: rel, mode: 0o777, mtime, target: await fs.promises.readlink(full) };
      }
      // Sockets, FIFOs and devices have no place in a build context: skipped.
    }
  }
  yield* visit(root, '');
}
