/**
 * What every API command needs: the server's URL and an API key, found in this order —
 * flags (`--api-url`, `--api-key`), environment (`COCOON_API_URL`, `COCOON_API_KEY`), then a
 * local server's data directory (`--data-dir`, `COCOON_DATA_DIR`, default `./.cocoon`: its
 * `api-url` and `admin-api-key` files) — and how to print for humans or, with `--json`, for
 * scripts.
 */
import fs from 'node:fs';
import path from 'node:path';
import type { Command } from 'commander';
import {
  Cocoon,
  CocoonApiError,
  CocoonConnectionError,
  CocoonTimeoutError,
  ImageBuildFailedError,
  InvalidArgumentError,
  MicroVMStateError,
} from '../../packages/sdk/src/index.ts';
import { setting } from '../common/settings.ts';
import { CliError, EXIT, exitCodeFor, UsageError } from './exit-codes.ts';
import { wsFactory } from './websocket.ts';

export interface GlobalOptions {
  apiUrl?: string;
  apiKey?: string;
  dataDir?: string;
  json?: boolean;
}

export interface Resolved {
  apiUrl: string;
  apiUrlFrom: string;
  apiKey: string | undefined;
  apiKeyFrom: string | undefined;
  dataDir: string;
}

function readFirstLine(file: string): string | undefined {
  try {
    const line = fs.readFileSync(file, 'utf8').split('\n')[0]?.trim();
    return line ? line : undefined;
  } catch {
    return undefined;
  }
}

export function resolveSettings(options: GlobalOptions, env: NodeJS.ProcessEnv = process.env): Resolved {
  const dataDir = path.resolve(options.dataDir ?? setting('COCOON_DATA_DIR', env));
  let apiUrl: string;
  let apiUrlFrom: string;
  const urlFile = readFirstLine(path.join(dataDir, 'api-url'));
  if (options.apiUrl) [apiUrl, apiUrlFrom] = [options.apiUrl, '--api-url'];
  else if (env.COCOON_API_URL) [apiUrl, apiUrlFrom] = [env.COCOON_API_URL, 'COCOON_API_URL'];
  else if (urlFile) [apiUrl, apiUrlFrom] = [urlFile, `${path.join(dataDir, 'api-url')}`];
  else {
    const host = setting('COCOON_HOST', env);
    apiUrl = `http://${host.includes(':') ? `[${host}]` : host}:${setting('COCOON_API_PORT', env)}`;
    apiUrlFrom = 'the default';
  }
  let apiKey: string | undefined;
  let apiKeyFrom: string | undefined;
  const keyFile = path.join(dataDir, 'admin-api-key');
  if (options.apiKey) [apiKey, apiKeyFrom] = [options.apiKey, '--api-key'];
  else if (env.COCOON_API_KEY) [apiKey, apiKeyFrom] = [env.COCOON_API_KEY, 'COCOON_API_KEY'];
  else {
    apiKey = readFirstLine(keyFile);
    apiKeyFrom = apiKey ? keyFile : undefined;
  }
  return { apiUrl, apiUrlFrom, apiKey, apiKeyFrom, dataDir };
}

/** One command's run: settings, the SDK client, output. */
export class Cli {
  readonly options: GlobalOptions;
  readonly settings: Resolved;
  readonly json: boolean;
  #client: Cocoon | undefined;

  constructor(command: Command) {
    this.options = command.optsWithGlobals() as GlobalOptions;
    this.json = Boolean(this.options.json);
    this.settings = resolveSettings(this.options);
  }

  /** The SDK client; throws (exit 4) when no API key is configured anywhere. */
  client(options: { anonymous?: boolean } = {}): Cocoon {
    if (!this.settings.apiKey && !options.anonymous) {
      throw new CliError(
        'no_api_key',
        'no API key',
        EXIT.auth,
        `pass --api-key, set COCOON_API_KEY, or run next to a server's data directory (${this.settings.dataDir}/admin-api-key)`,
      );
    }
    this.#client ??= new Cocoon({ apiUrl: this.settings.apiUrl, apiKey: this.settings.apiKey, webSocket: wsFactory });
    return this.#client;
  }

  /** The result: JSON on stdout with --json, else `human()`'s text. */
  result(value: unknown, human: () => string | string[]): void {
    if (this.json) {
      process.stdout.write(`${JSON.stringify(value, null, 2)}\n`);
      return;
    }
    const text = human();
    const lines = Array.isArray(text) ? text.join('\n') : text;
    if (lines) process.stdout.write(lines.endsWith('\n') ? lines : `${lines}\n`);
  }

  /** Progress for humans (never with --json). */
  progress(text: string): void {
    if (!this.json) process.stdout.write(`${text}\n`);
  }
}

/** What to do next, for the errors users meet most. */
function hintFor(error: unknown, settings: Resolved | undefined): string | undefined {
  if (error instanceof CliError) return error.hint;
  if (error instanceof CocoonConnectionError) {
    return `start a server with \`npm start\` (or \`cocoon serve\`), or point --api-url / COCOON_API_URL at one (tried ${settings?.apiUrl ?? error.url}, from ${settings?.apiUrlFrom ?? 'settings'})`;
  }
  if (error instanceof CocoonApiError) {
    if (error.kind === 'unauthenticated') {
      return `check the API key (from ${settings?.apiKeyFrom ?? 'nowhere'}); a server's admin key is in <data dir>/admin-api-key, and \`cocoon tenant create\` makes keys for tenants`;
    }
    if (error.kind === 'forbidden') return 'this needs the admin API key';
    if (error.kind === 'not_found') {
      if (/image/.test(error.code)) return 'list your images with `cocoon image list`';
      if (/microvm/.test(error.code)) return 'list your microVMs with `cocoon vm list`';
      if (/token/.test(error.code)) return 'list the tokens with `cocoon vm token <id> --list`';
      if (/api_key/.test(error.code)) return 'list your keys with `cocoon apikey list`';
    }
    if (error.code === 'image_not_ready') return 'wait for the build: `cocoon image logs -f <image>`';
  }
  if (error instanceof ImageBuildFailedError) return `read the build log: cocoon image logs ${error.image.id}`;
  if (error instanceof MicroVMStateError) return `see what happened: cocoon vm get ${error.microvm.id}`;
  if (error instanceof CocoonTimeoutError) return 'the server may still be working; check again with `get`';
  return undefined;
}

function codeFor(error: unknown): string {
  if (error instanceof CliError) return error.code;
  if (error instanceof UsageError || error instanceof InvalidArgumentError) return 'usage';
  if (error instanceof CocoonApiError) return error.code;
  if (error instanceof CocoonConnectionError) return 'unreachable';
  if (error instanceof CocoonTimeoutError) return 'timeout';
  if (error instanceof ImageBuildFailedError) return 'image_failed';
  if (error instanceof MicroVMStateError) return 'microvm_state';
  return 'error';
}

/** Prints an error (JSON with --json) on stderr and returns the exit code. */
export function reportError(error: unknown, json: boolean, settings?: Resolved): number {
  const exitCode = exitCodeFor(error);
  const message = error instanceof Error ? error.message : String(error);
  const hint = hintFor(error, settings);
  if (json) {
    const body: Record<string, unknown> = { code: codeFor(error), message, exitCode };
    if (error instanceof CocoonApiError) body.status = error.status;
    if (hint) body.hint = hint;
    process.stderr.write(`${JSON.stringify({ error: body })}\n`);
  } else {
    process.stderr.write(`cocoon: ${message}\n`);
    if (hint) process.stderr.write(`  → ${hint}\n`);
  }
  return exitCode;
}
