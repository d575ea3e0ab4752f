import { CocoonError, CocoonTimeoutError, MicroVMStateError } from './errors.ts';
import { sleep, segment, type CallOptions, type Transport } from './http.ts';
import { paginate } from './pagination.ts';
import type { Tokens } from './tokens.ts';
import type {
  CheckpointInput,
  ForkedMicroVMs,
  ForkMicroVMInput,
  Image,
  MicroVM,
  MicroVMListParams,
  MicroVMState,
  Page,
  StartedMicroVM,
  StartMicroVMInput,
} from './types.ts';

export interface MicroVMWaitOptions {
  signal?: AbortSignal;
  /** Give up after this long (default 5 minutes). */
  timeoutMs?: number;
  /** How often to ask (default 500 ms). */
  pollIntervalMs?: number;
  /** Called whenever the state changes. */
  onState?: (microvm: MicroVM) => void;
}

export interface GatewayRequestInit extends Omit<RequestInit, 'headers'> {
  headers?: Record<string, string>;
  /** A token to send; default: a fresh 5-minute token made for this request. */
  token?: string;
  /** Another guest port than the image's (the token must allow it). */
  port?: number;
  /** Milliseconds until the answer's headers (default: the client's timeout). */
  timeoutMs?: number;
}

/** States a microVM never leaves. */
const FINAL: readonly MicroVMState[] = ['TERMINATED', 'FAILED'];

export class MicroVMs {
  readonly #http: Transport;
  readonly #tokens: Tokens;
  readonly #gatewayUrl: string | undefined;

  constructor(http: Transport, tokens: Tokens, gatewayUrl: string | undefined) {
    this.#http = http;
    this.#tokens = tokens;
    this.#gatewayUrl = gatewayUrl;
  }

  /**
   * Starts a microVM from a READY image (restored from its snapshot). Answers at once with a
   * first gateway token; `waitForState(id, 'RUNNING')` waits for the boot.
   */
  start(input: StartMicroVMInput, options: CallOptions = {}): Promise<StartedMicroVM> {
    return this.#http.json<StartedMicroVM>({ method: 'POST', path: '/microvms', json: input, ...options });
  }

  list(params: MicroVMListParams = {}, options: CallOptions = {}): Promise<Page<MicroVM>> {
    const { limit, cursor, state, image } = params;
    return this.#http.json<Page<MicroVM>>({
      method: 'GET', path: '/microvms', query: { limit, cursor, state: state as string | string[] | undefined, image }, ...options,
    });
  }

  iterate(params: MicroVMListParams = {}, options: CallOptions = {}): AsyncGenerator<MicroVM, void, undefined> {
    return paginate((p) => this.list(p, options), params);
  }

  get(idOrArn: string, options: CallOptions = {}): Promise<MicroVM> {
    return this.#http.json<MicroVM>({ method: 'GET', path: `/microvms/${segment(idOrArn)}`, ...options });
  }

  /** Suspends: memory and disk become files, no process is left. Answers once done. */
  suspend(idOrArn: string, options: CallOptions = {}): Promise<MicroVM> {
    return this.#http.json<MicroVM>({ method: 'POST', path: `/microvms/${segment(idOrArn)}/suspend`, ...options });
  }

  /** Resumes a SUSPENDED microVM. Answers once RUNNING. */
  resume(idOrArn: string, options: CallOptions = {}): Promise<MicroVM> {
    return this.#http.json<MicroVM>({ method: 'POST', path: `/microvms/${segment(idOrArn)}/resume`, ...options });
  }

  /**
   * Forks a RUNNING or SUSPENDED microVM: `count` new microVMs (1–16) that each continue its
   * memory, disk and processes from this moment, on their own (own token, session, idle
   * policy, fresh RNG seed). A RUNNING source is paused for a few milliseconds; a SUSPENDED one
   * is not woken. Answers once the forks run (with `suspended: true`, once they are committed, SUSPENDED).
   */
  fork(idOrArn: string, input: ForkMicroVMInput = {}, options: CallOptions = {}): Promise<ForkedMicroVMs> {
    return this.#http.json<ForkedMicroVMs>({ method: 'POST', path: `/microvms/${segment(idOrArn)}/fork`, json: input, ...options });
  }

  /**
   * Saves the microVM's state as a new image version (of `input.name`, default the source
   * image's name). Answers at once with the image SNAPSHOTTING; `images.waitUntilReady(id)` (or
   * polling) sees it READY; microVMs started from it begin exactly there.
   */
  checkpoint(idOrArn: string, input: CheckpointInput = {}, options: CallOptions = {}): Promise<Image> {
    return this.#http.json<Image>({ method: 'POST', path: `/microvms/${segment(idOrArn)}/checkpoint`, json: input, ...options });
  }

  /** Terminates: the VM and its files are removed; the gateway then answers 410. */
  async terminate(idOrArn: string, options: CallOptions = {}): Promise<void> {
    await this.#http.send({ method: 'DELETE', path: `/microvms/${segment(idOrArn)}`, ...options });
  }

  /** The microVM's console and lifecycle log (text). */
  logs(idOrArn: string, options: CallOptions = {}): Promise<string> {
    return this.#http.text({ method: 'GET', path: `/microvms/${segment(idOrArn)}/logs`, headers: { accept: 'text/plain' }, ...options });
  }

  /** Waits until the microVM is in one of `states`; a final state not awaited rejects (MicroVMStateError). */
  async waitForState(idOrArn: string, states: MicroVMState | MicroVMState[], options: MicroVMWaitOptions = {}): Promise<MicroVM> {
    const wanted = Array.isArray(states) ? states : [states];
    const timeoutMs = options.timeoutMs ?? 5 * 60_000;
    const deadline = Date.now() + timeoutMs;
    let last: MicroVMState | undefined;
    for (;;) {
      const microvm = await this.get(idOrArn, { signal: options.signal });
      if (microvm.state !== last) {
        last = microvm.state;
        options.onState?.(microvm);
      }
      if (wanted.includes(microvm.state)) return microvm;
      if (FINAL.includes(microvm.state)) throw new MicroVMStateError(microvm, wanted);
      if (Date.now() >= deadline) {
        throw new CocoonTimeoutError(`waiting for microVM ${microvm.id} to be ${wanted.join(' or ')}`, timeoutMs);
      }
      await sleep(Math.min(options.pollIntervalMs ?? 500, Math.max(1, deadline - Date.now())), options.signal);
    }
  }

  /**
   * A web request to the microVM's app through the gateway, with a token filled in (a fresh
   * 5-minute one unless `init.token` is given). `*.localhost` gateway hosts are reached on
   * 127.0.0.1 with the microVM named by `X-Cocoon-MicroVM`.
   */
  async fetch(microvm: string | MicroVM, path = '/', init: GatewayRequestInit = {}): Promise<Response> {
    const vm = typeof microvm === 'string' ? await this.get(microvm, { signal: init.signal ?? undefined }) : microvm;
    const { token: given, port, timeoutMs, headers = {}, ...rest } = init;
    const token = given ?? (await this.#tokens.create(vm.id, { expirationMinutes: 5 }, { signal: init.signal ?? undefined })).token;
    const target = gatewayTarget(vm, path, this.#gatewayUrl);
    const sendHeaders: Record<string, string> = { ...headers, 'x-cocoon-token': token };
    if (target.microvmHeader) sendHeaders['x-cocoon-microvm'] = vm.id;
    if (port !== undefined) sendHeaders['x-cocoon-port'] = String(port);
    const limit = timeoutMs ?? this.#http.options.timeoutMs;
    const controller = new AbortController();
    const timer = limit > 0 ? setTimeout(() => controller.abort(new CocoonTimeoutError(`request to microVM ${vm.id}`, limit)), limit) : undefined;
    const onAbort = () => controller.abort(init.signal?.reason);
    init.signal?.addEventListener('abort', onAbort, { once: true });
    try {
      const requestInit: RequestInit & { duplex?: 'half' } = { ...rest, headers: sendHeaders, signal: controller.signal, redirect: rest.redirect ?? 'manual' };
      if (rest.body instanceof ReadableStream) requestInit.duplex = 'half';
      return await this.#http.options.fetch(target.url, requestInit);
    } catch (error) {
      if (controller.signal.reason instanceof CocoonTimeoutError) throw controller.signal.reason;
      if (init.signal?.aborted) throw init.signal.reason;
      throw new CocoonError(`cannot reach the gateway at ${target.url}: ${(error as Error).message}`, { cause: error });
    } finally {
      clearTimeout(timer);
      init.signal?.removeEventListener('abort', onAbort);
    }
  }
}

/** Where a request for `vm` goes: its URL, or `gatewayUrl` + the X-Cocoon-MicroVM header. */
export function gatewayTarget(vm: MicroVM, path: string, gatewayUrl?: string): { url: string; microvmHeader: boolean } {
  const suffix = path.startsWith('/') ? path : `/${path}`;
  if (gatewayUrl) return { url: `${gatewayUrl.replace(/\/+$/, '')}${suffix}`, microvmHeader: true };
  const url = new URL(vm.url);
  if (url.hostname === 'localhost' || url.hostname.endsWith('.localhost')) {
    // RFC 6761: *.localhost is loopback, but not every resolver (Node's among them) knows it.
    url.hostname = '127.0.0.1';
    return { url: `${url.origin}${suffix}`, microvmHeader: true };
  }
  return { url: `${url.origin}${suffix}`, microvmHeader: false };
}
