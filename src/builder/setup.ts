/**
 * Host readiness for the builder, and a command to prepare a machine once:
 *
 *   node src/builder/setup.ts      # checks the tools, seeds the base images (idempotent)
 *
 * Nothing in /etc is edited: buildah's storage defaults (overlay under /var/lib/containers)
 * are used as they are, and short-name resolution is given to buildah per build (buildah.ts).
 */
import { access, constants } from 'node:fs';
import { promisify } from 'node:util';
import { delimiter, join } from 'node:path';
import { ensureBaseImages } from './base-images.ts';
import { setting } from '../common/settings.ts';

const accessAsync = promisify(access);

/** Programs the builder runs, and the Debian package that brings each. */
const TOOLS: Array<{ bin: string; pkg: string }> = [
  { bin: 'buildah', pkg: 'buildah' },
  { bin: 'runc', pkg: 'runc' },
  { bin: 'iptables', pkg: 'iptables' },
  { bin: 'mkfs.ext4', pkg: 'e2fsprogs' },
  { bin: 'debootstrap', pkg: 'debootstrap' },
  { bin: 'flock', pkg: 'util-linux' },
  { bin: 'tar', pkg: 'tar' },
  { bin: 'du', pkg: 'coreutils' },
];

/** Files that are not programs on PATH. */
const FILES: Array<{ path: string; pkg: string }> = [
  { path: '/usr/lib/cni/bridge', pkg: 'containernetworking-plugins' },
  { path: setting('COCOON_BUSYBOX'), pkg: 'busybox-static' },
];

export interface HostCheck {
  ok: boolean;
  /** One line per missing piece, naming the package to install. */
  problems: string[];
}

/** Whether this host has what builds need (run as root: buildah's storage is the system one). */
export async function checkBuilderHost(): Promise<HostCheck> {
  const problems: string[] = [];
  if (process.getuid?.() !== 0) problems.push('the builder runs buildah as root: start Cocoon as root');
  const dirs = (process.env.PATH ?? '').split(delimiter).filter(Boolean);
  for (const t of TOOLS) {
    let found = false;
    for (const d of [...dirs, '/usr/sbin', '/sbin']) {
      if (await accessAsync(join(d, t.bin), constants.X_OK).then(() => true, () => false)) {
        found = true;
        break;
      }
    }
    if (!found) problems.push(`${t.bin} is missing: apt-get install ${t.pkg}`);
  }
  for (const f of FILES) {
    if (!(await accessAsync(f.path).then(() => true, () => false))) problems.push(`${f.path} is missing: apt-get install ${f.pkg}`);
  }
  return { ok: problems.length === 0, problems };
}

if (import.meta.main) {
  const check = await checkBuilderHost();
  for (const p of check.problems) console.error(`builder: ${p}`);
  if (!check.ok) process.exit(1);
  const results = await ensureBaseImages({ onLog: (l) => { if (!l.startsWith('debootstrap: I: ')) console.log(l); } });
  for (const r of results) console.log(`${r.name}: ${r.seeded ? 'seeded' : 'present'} (${Math.round(r.ms)} ms)`);
}
