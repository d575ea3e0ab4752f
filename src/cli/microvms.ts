/** `cocoon vm start|list|get|suspend|resume|fork|checkpoint|terminate|token|curl|logs`. */
import fs from 'node:fs';
import type { Command } from 'commander';
import {
  gatewayTarget,
  MICROVM_STATES,
  type MicroVM,
  type MicroVMState,
  type StartMicroVMInput,
} from '../../packages/sdk/src/index.ts';
import { action, collect, collectInt, int } from './args.ts';
import type { Cli } from './context.ts';
import { registerCopyCommand } from './cp.ts';
import { registerExecCommands } from './exec.ts';
import { CliError, EXIT, UsageError } from './exit-codes.ts';
import { fields, relative, table } from './format.ts';

const MAX_SESSION = 28_800;

function vmDetails(vm: MicroVM): string {
  const p = vm.idlePolicy;
  return fields([
    ['id', vm.id],
    ['arn', vm.arn],
    ['image', vm.image],
    ['state', vm.state],
    ['error', vm.error],
    ['url', vm.url],
    ['idle policy', p ? `suspend after ${p.maxIdleDurationSeconds}s idle; ${p.autoResumeEnabled ? 'a request wakes it' : 'resume through the API only'}; ${p.suspendedDurationSeconds ? `terminate after ${p.suspendedDurationSeconds}s suspended` : 'stays suspended until the session ends'}` : undefined],
    ['created', `${vm.createdAt} (${relative(vm.createdAt)})`],
    ['session ends', `${vm.expiresAt} (${relative(vm.expiresAt)})`],
    ['last activity', vm.lastActivityAt ? relative(vm.lastActivityAt) : undefined],
  ]);
}

function parseStates(values: string[] | undefined): MicroVMState[] | undefined {
  if (!values?.length) return undefined;
  const states = values.flatMap((v) => v.split(',')).map((v) => v.trim().toUpperCase());
  for (const state of states) {
    if (!MICROVM_STATES.includes(state as MicroVMState)) throw new UsageError(`unknown microVM state ${state}; one of ${MICROVM_STATES.join(', ')}`);
  }
  return states as MicroVMState[];
}

/** How to reach the microVM with plain curl (on 127.0.0.1 for *.localhost gateways). */
function curlExample(vm: MicroVM, token: string): string {
  const target = gatewayTarget(vm, '/');
  return `curl -H 'X-Cocoon-Token: ${token}'${target.microvmHeader ? ` -H 'X-Cocoon-MicroVM: ${vm.id}'` : ''} ${target.url}`;
}

/** With a visible step for humans: waits until `vm` is in `states` (after an API call that may answer early). */
async function settle(cli: Cli, vm: MicroVM, states: MicroVMState[], timeoutSeconds: number): Promise<MicroVM> {
  if (states.includes(vm.state)) return vm;
  return cli.client().microvms.waitForState(vm.id, states, { timeoutMs: timeoutSeconds * 1000 });
}

interface StartOptions {
  maxIdle?: number;
  autoResume: boolean;
  suspendedDuration?: number;
  maxDuration?: number;
  clientToken?: string;
  wait: boolean;
  waitTimeout: number;
}

interface CurlOptions {
  request?: string;
  data?: string;
  header: string[];
  include?: boolean;
  port?: number;
  token?: string;
  fail?: boolean;
}

function readData(data: string): Buffer {
  if (!data.startsWith('@')) return Buffer.from(data);
  const file = data.slice(1);
  try {
    return file === '-' ? fs.readFileSync(0) : fs.readFileSync(file);
  } catch (error) {
    throw new UsageError(`cannot read ${file}: ${(error as NodeJS.ErrnoException).code ?? String(error)}`);
  }
}

export function registerMicrovmCommands(program: Command): void {
  const vm = program.command('vm').description('start and manage microVMs');

  vm
    .command('start')
    .description('start a microVM from a READY image (restored from its snapshot); prints its URL and a token')
    .argument('<image>', 'image id or ARN')
    .option('--max-idle <seconds>', 'suspend after this long without traffic (default 300)', int(1, MAX_SESSION))
    .option('--no-auto-resume', 'do not wake on a request while suspended (resume through the API)')
    .option('--suspended-duration <seconds>', 'terminate after this long suspended (default: when the session ends)', int(1, MAX_SESSION))
    .option('--max-duration <seconds>', `end the session after this long (default and maximum ${MAX_SESSION})`, int(1, MAX_SESSION))
    .option('--client-token <token>', 'makes the start idempotent: the same token returns the same microVM')
    .option('--no-wait', 'answer at once instead of waiting until it is RUNNING')
    .option('--wait-timeout <seconds>', 'give up waiting after this long', int(1, 86400), 600)
    .action(action<StartOptions>(async (cli, [image], options) => {
      const input: StartMicroVMInput = { image: image! };
      const idlePolicy: NonNullable<StartMicroVMInput['idlePolicy']> = {};
      if (options.maxIdle !== undefined) idlePolicy.maxIdleDurationSeconds = options.maxIdle;
      if (!options.autoResume) idlePolicy.autoResumeEnabled = false;
      if (options.suspendedDuration !== undefined) idlePolicy.suspendedDurationSeconds = options.suspendedDuration;
      if (Object.keys(idlePolicy).length) input.idlePolicy = idlePolicy;
      if (options.maxDuration !== undefined) input.maximumDurationSeconds = options.maxDuration;
      if (options.clientToken !== undefined) input.clientToken = options.clientToken;
      const client = cli.client();
      const started = await client.microvms.start(input);
      cli.progress(`MicroVM ${started.id} is ${started.state}`);
      let current: MicroVM = started;
      if (options.wait && started.state !== 'RUNNING') {
        cli.progress('Booting: restoring the snapshot…');
        current = await settle(cli, started, ['RUNNING'], options.waitTimeout);
      }
      const answer = { ...started, ...current, token: started.token, tokenId: started.tokenId, tokenExpiresAt: started.tokenExpiresAt };
      cli.result(answer, () => {
        const lines = [`${current.state === 'RUNNING' ? '✓ ' : ''}${current.id} is ${current.state}`, fields([['url', current.url], ['token', started.token], ['token expires', started.tokenExpiresAt ? relative(started.tokenExpiresAt) : undefined]])];
        lines.push('Next:', `  cocoon vm curl ${current.id} /`);
        if (started.token) lines.push(`  ${curlExample(current, started.token)}`);
        return lines;
      });
    }));

  vm
    .command('list')
    .alias('ls')
    .description('list your microVMs, newest first')
    .option('--state <state>', `only these states, comma-separated or repeated (${MICROVM_STATES.join(', ')})`, collect)
    .option('--image <image>', 'only microVMs of this image (id or ARN)')
    .option('--limit <n>', 'at most this many per page (1-1000)', int(1, 1000))
    .option('--cursor <cursor>', 'the page after this cursor')
    .option('--all', 'every page')
    .action(action<{ state?: string[]; image?: string; limit?: number; cursor?: string; all?: boolean }>(async (cli, _args, options) => {
      const client = cli.client();
      const params = { state: parseStates(options.state), image: options.image, limit: options.limit, cursor: options.cursor };
      let items: MicroVM[];
      let nextCursor: string | null = null;
      if (options.all) {
        items = [];
        for await (const item of client.microvms.iterate(params)) items.push(item);
      } else {
        ({ items, nextCursor } = await client.microvms.list(params));
      }
      cli.result({ items, nextCursor }, () => {
        if (items.length === 0) return 'No microVMs. Start one: cocoon vm start <image>';
        const rows = items.map((m) => [m.id, m.image.split('/').pop() ?? m.image, m.state, m.url, ['TERMINATED', 'FAILED'].includes(m.state) ? '' : relative(m.expiresAt), relative(m.createdAt)]);
        const lines = [table(['ID', 'IMAGE', 'STATE', 'URL', 'SESSION ENDS', 'CREATED'], rows)];
        if (nextCursor) lines.push(`More: cocoon vm list --cursor ${nextCursor} (or --all)`);
        return lines;
      });
    }));

  vm
    .command('get')
    .description('show a microVM')
    .argument('<microvm>', 'microVM id or ARN')
    .action(action(async (cli, [id]) => {
      const found = await cli.client().microvms.get(id!);
      cli.result(found, () => vmDetails(found));
    }));

  vm
    .command('suspend')
    .description('suspend: memory and disk saved as files, no process left; a request (or resume) wakes it')
    .argument('<microvm>', 'microVM id or ARN')
    .option('--wait-timeout <seconds>', 'give up waiting after this long', int(1, 86400), 300)
    .action(action<{ waitTimeout: number }>(async (cli, [id], options) => {
      cli.progress(`Snapshotting ${id}…`);
      const done = await settle(cli, await cli.client().microvms.suspend(id!), ['SUSPENDED'], options.waitTimeout);
      cli.result(done, () => [`✓ ${done.id} is ${done.state}`, `Wake it: cocoon vm resume ${done.id} (or send it a request)`]);
    }));

  vm
    .command('resume')
    .description('resume a SUSPENDED microVM')
    .argument('<microvm>', 'microVM id or ARN')
    .option('--wait-timeout <seconds>', 'give up waiting after this long', int(1, 86400), 300)
    .action(action<{ waitTimeout: number }>(async (cli, [id], options) => {
      cli.progress(`Resuming ${id}: restoring its snapshot…`);
      const done = await settle(cli, await cli.client().microvms.resume(id!), ['RUNNING'], options.waitTimeout);
      cli.result(done, () => `✓ ${done.id} is ${done.state}`);
    }));

  vm
    .command('fork')
    .description("fork a RUNNING or SUSPENDED microVM: new microVMs that each continue its memory, disk and processes from now, on their own")
    .argument('<microvm>', 'microVM id or ARN')
    .option('--count <n>', 'how many forks (1-16)', int(1, 16), 1)
    .option('--suspended', 'leave the forks SUSPENDED (none is started; each wakes on its first request or resume): cheap when many are made')
    .action(action<{ count: number; suspended?: boolean }>(async (cli, [id], options) => {
      cli.progress(`Forking ${id} ${options.count}×${options.suspended ? ', left suspended' : ''}…`);
      const forked = await cli.client().microvms.fork(id!, { count: options.count, ...(options.suspended ? { suspended: true } : {}) });
      cli.result(forked, () => {
        const lines = [
          `✓ ${forked.items.length} fork${forked.items.length === 1 ? '' : 's'} of ${id} (the source was paused ${forked.sourcePausedMs} ms)`,
          table(['ID', 'STATE', 'URL', 'TOKEN'], forked.items.map((f) => [f.id, f.state, f.url, f.token ?? ''])),
        ];
        const first = forked.items[0];
        if (first && options.suspended) lines.push(`Wake one: cocoon vm resume ${first.id} (or send it a request: cocoon vm curl ${first.id} /)`);
        else if (first) lines.push('Next:', `  cocoon vm curl ${first.id} /`);
        return lines;
      });
    }));

  vm
    .command('checkpoint')
    .description("save a microVM's state as a new image version; microVMs started from it begin exactly there")
    .argument('<microvm>', 'microVM id or ARN')
    .argument('[name]', "the image's name (default: the source image's name, as a new version)")
    .option('--no-wait', 'answer at once instead of waiting until the image is READY')
    .option('--wait-timeout <seconds>', 'give up waiting after this long', int(1, 86400), 600)
    .action(action<{ wait: boolean; waitTimeout: number }>(async (cli, [id, name], options) => {
      const client = cli.client();
      cli.progress(`Checkpointing ${id}…`);
      let image = await client.microvms.checkpoint(id!, name ? { name } : {});
      if (options.wait && image.state !== 'READY') image = await client.images.waitUntilReady(image.id, { timeoutMs: options.waitTimeout * 1000 });
      cli.result(image, () => [`${image.state === 'READY' ? '✓ ' : ''}${image.arn} is ${image.state}`, 'Next:', `  cocoon vm start ${image.id}`]);
    }));

  vm
    .command('terminate')
    .alias('rm')
    .description('terminate a microVM: its VM and files are removed, its URL answers 410')
    .argument('<microvm>', 'microVM id or ARN')
    .action(action(async (cli, [id]) => {
      cli.progress(`Terminating ${id}…`);
      const client = cli.client();
      await client.microvms.terminate(id!);
      const after = await client.microvms.get(id!).catch(() => undefined);
      cli.result({ id, state: after?.state ?? 'TERMINATED' }, () => `✓ ${id} is ${after?.state ?? 'TERMINATED'}`);
    }));

  vm
    .command('token')
    .description("make a gateway token for a microVM (or list / revoke its tokens)")
    .argument('<microvm>', 'microVM id or ARN')
    .option('--expiration-minutes <n>', 'valid this long, 1-60 (default 60)', int(1, 60))
    .option('--port <port>', 'allow only this guest port (repeat or comma-separate; default all)', collectInt(1, 65535))
    .option('--scope <scope>', 'http (web requests to the app, the default) or shell (a terminal through the gateway: cocoon vm shell --token)')
    .option('--list', "list the microVM's tokens instead (never their secrets)")
    .option('--revoke <tokenId>', 'revoke this token instead (at once)')
    .action(action<{ expirationMinutes?: number; port?: number[]; scope?: string; list?: boolean; revoke?: string }>(async (cli, [id], options) => {
      const client = cli.client();
      if (options.list && options.revoke) throw new UsageError('give --list or --revoke, not both');
      if (options.list) {
        const items = await client.tokens.list(id!);
        cli.result({ items }, () => items.length === 0 ? 'No tokens.' : table(
          ['ID', 'PORTS', 'EXPIRES', 'STATUS'],
          items.map((t) => [t.id, portsText(t.allowedPorts), relative(t.expiresAt), t.revokedAt ? 'revoked' : Date.parse(t.expiresAt) < Date.now() ? 'expired' : 'active']),
        ));
        return;
      }
      if (options.revoke) {
        await client.tokens.revoke(id!, options.revoke);
        cli.result({ revoked: options.revoke }, () => `Revoked token ${options.revoke}`);
        return;
      }
      const input: { expirationMinutes?: number; allowedPorts?: number[]; scope?: 'http' | 'shell' } = {};
      if (options.scope !== undefined) {
        if (options.scope !== 'http' && options.scope !== 'shell') throw new UsageError(`--scope is http or shell, got ${options.scope}`);
        input.scope = options.scope;
      }
      if (options.expirationMinutes !== undefined) input.expirationMinutes = options.expirationMinutes;
      if (options.port?.length) input.allowedPorts = options.port;
      const issued = await client.tokens.create(id!, input);
      cli.result(issued, () => {
        const lines = [issued.token, `(token ${issued.id}; expires ${relative(issued.expiresAt)}; ports ${portsText(issued.allowedPorts)})`];
        return lines;
      });
    }));

  vm
    .command('curl')
    .description('send a request to the microVM through the gateway, with a fresh token filled in')
    .argument('<microvm>', 'microVM id or ARN')
    .argument('[path]', 'path and query on the app', '/')
    .option('-X, --request <method>', 'HTTP method (default GET, or POST with -d)')
    .option('-d, --data <data>', 'request body; @file reads a file, @- standard input')
    .option('-H, --header <header>', "extra header 'Name: value' (repeatable)", collect, [])
    .option('-i, --include', 'print the status line and headers too')
    .option('--port <port>', "another guest port than the image's (X-Cocoon-Port)", int(1, 65535))
    .option('--token <token>', 'use this token instead of making one')
    .option('--fail', 'exit 1 when the answer is 400 or more')
    .action(action<CurlOptions>(async (cli, [id, path], options) => {
      const headers: Record<string, string> = {};
      for (const header of options.header) {
        const colon = header.indexOf(':');
        if (colon <= 0) throw new UsageError(`a header is 'Name: value', got ${JSON.stringify(header)}`);
        headers[header.slice(0, colon).trim().toLowerCase()] = header.slice(colon + 1).trim();
      }
      const body = options.data !== undefined ? readData(options.data) : undefined;
      const method = (options.request ?? (body ? 'POST' : 'GET')).toUpperCase();
      if (!/^[A-Z]{1,20}$/.test(method)) throw new UsageError(`not an HTTP method: ${options.request}`);
      const target = path!.startsWith('/') ? path! : `/${path}`;
      const response = await cli.client().microvms.fetch(id!, target, {
        method,
        headers,
        ...(body ? { body } : {}),
        ...(options.port !== undefined ? { port: options.port } : {}),
        ...(options.token !== undefined ? { token: options.token } : {}),
      });
      const bytes = Buffer.from(await response.arrayBuffer());
      if (cli.json) {
        cli.result({ status: response.status, headers: Object.fromEntries(response.headers), body: bytes.toString('utf8') }, () => '');
      } else {
        if (options.include) {
          const head = [`HTTP/1.1 ${response.status} ${response.statusText}`, ...[...response.headers].map(([k, v]) => `${k}: ${v}`), '', ''];
          process.stdout.write(head.join('\r\n'));
        }
        process.stdout.write(bytes);
      }
      if (options.fail && response.status >= 400) {
        throw new CliError('http_error', `the app answered ${response.status}`, EXIT.failure);
      }
    }));

  vm
    .command('logs')
    .description("print a microVM's console and lifecycle log")
    .argument('<microvm>', 'microVM id or ARN')
    .action(action(async (cli, [id]) => {
      const log = await cli.client().microvms.logs(id!);
      if (cli.json) cli.result({ log }, () => '');
      else process.stdout.write(log);
    }));

  registerExecCommands(vm);
  registerCopyCommand(vm);
}

/** A token's ports for humans: "8080,9000-9010", or "all". */
function portsText(ports: ReadonlyArray<number | { from: number; to: number }> | null | undefined): string {
  return ports?.map((p) => (typeof p === 'number' ? String(p) : `${p.from}-${p.to}`)).join(',') ?? 'all';
}
