/** `cocoon vm cp <src> <dst>`: files and folders between this host and a microVM (see copy.ts). */
import type { Command } from 'commander';
import { action } from './args.ts';
import type { Cli } from './context.ts';
import { copy, localSide, remoteSide } from './copy.ts';
import { UsageError } from './exit-codes.ts';
import { formatBytes } from './format.ts';

export type CopyEnd = { kind: 'local'; path: string } | { kind: 'microvm'; microvm: string; path: string };

/**
 * `<microvm>:<path>` names a path in a microVM (the microVM an id such as `mvm-…`, or its ARN);
 * anything else is a local path. As with docker cp, a local path with a colon in it is written
 * as `./name:with:colons` (a path that starts with `/` or `.` is always local).
 */
export function parseCopyEnd(arg: string): CopyEnd {
  if (arg === '') throw new UsageError('an empty path');
  if (arg.startsWith('/') || arg.startsWith('.')) return { kind: 'local', path: arg };
  const arn = /^(arn:[^:/]+:[^:/]*:[^:/]*:microvm\/[^:/]+):(.*)$/.exec(arg);
  const plain = arn ?? /^([^:/]+):(.*)$/.exec(arg);
  if (!plain) return { kind: 'local', path: arg };
  const [, microvm, guestPath] = plain as unknown as [string, string, string];
  if (guestPath === '') throw new UsageError(`say which path in ${microvm}: ${microvm}:/path`);
  if (!guestPath.startsWith('/')) {
    throw new UsageError(`paths in a microVM are absolute: ${microvm}:/${guestPath.replace(/^\.\//, '')}, not ${arg}`);
  }
  return { kind: 'microvm', microvm, path: guestPath };
}

export function registerCopyCommand(vm: Command): void {
  vm
    .command('cp')
    .description('copy files and folders between this host and a microVM (like docker cp)')
    .argument('<src>', 'a local path, or <microvm>:<path>')
    .argument('<dst>', 'a local path, or <microvm>:<path>')
    .addHelpText('after', `
One side is <microvm>:<absolute path>, the other a local path:
  cocoon vm cp ./app.py mvm-…:/srv/app.py      # a file in
  cocoon vm cp ./site mvm-…:/srv               # a folder in: /srv/site
  cocoon vm cp ./site/. mvm-…:/srv/www         # a folder's contents into /srv/www
  cocoon vm cp mvm-…:/var/log ./logs           # a folder out
A file onto a folder goes into it; a folder onto a missing path becomes that path. Modes are
kept; symbolic links inside folders and special files are skipped (with a warning).`)
    .action(action(async (cli: Cli, [srcArg, dstArg]) => {
      const src = parseCopyEnd(srcArg!);
      const dst = parseCopyEnd(dstArg!);
      if (src.kind === 'microvm' && dst.kind === 'microvm') {
        throw new UsageError('both paths are in microVMs: copy to this host first, then on to the other microVM');
      }
      if (src.kind === 'local' && dst.kind === 'local') {
        throw new UsageError('neither path is in a microVM: write one as <microvm>:<path>, e.g. mvm-…:/tmp');
      }
      const client = cli.client();
      const local = localSide();
      const warn = (line: string) => process.stderr.write(`${line}\n`);
      const report = src.kind === 'microvm'
        ? await copy(remoteSide(client, src.microvm), src.path, local, dst.path, warn)
        : await copy(local, src.path, remoteSide(client, (dst as { microvm: string }).microvm), dst.path, warn);
      const where = dst.kind === 'microvm' ? `${dst.microvm}:${report.target}` : report.target;
      cli.result({ ...report, target: where }, () => {
        const parts = [`${report.files} file${report.files === 1 ? '' : 's'}`];
        if (report.folders) parts.push(`${report.folders} folder${report.folders === 1 ? '' : 's'}`);
        const lines = [`✓ Copied ${parts.join(', ')} (${formatBytes(report.bytes)}) to ${where}`];
        if (report.skipped.length) lines.push(`Skipped ${report.skipped.length} (see above).`);
        return lines;
      });
    }));
}
