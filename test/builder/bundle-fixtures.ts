/**
 * Archive builders for the bundle tests. Real tools refuse to make hostile archives, so these
 * write tar headers (with tar's own Header encoder) and zip records byte by byte, which lets a
 * test put any name, type, mode, link target or lying size into an otherwise valid archive.
 */
import { mkdtemp, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { deflateRawSync, crc32, gzipSync } from 'node:zlib';
import { Header, type types } from 'tar';

type EntryTypeName = types.EntryTypeName;

export interface TarSpec {
  path: string;
  type?: EntryTypeName;
  data?: Buffer | string;
  linkpath?: string;
  mode?: number;
  /** Announce this size instead of the data's. */
  size?: number;
}

export function tarEntry(spec: TarSpec): Buffer {
  const data = Buffer.from(spec.data ?? '');
  const header = new Header({
    path: spec.path,
    type: spec.type ?? 'File',
    mode: spec.mode ?? 0o644,
    size: spec.size ?? data.length,
    mtime: new Date('2026-01-01T00:00:00Z'),
    uid: 0,
    gid: 0,
    uname: 'root',
    gname: 'root',
    ...(spec.linkpath !== undefined ? { linkpath: spec.linkpath } : {}),
  });
  const block = Buffer.alloc(512);
  header.encode(block, 0);
  const padding = Buffer.alloc((512 - (data.length % 512)) % 512);
  return Buffer.concat([block, data, padding]);
}

/** A tar stream: the entries and the two end-of-archive blocks. */
export function tarball(entries: TarSpec[]): Buffer {
  return Buffer.concat([...entries.map(tarEntry), Buffer.alloc(1024)]);
}

export function tarGz(entries: TarSpec[]): Buffer {
  return gzipSync(tarball(entries));
}

export const DOCKERFILE: TarSpec = { path: 'Dockerfile', data: 'FROM busybox\nCMD ["httpd", "-f"]\n' };

export interface ZipSpec {
  name: string;
  data?: Buffer | string;
  /** Unix st_mode (type and permissions), e.g. 0o100644, 0o120777 (symlink), 0o020644 (device). */
  unixMode?: number;
  method?: 'store' | 'deflate' | number;
  /** Lie about the uncompressed size / CRC in both headers. */
  declaredSize?: number;
  crc?: number;
  encrypted?: boolean;
  /** Host in "version made by": 3 = Unix (default), 0 = MS-DOS. */
  host?: number;
  externalAttributes?: number;
}

export function zipArchive(entries: ZipSpec[]): Buffer {
  const locals: Buffer[] = [];
  const centrals: Buffer[] = [];
  let offset = 0;
  for (const entry of entries) {
    const name = Buffer.from(entry.name, 'utf8');
    const data = Buffer.from(entry.data ?? '');
    const methodCode = entry.method === 'store' ? 0 : entry.method === undefined || entry.method === 'deflate' ? 8 : entry.method;
    const body = methodCode === 8 ? deflateRawSync(data) : data;
    const crc = entry.crc ?? crc32(data);
    const size = entry.declaredSize ?? data.length;
    const flags = 0x0800 | (entry.encrypted ? 1 : 0);
    const host = entry.host ?? 3;
    const mode = entry.unixMode ?? (entry.name.endsWith('/') ? 0o040755 : 0o100644);
    const external = entry.externalAttributes ?? (host === 3 ? (mode << 16) >>> 0 : 0);

    const local = Buffer.alloc(30);
    local.writeUInt32LE(0x04034b50, 0);
    local.writeUInt16LE(20, 4);
    local.writeUInt16LE(flags, 6);
    local.writeUInt16LE(methodCode, 8);
    local.writeUInt16LE(0, 10);
    local.writeUInt16LE(0x5c21, 12); // 2026-01-01
    local.writeUInt32LE(crc >>> 0, 14);
    local.writeUInt32LE(body.length, 18);
    local.writeUInt32LE(size, 22);
    local.writeUInt16LE(name.length, 26);
    local.writeUInt16LE(0, 28);
    locals.push(local, name, body);

    const central = Buffer.alloc(46);
    central.writeUInt32LE(0x02014b50, 0);
    central.writeUInt16LE((host << 8) | 20, 4);
    central.writeUInt16LE(20, 6);
    central.writeUInt16LE(flags, 8);
    central.writeUInt16LE(methodCode, 10);
    central.writeUInt16LE(0, 12);
    central.writeUInt16LE(0x5c21, 14);
    central.writeUInt32LE(crc >>> 0, 16);
    central.writeUInt32LE(body.length, 20);
    central.writeUInt32LE(size, 24);
    central.writeUInt16LE(name.length, 28);
    central.writeUInt16LE(0, 30);
    central.writeUInt16LE(0, 32);
    central.writeUInt16LE(0, 34);
    central.writeUInt16LE(0, 36);
    central.writeUInt32LE(external >>> 0, 38);
    central.writeUInt32LE(offset, 42);
    centrals.push(central, name);
    offset += local.length + name.length + body.length;
  }
  const directory = Buffer.concat(centrals);
  const end = Buffer.alloc(22);
  end.writeUInt32LE(0x06054b50, 0);
  end.writeUInt16LE(entries.length, 8);
  end.writeUInt16LE(entries.length, 10);
  end.writeUInt32LE(directory.length, 12);
  end.writeUInt32LE(offset, 16);
  return Buffer.concat([...locals, directory, end]);
}

export const ZIP_DOCKERFILE: ZipSpec = { name: 'Dockerfile', data: 'FROM busybox\n' };

/** A temp directory to unpack into (as `<dir>/ctx`), removed after the test. */
export async function workDir(t: { after: (fn: () => Promise<void>) => void }): Promise<{ parent: string; dest: string }> {
  const parent = await mkdtemp(join(tmpdir(), 'cocoon-bundle-test-'));
  t.after(() => rm(parent, { recursive: true, force: true }));
  return { parent, dest: join(parent, 'ctx') };
}

/** Everything under `dir`, relative, sorted ('/' after directories). */
export async function tree(dir: string): Promise<string[]> {
  const entries = await readdir(dir, { recursive: true, withFileTypes: true });
  return entries
    .map((e) => {
      const rel = join(e.parentPath, e.name).slice(dir.length + 1);
      return e.isDirectory() ? `${rel}/` : e.isSymbolicLink() ? `${rel}@` : rel;
    })
    .sort();
}
