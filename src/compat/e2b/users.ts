/**
 * Who a guest user is, for envd's calls: uid, gid and home of a user name (or of the image's
 * USER when none is named), and the names behind uids and gids (EntryInfo's owner and group).
 * Asked of the guest once per microVM and user (`id` and /etc/passwd through the exec service),
 * then cached: E2B resolves relative paths against the user's home and writes files as that user.
 */
import type { ExecService } from '../../exec/types.ts';

export interface GuestUser {
  uid: number;
  gid: number;
  name: string;
  home: string;
}

const MAX_TABLE_BYTES = 1024 * 1024;
const MAX_CACHED_VMS = 1024;

async function readAll(exec: ExecService, tenantId: string, microvmId: string, path: string): Promise<string> {
  try {
    const { body } = await exec.readFile(tenantId, microvmId, path);
    const chunks: Buffer[] = [];
    let size = 0;
    for await (const chunk of body as AsyncIterable<Buffer>) {
      size += chunk.length;
      if (size > MAX_TABLE_BYTES) break;
      chunks.push(chunk);
    }
    return Buffer.concat(chunks).toString('utf8');
  } catch {
    return '';
  }
}

function table(text: string): Map<number, string> {
  const names = new Map<number, string>();
  for (const line of text.split('\n')) {
    const [name, , id] = line.split(':');
    if (name && id && /^[0-9]+$/.test(id) && !names.has(Number(id))) names.set(Number(id), name);
  }
  return names;
}

export class GuestUsers {
  readonly #exec: ExecService;
  readonly #users = new Map<string, Promise<GuestUser>>();
  readonly #names = new Map<string, Promise<{ users: Map<number, string>; groups: Map<number, string> }>>();

  constructor(exec: ExecService) {
    this.#exec = exec;
  }

  /** `name` undefined: the image's USER (the exec service's default). */
  user(tenantId: string, microvmId: string, name: string | undefined): Promise<GuestUser> {
    const key = `${microvmId}\0${name ?? ''}`;
    let found = this.#users.get(key);
    if (!found) {
      if (this.#users.size > MAX_CACHED_VMS) this.#users.clear();
      found = this.#lookup(tenantId, microvmId, name);
      this.#users.set(key, found);
      found.catch(() => this.#users.delete(key));
    }
    return found;
  }

  async #lookup(tenantId: string, microvmId: string, name: string | undefined): Promise<GuestUser> {
    const session = await this.#exec.exec(tenantId, microvmId, {
      command: ['/bin/sh', '-c', 'id -u; id -g; id -un; printf "%s\\n" "$HOME"'],
      ...(name !== undefined ? { user: name } : {}),
    });
    let out = '';
    let failed: string | undefined;
    for await (const event of session.events()) {
      if (event.type === 'stdout' && out.length < 65536) out += event.data.toString('utf8');
      else if (event.type === 'error') failed = event.error.message;
      else if (event.type === 'exit' && event.exitCode !== 0) failed = `id exited with ${event.exitCode}`;
    }
    const [uid, gid, user, home] = out.split('\n');
    if (failed || !uid || !gid || !/^[0-9]+$/.test(uid) || !/^[0-9]+$/.test(gid)) {
      throw new Error(`cannot resolve the guest user ${name ?? '(default)'}: ${failed ?? 'unexpected output'}`);
    }
    return { uid: Number(uid), gid: Number(gid), name: user || name || uid, home: home?.startsWith('/') ? home : '/' };
  }

  names(tenantId: string, microvmId: string): Promise<{ users: Map<number, string>; groups: Map<number, string> }> {
    let found = this.#names.get(microvmId);
    if (!found) {
      if (this.#names.size > MAX_CACHED_VMS) this.#names.clear();
      found = Promise.all([
        readAll(this.#exec, tenantId, microvmId, '/etc/passwd'),
        readAll(this.#exec, tenantId, microvmId, '/etc/group'),
      ]).then(([p, g]) => ({ users: table(p), groups: table(g) }));
      this.#names.set(microvmId, found);
      found.catch(() => this.#names.delete(microvmId));
    }
    return found;
  }

  forget(microvmId: string): void {
    for (const key of this.#users.keys()) if (key.startsWith(`${microvmId}\0`)) this.#users.delete(key);
    this.#names.delete(microvmId);
  }
}
