/**
 * `cocoon vm exec [-i] [-t] <microvm> [--] <command...>` and `cocoon vm shell <microvm>`.
 *
 * Without -i/-t the command runs through the streamed exec API: stdout and stderr go to the
 * CLI's stdout and stderr as they come (back-pressured), and the CLI exits with the command's
 * code. `-i` forwards stdin and `-t` asks for a PTY; both use the exec WebSocket. `shell` is a
 * PTY running the user's login shell that follows the terminal's size.
 */
import type { Command } from 'commander';
import { Cocoon, isCocoonApiError, shellStatus, type ExecSession, type ExitStatus, type MicroVM, type SessionOptions } from '../../packages/sdk/src/index.ts';
import { action, collect, int } from './args.ts';
import type { Cli } from './context.ts';
import { CliError, UsageError } from './exit-codes.ts';
import { attachTerminal, terminalSize } from './terminal.ts';
import { wsFactory } from './websocket.ts';

/** The status `timeout(1)` uses for a command killed when its time ran out. */
export const TIMED_OUT_STATUS = 124;
/** What shells answer for a program that is not there, and for one that cannot be run. */
export const NOT_FOUND_STATUS = 127;
export const CANNOT_RUN_STATUS = 126;
/** The largest terminal the API takes. */
const MAX_SIZE = 1000;

/** A command that could not start exits as a shell would say (127, 126), with the guest's reason. */
function startFailure(error: unknown): unknown {
  if (isCocoonApiError(error) && error.code === 'command_not_found') return new CliError(error.code, error.message, NOT_FOUND_STATUS);
  if (isCocoonApiError(error) && error.code === 'exec_failed') return new CliError(error.code, error.message, CANNOT_RUN_STATUS);
  return error;
}

interface ExecOptions {
  interactive?: boolean;
  tty?: boolean;
  env: string[];
  workdir?: string;
  user?: string;
  timeout?: number;
}

export function parseEnv(pairs: string[]): Record<string, string> | undefined {
  if (pairs.length === 0) return undefined;
  const env: Record<string, string> = {};
  for (const pair of pairs) {
    const eq = pair.indexOf('=');
    const name = eq < 0 ? pair : pair.slice(0, eq);
    if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(name)) throw new UsageError(`--env takes NAME=value, got ${JSON.stringify(pair)}`);
    // `-e NAME` alone passes the CLI's own value, as docker does.
    const value = eq < 0 ? process.env[name] : pair.slice(eq + 1);
    if (value !== undefined) env[name] = value;
  }
  return env;
}

/** Writes `bytes` to `stream`, resolving once it may take more (back-pressure). */
function writeTo(stream: NodeJS.WriteStream, bytes: Uint8Array): Promise<void> | void {
  if (bytes.length === 0) return;
  if (stream.write(bytes)) return;
  return new Promise((resolve) => {
    const done = () => {
      stream.off('drain', done);
      stream.off('error', done);
      stream.off('close', done);
      resolve();
    };
    stream.once('drain', done);
    stream.once('error', done);
    stream.once('close', done);
  });
}

/** Says on stderr why a process ended when its code alone does not, and returns the CLI's status. */
function finish(cli: Cli, exit: ExitStatus, timeoutSeconds?: number): number {
  if (exit.timedOut) {
    if (!cli.json) process.stderr.write(`cocoon: the command ran out of time${timeoutSeconds ? ` (${timeoutSeconds} s)` : ''} and was killed\n`);
    return TIMED_OUT_STATUS;
  }
  if (exit.reason && !cli.json) process.stderr.write(`cocoon: the session ended: ${exit.reason}\n`);
  return shellStatus(exit);
}

/** Opens a session with these options (through the API, or through the gateway with a token). */
type Opener = (options: SessionOptions) => Promise<ExecSession>;

/** Runs an interactive session attached to this terminal; returns how it ended. */
async function interactive(open: Opener, spec: SessionOptions, forwardStdin: boolean): Promise<ExitStatus> {
  const size = terminalSize();
  // Writes are ordered: waiting for the last pending one of each stream waits for all.
  const pending = { stdout: Promise.resolve(), stderr: Promise.resolve() };
  const output = (stream: 'stdout' | 'stderr') => (_text: string, bytes: Uint8Array) => {
    const written = writeTo(process[stream], bytes);
    if (written) pending[stream] = written;
  };
  const session = await open({
    ...spec,
    ...(spec.tty ? { cols: Math.min(size?.cols ?? 80, MAX_SIZE), rows: Math.min(size?.rows ?? 24, MAX_SIZE) } : {}),
    onStdout: output('stdout'),
    onStderr: output('stderr'),
  });
  const detach = attachTerminal(session, { stdin: forwardStdin, tty: Boolean(spec.tty) });
  try {
    return await session.wait();
  } finally {
    detach();
    await Promise.all([pending.stdout, pending.stderr]);
  }
}

/** Through the API with the API key. */
function viaApi(cli: Cli, id: string): Opener {
  const client = cli.client();
  return (options) => client.exec.session(id, options);
}

/**
 * Through the gateway with a shell token (no API key): the gateway's address comes from the
 * server's public info, on the API's host.
 */
async function viaGateway(cli: Cli, id: string, token: string): Promise<Opener> {
  const client = cli.client({ anonymous: true });
  const info = await client.info();
  const host = new URL(cli.settings.apiUrl).hostname;
  const port = info.gateway.port ?? 7071;
  const microvm = { id, url: `http://${id}.${info.gateway.domain}:${port}` } as MicroVM;
  const direct = host === '127.0.0.1' || host === 'localhost' || host === '[::1]';
  const gateway = direct ? undefined : `http://${host.includes(':') ? `[${host}]` : host}:${port}`;
  const viaHost = new Cocoon({ apiUrl: cli.settings.apiUrl, webSocket: wsFactory, ...(gateway ? { gatewayUrl: gateway } : {}) });
  return ({ onStdout, onStderr: _stderr, ...options }) => viaHost.pty.openWithToken(microvm, token, { ...options, onData: onStdout });
}

export function registerExecCommands(vm: Command): void {
  vm
    .command('exec')
    .description('run a command in a microVM; exits with its exit code (stdout and stderr kept apart)')
    .argument('<microvm>', 'microVM id or ARN')
    .argument('<command...>', 'the program and its arguments (no shell: use sh -c \'…\' for pipes and variables)')
    .option('-i, --interactive', 'forward standard input to the command')
    .option('-t, --tty', 'give the command a terminal (PTY); with -i for interactive programs')
    .option('-e, --env <NAME=value>', 'set an environment variable (repeatable)', collect, [])
    .option('-w, --workdir <dir>', 'working directory in the microVM (default: the image\'s WORKDIR)')
    .option('-u, --user <user>', 'run as this user name or uid (default: the image\'s USER)')
    .option('--timeout <seconds>', `kill the command after this long (exit ${TIMED_OUT_STATUS})`, int(1, 86_400))
    .addHelpText('after', `
Everything after the microVM is the command, its options included:
  cocoon vm exec mvm-… ls -l /
  cocoon vm exec mvm-… sh -c 'echo $HOME | wc -c'
  cocoon vm exec -i mvm-… sh -c 'cat > /tmp/in' < local-file
  cocoon vm exec -it mvm-… top
The exit status is the command's (128 + n for a signal, ${TIMED_OUT_STATUS} when --timeout killed it);
cocoon's own failures use its exit codes (3: no such microVM, 6: server unreachable…).`)
    .action(action<ExecOptions>(async (cli, args, options) => {
      const [id, words = []] = args as unknown as [string, string[] | undefined];
      if (words.length === 0) throw new UsageError('say which command to run: cocoon vm exec <microvm> <command...>');
      const spec = {
        env: parseEnv(options.env),
        ...(options.workdir !== undefined ? { cwd: options.workdir } : {}),
        ...(options.user !== undefined ? { user: options.user } : {}),
        ...(options.timeout !== undefined ? { timeoutSeconds: options.timeout } : {}),
      };
      if (spec.env === undefined) delete spec.env;
      if (spec.cwd !== undefined && !spec.cwd.startsWith('/')) throw new UsageError(`--workdir must be an absolute path in the microVM, got ${spec.cwd}`);
      if (options.interactive || options.tty) {
        if (cli.json) throw new UsageError('--json does not go with -i or -t (an interactive session has no single result)');
        const exit = await interactive(viaApi(cli, id), { ...spec, command: words, tty: Boolean(options.tty) }, Boolean(options.interactive)).catch((error: unknown) => {
          throw startFailure(error);
        });
        process.exitCode = finish(cli, exit, options.timeout);
        return;
      }
      const client = cli.client();
      let pid: number | undefined;
      const forward = (signal: NodeJS.Signals) => () => {
        if (pid !== undefined) void client.exec.signal(id, pid, signal).catch(() => undefined);
      };
      const handlers = (['SIGINT', 'SIGTERM', 'SIGHUP'] as const).map((signal) => [signal, forward(signal)] as const);
      for (const [signal, handler] of handlers) process.on(signal, handler);
      try {
        const result = await client.exec.run(id, words, {
          ...spec,
          onStart: (started: number) => (pid = started),
          // With --json the output is part of the one JSON document; otherwise it streams.
          maxOutputBytes: cli.json ? undefined : 0,
          ...(cli.json ? {} : {
            onStdout: (_text: string, bytes: Uint8Array) => writeTo(process.stdout, bytes),
            onStderr: (_text: string, bytes: Uint8Array) => writeTo(process.stderr, bytes),
          }),
        });
        if (cli.json) cli.result(result, () => '');
        process.exitCode = finish(cli, result, options.timeout);
      } catch (error) {
        throw startFailure(error);
      } finally {
        for (const [signal, handler] of handlers) process.off(signal, handler);
      }
    }));

  vm
    .command('shell')
    .description('an interactive shell in a microVM (a PTY that follows this terminal\'s size); exits with the shell\'s status')
    .argument('<microvm>', 'microVM id or ARN')
    .option('-u, --user <user>', 'log in as this user name or uid (default: the image\'s USER)')
    .option('-w, --workdir <dir>', 'start in this folder')
    .option('-e, --env <NAME=value>', 'set an environment variable (repeatable)', collect, [])
    .option('--command <command>', 'run this (by /bin/sh -c) instead of the login shell')
    .option('--token <token>', 'a shell token (cocoon vm token <id> --scope shell): through the gateway, no API key needed')
    .addHelpText('after', `
Keys go to the microVM as typed: Ctrl-C interrupts the program there, Ctrl-D ends the shell.`)
    .action(action<{ user?: string; workdir?: string; env: string[]; command?: string; token?: string }>(async (cli, [id], options) => {
      if (cli.json) throw new UsageError('--json does not go with shell');
      const env = parseEnv(options.env);
      const open = options.token ? await viaGateway(cli, id!, options.token) : viaApi(cli, id!);
      const exit = await interactive(open, {
        tty: true,
        ...(options.command !== undefined ? { command: options.command } : {}),
        ...(env ? { env } : {}),
        ...(options.user !== undefined ? { user: options.user } : {}),
        ...(options.workdir !== undefined ? { cwd: options.workdir } : {}),
      }, true);
      process.exitCode = finish(cli, exit);
    }));
}
