import { Bundles } from './bundles.ts';
import { Exec, Pty } from './exec.ts';
import { Files } from './files.ts';
import { DEFAULT_TIMEOUT_MS, normalizeApiUrl, Transport, type CallOptions } from './http.ts';
import { Images } from './images.ts';
import { MicroVMs } from './microvms.ts';
import { platformWebSocket, type WebSocketFactory } from './session.ts';
import { ApiKeys, Tenants } from './tenants.ts';
import { Tokens } from './tokens.ts';
import type { Health, ServerInfo } from './types.ts';

export interface CocoonOptions {
  /** The server, e.g. `http://127.0.0.1:7070` (default: `COCOON_API_URL`, else that). */
  apiUrl?: string;
  /** An API key (default: `COCOON_API_KEY`). */
  apiKey?: string;
  /** Per-request timeout in ms (default 60 000; 0: none). Calls may override it. */
  timeoutMs?: number;
  /** Where microVMs' web requests go, when their `url` is not reachable from here. */
  gatewayUrl?: string;
  /** A fetch implementation (default: the global one). */
  fetch?: typeof fetch;
  /** Extra headers on every API request. */
  headers?: Record<string, string>;
  /**
   * Makes the WebSockets of interactive sessions and PTYs (default: the platform's
   * `WebSocket`, which sends the API key in the first message). Node programs may pass one
   * built on `ws` that sends the Authorization header (see the CLI's `src/cli/websocket.ts`).
   */
  webSocket?: WebSocketFactory;
}

export const DEFAULT_API_URL = 'http://127.0.0.1:7070';

function env(name: string): string | undefined {
  const value = (globalThis as { process?: { env?: Record<string, string | undefined> } }).process?.env?.[name];
  return value === '' ? undefined : value;
}

/**
 * A client for one Cocoon server and one API key.
 *
 *   const cocoon = new Cocoon({ apiUrl: 'http://127.0.0.1:7070', apiKey })
 *   const { uri } = await cocoon.bundles.push('./my-app')
 *   const image = await cocoon.images.create({ name: 'my-app', bundle: uri })
 *   for await (const line of cocoon.images.logs(image.id, { follow: true })) console.log(line)
 *   await cocoon.images.waitUntilReady(image.id)
 *   const vm = await cocoon.microvms.start({ image: image.arn })
 *   const answer = await cocoon.microvms.fetch(vm, '/')
 */
export class Cocoon {
  readonly bundles: Bundles;
  readonly images: Images;
  readonly microvms: MicroVMs;
  readonly tokens: Tokens;
  readonly tenants: Tenants;
  readonly apiKeys: ApiKeys;
  /** Commands in a microVM: run, background processes, interactive sessions. */
  readonly exec: Exec;
  /** Files in a microVM. */
  readonly files: Files;
  /** Terminals in a microVM. */
  readonly pty: Pty;
  readonly #http: Transport;

  constructor(options: CocoonOptions = {}) {
    const fetchImpl = options.fetch ?? globalThis.fetch?.bind(globalThis);
    this.#http = new Transport({
      apiUrl: normalizeApiUrl(options.apiUrl ?? env('COCOON_API_URL') ?? DEFAULT_API_URL),
      apiKey: options.apiKey ?? env('COCOON_API_KEY'),
      timeoutMs: options.timeoutMs ?? DEFAULT_TIMEOUT_MS,
      fetch: fetchImpl,
      headers: options.headers ?? {},
    });
    this.bundles = new Bundles(this.#http);
    this.images = new Images(this.#http);
    this.tokens = new Tokens(this.#http);
    this.microvms = new MicroVMs(this.#http, this.tokens, options.gatewayUrl);
    this.tenants = new Tenants(this.#http);
    this.apiKeys = new ApiKeys(this.#http);
    const webSocket = options.webSocket ?? platformWebSocket;
    this.exec = new Exec({ http: this.#http, webSocket });
    this.files = new Files(this.#http);
    this.pty = new Pty(this.exec, webSocket, options.gatewayUrl);
  }

  /** The server's base URL (without /api/v1). */
  get apiUrl(): string {
    return this.#http.apiUrl;
  }

  /** Whether the server accepts work (no key needed). */
  async health(options: CallOptions = {}): Promise<Health> {
    try {
      return await this.#http.json<Health>({ method: 'GET', path: '/health', anonymous: true, ...options });
    } catch (error) {
      if ((error as { status?: number }).status === 503) return { status: 'starting' };
      throw error;
    }
  }

  /** Public facts about the server: version, region, where the gateway listens (no key needed). */
  info(options: CallOptions = {}): Promise<ServerInfo> {
    return this.#http.json<ServerInfo>({ method: 'GET', path: '/info', anonymous: true, ...options });
  }
}
