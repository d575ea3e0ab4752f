/**
 * The workload file `/.cocoon/workload` (docs/guest-protocol.md): how cocoon-init starts the
 * image's process. Pure functions: argv as Docker combines ENTRYPOINT and CMD, the environment,
 * USER resolved against the image's /etc/passwd and /etc/group, and the file's text.
 */
import { CocoonError } from '../common/errors.ts';

export interface WorkloadConfig {
  argv: string[];
  env: string[];
  cwd: string;
  uid: number;
  gid: number;
  /** Supplementary group ids. */
  groups: number[];
  /** Hook name (`run`, `suspend`, `resume`, `terminate`) → shell command. */
  hooks?: Record<string, string>;
}

export const DEFAULT_PATH = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin';

/** What cocoon-init accepts (src/guest/init/cocoon-init.c). */
export const WORKLOAD_LIMITS = { args: 256, env: 512, groups: 64, bytes: 1024 * 1024, hooks: 8 } as const;

/**
 * argv as Docker runs it: ENTRYPOINT followed by CMD. Shell forms are already stored as
 * `["/bin/sh", "-c", "…"]` in the image config, and an ENTRYPOINT instruction has already reset
 * an inherited CMD, so plain concatenation is Docker's rule.
 */
export function combineArgv(entrypoint: readonly string[], cmd: readonly string[]): string[] {
  return [...entrypoint, ...cmd];
}

/**
 * The process environment: the image's ENV (a later duplicate wins, in the first one's place),
 * PATH defaulted as Docker does, HOME from the user's passwd entry unless set.
 */
export function buildEnv(imageEnv: readonly string[], home: string): string[] {
  const map = new Map<string, string>();
  for (const entry of imageEnv) {
    const eq = entry.indexOf('=');
    const name = eq < 0 ? entry : entry.slice(0, eq);
    if (name === '') continue;
    map.set(name, eq < 0 ? '' : entry.slice(eq + 1));
  }
  if (!map.has('PATH')) map.set('PATH', DEFAULT_PATH);
  if (!map.has('HOME')) map.set('HOME', home || '/');
  return [...map].map(([k, v]) => `${k}=${v}`);
}

export interface PasswdEntry { name: string; uid: number; gid: number; home: string }
export interface GroupEntry { name: string; gid: number; members: string[] }

export function parsePasswd(text: string): PasswdEntry[] {
  const out: PasswdEntry[] = [];
  for (const line of text.split('\n')) {
    if (!line || line.startsWith('#') || line.startsWith('+') || line.startsWith('-')) continue;
    const f = line.split(':');
    if (f.length < 4) continue;
    const uid = parseId(f[2]!);
    const gid = parseId(f[3]!);
    if (uid === undefined || gid === undefined) continue;
    out.push({ name: f[0]!, uid, gid, home: f[5] ?? '' });
  }
  return out;
}

export function parseGroup(text: string): GroupEntry[] {
  const out: GroupEntry[] = [];
  for (const line of text.split('\n')) {
    if (!line || line.startsWith('#') || line.startsWith('+') || line.startsWith('-')) continue;
    const f = line.split(':');
    if (f.length < 3) continue;
    const gid = parseId(f[2]!);
    if (gid === undefined) continue;
    out.push({ name: f[0]!, gid, members: (f[3] ?? '').split(',').map((m) => m.trim()).filter(Boolean) });
  }
  return out;
}

function parseId(s: string): number | undefined {
  if (!/^\d{1,10}$/.test(s)) return undefined;
  const n = Number(s);
  return n <= 0xfffffffe ? n : undefined;
}

export interface ResolvedUser {
  uid: number;
  gid: number;
  groups: number[];
  home: string;
  /** The passwd name, when the user is in /etc/passwd. */
  name: string | undefined;
}

/**
 * Resolves a Dockerfile USER (`name`, `uid`, `name:group`, `uid:gid`, or empty for root) the way
 * Docker (runc's GetExecUser) does: a name must exist in /etc/passwd, a number need not (gid then
 * 0); the primary group comes from passwd unless `:group` names one (by name from /etc/group, or
 * a number); supplementary groups are those listing the user as a member, unless a group was named.
 */
export function resolveUser(spec: string, passwdText: string | undefined, groupText: string | undefined): ResolvedUser {
  const trimmed = spec.trim();
  const colon = trimmed.indexOf(':');
  const userArg = colon < 0 ? trimmed : trimmed.slice(0, colon);
  const groupArg = colon < 0 ? '' : trimmed.slice(colon + 1);
  const passwd = parsePasswd(passwdText ?? '');
  const groups = parseGroup(groupText ?? '');

  let uid: number;
  let gid = 0;
  let home = '/';
  let name: string | undefined;
  if (userArg === '') {
    uid = 0;
  } else if (/^\d+$/.test(userArg)) {
    const n = parseId(userArg);
    if (n === undefined) throw userError(`USER ${JSON.stringify(spec)}: ${userArg} is not a valid user id (0–4294967294).`);
    uid = n;
  } else {
    const entry = passwd.find((p) => p.name === userArg);
    if (!entry) {
      throw userError(`USER ${JSON.stringify(spec)}: no user named ${JSON.stringify(userArg)} in the image's /etc/passwd` +
        `${passwdText === undefined ? ' (the image has no /etc/passwd)' : ''}. ` +
        'Create the user in the Dockerfile (e.g. RUN adduser / useradd, or append to /etc/passwd) or use a numeric id.');
    }
    uid = entry.uid;
  }
  const entry = passwd.find((p) => p.uid === uid && (userArg === '' || /^\d+$/.test(userArg) || p.name === userArg));
  if (entry) {
    gid = entry.gid;
    home = entry.home || '/';
    name = entry.name;
  }

  let supplementary: number[] = [];
  if (groupArg !== '') {
    if (/^\d+$/.test(groupArg)) {
      const n = parseId(groupArg);
      if (n === undefined) throw userError(`USER ${JSON.stringify(spec)}: ${groupArg} is not a valid group id.`);
      gid = n;
    } else {
      const g = groups.find((x) => x.name === groupArg);
      if (!g) {
        throw userError(`USER ${JSON.stringify(spec)}: no group named ${JSON.stringify(groupArg)} in the image's /etc/group` +
          `${groupText === undefined ? ' (the image has no /etc/group)' : ''}. Create the group in the Dockerfile or use a numeric id.`);
      }
      gid = g.gid;
    }
  } else if (name !== undefined) {
    supplementary = [...new Set(groups.filter((g) => g.members.includes(name!)).map((g) => g.gid))];
  }
  if (supplementary.length > WORKLOAD_LIMITS.groups) {
    throw userError(`USER ${JSON.stringify(spec)} belongs to ${supplementary.length} groups; at most ${WORKLOAD_LIMITS.groups} are supported.`);
  }
  return { uid, gid, groups: supplementary, home, name };
}

function userError(message: string): CocoonError {
  return new CocoonError('unknown_user', message, { status: 422 });
}

/** Escapes a value for the workload file: backslash, newline, tab. */
export function escapeValue(value: string): string {
  if (value.includes('\0')) {
    throw new CocoonError('invalid_workload', 'A command argument or environment value contains a NUL byte, which a process cannot receive.', { status: 422 });
  }
  return value.replace(/\\/g, '\\\\').replace(/\n/g, '\\n').replace(/\t/g, '\\t');
}

/** The inverse of escapeValue, as cocoon-init decodes (`\x` → `x` for other characters). */
export function unescapeValue(value: string): string {
  return value.replace(/\\(.)/g, (_, c: string) => (c === 'n' ? '\n' : c === 't' ? '\t' : c));
}

/** The text of `/.cocoon/workload`. */
export function renderWorkload(w: WorkloadConfig): string {
  if (w.argv.length > WORKLOAD_LIMITS.args) {
    throw new CocoonError('invalid_workload', `The command has ${w.argv.length} arguments; at most ${WORKLOAD_LIMITS.args} are supported.`, { status: 422 });
  }
  if (w.env.length > WORKLOAD_LIMITS.env) {
    throw new CocoonError('invalid_workload', `The image sets ${w.env.length} environment variables; at most ${WORKLOAD_LIMITS.env} are supported.`, { status: 422 });
  }
  const hooks = Object.entries(w.hooks ?? {});
  if (hooks.length > WORKLOAD_LIMITS.hooks) {
    throw new CocoonError('invalid_workload', `At most ${WORKLOAD_LIMITS.hooks} hooks are supported.`, { status: 422 });
  }
  const lines = ['# Written by the Cocoon builder; read by cocoon-init (docs/guest-protocol.md).'];
  for (const a of w.argv) lines.push(`arg ${escapeValue(a)}`);
  for (const e of w.env) lines.push(`env ${escapeValue(e)}`);
  lines.push(`cwd ${escapeValue(w.cwd || '/')}`);
  lines.push(`uid ${w.uid}`, `gid ${w.gid}`);
  if (w.groups.length) lines.push(`groups ${w.groups.join(',')}`);
  for (const [name, cmd] of hooks) {
    if (!/^[a-z][a-z0-9_-]*$/.test(name)) {
      throw new CocoonError('invalid_workload', `Hook name ${JSON.stringify(name)} is not valid (lowercase letters, digits, - and _).`, { status: 400 });
    }
    lines.push(`hook.${name} ${escapeValue(cmd)}`);
  }
  const text = lines.join('\n') + '\n';
  if (Buffer.byteLength(text) > WORKLOAD_LIMITS.bytes) {
    throw new CocoonError('invalid_workload', 'The workload description (command and environment) exceeds 1 MiB.', { status: 422 });
  }
  return text;
}

/** Reads a workload file back (as cocoon-init does), for tests and diagnostics. */
export function parseWorkload(text: string): WorkloadConfig {
  const w: WorkloadConfig = { argv: [], env: [], cwd: '/', uid: 0, gid: 0, groups: [], hooks: {} };
  for (const line of text.split('\n')) {
    if (line === '' || line.startsWith('#')) continue;
    const sp = line.indexOf(' ');
    if (sp < 0) continue;
    const key = line.slice(0, sp);
    const value = unescapeValue(line.slice(sp + 1));
    if (key === 'arg') w.argv.push(value);
    else if (key === 'env') w.env.push(value);
    else if (key === 'cwd') w.cwd = value;
    else if (key === 'uid') w.uid = Number(value);
    else if (key === 'gid') w.gid = Number(value);
    else if (key === 'groups') w.groups = value.split(',').filter(Boolean).map(Number);
    else if (key.startsWith('hook.')) w.hooks![key.slice(5)] = value;
  }
  return w;
}

/** The app port from EXPOSE: the lowest TCP port (Docker keeps no order), or undefined. */
export function firstTcpPort(exposed: readonly string[]): number | undefined {
  const ports = exposed
    .map((p) => /^(\d+)(?:\/(tcp|udp|sctp))?$/i.exec(p.trim()))
    .filter((m): m is RegExpExecArray => m !== null && (m[2] ?? 'tcp').toLowerCase() === 'tcp')
    .map((m) => Number(m[1]))
    .filter((n) => n >= 1 && n <= 65535)
    .sort((a, b) => a - b);
  return ports[0];
}
