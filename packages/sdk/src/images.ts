import { ImageBuildFailedError, CocoonTimeoutError } from './errors.ts';
import { lines, sleep, segment, type CallOptions, type Transport } from './http.ts';
import { paginate } from './pagination.ts';
import type { CreateImageInput, Image, ImageListParams, ImageState, Page } from './types.ts';

export interface LogOptions extends CallOptions {
  /** Stream the log until the build ends (an async iterable of lines). */
  follow?: boolean;
}

export interface WaitOptions {
  signal?: AbortSignal;
  /** Give up after this long (default 30 minutes for a build). */
  timeoutMs?: number;
  /** How often to ask (default 1000 ms). */
  pollIntervalMs?: number;
  /** Called whenever the state changes (build phases: BUILDING, BOOTING, SNAPSHOTTING…). */
  onState?: (image: Image) => void;
}

const BUILD_TIMEOUT_MS = 30 * 60_000;

export class Images {
  readonly #http: Transport;

  constructor(http: Transport) {
    this.#http = http;
  }

  /** Starts building an image from a bundle; answers at once (state PENDING). */
  create(input: CreateImageInput, options: CallOptions = {}): Promise<Image> {
    return this.#http.json<Image>({ method: 'POST', path: '/images', json: input, ...options });
  }

  /** One page of images, newest first. */
  list(params: ImageListParams = {}, options: CallOptions = {}): Promise<Page<Image>> {
    const { limit, cursor, state, name } = params;
    return this.#http.json<Page<Image>>({
      method: 'GET', path: '/images', query: { limit, cursor, state: state as string | string[] | undefined, name }, ...options,
    });
  }

  /** Every image, page after page. */
  iterate(params: ImageListParams = {}, options: CallOptions = {}): AsyncGenerator<Image, void, undefined> {
    return paginate((p) => this.list(p, options), params);
  }

  /** By id or ARN. */
  get(idOrArn: string, options: CallOptions = {}): Promise<Image> {
    return this.#http.json<Image>({ method: 'GET', path: `/images/${segment(idOrArn)}`, ...options });
  }

  /** The build log so far; with `{follow: true}` its lines as they come, until the build ends. */
  logs(idOrArn: string, options: LogOptions & { follow: true }): AsyncGenerator<string, void, undefined>;
  logs(idOrArn: string, options?: LogOptions & { follow?: false }): Promise<string>;
  logs(idOrArn: string, options: LogOptions = {}): Promise<string> | AsyncGenerator<string, void, undefined> {
    const path = `/images/${segment(idOrArn)}/logs`;
    if (!options.follow) {
      return this.#http.text({ method: 'GET', path, signal: options.signal, timeoutMs: options.timeoutMs, headers: { accept: 'text/plain' } });
    }
    const http = this.#http;
    return (async function* follow() {
      const response = await http.send({
        method: 'GET', path, query: { follow: 1 }, stream: true, signal: options.signal, timeoutMs: options.timeoutMs,
        headers: { accept: 'text/plain' },
      });
      if (!response.body) return;
      yield* lines(response.body, options.signal);
    })();
  }

  /** Deletes an image and its files (a build in progress is cancelled). ConflictError while microVMs use it. */
  async delete(idOrArn: string, options: CallOptions = {}): Promise<void> {
    await this.#http.send({ method: 'DELETE', path: `/images/${segment(idOrArn)}`, ...options });
  }

  /**
   * Waits until the image is READY (resolves with it) or FAILED (rejects with
   * ImageBuildFailedError), polling its state.
   */
  async waitUntilReady(idOrArn: string, options: WaitOptions = {}): Promise<Image> {
    return this.waitForState(idOrArn, ['READY'], options);
  }

  /** Waits until the image is in one of `states`; FAILED rejects unless awaited. */
  async waitForState(idOrArn: string, states: ImageState[], options: WaitOptions = {}): Promise<Image> {
    const timeoutMs = options.timeoutMs ?? BUILD_TIMEOUT_MS;
    const deadline = Date.now() + timeoutMs;
    let last: ImageState | undefined;
    for (;;) {
      const image = await this.get(idOrArn, { signal: options.signal });
      if (image.state !== last) {
        last = image.state;
        options.onState?.(image);
      }
      if (states.includes(image.state)) return image;
      if (image.state === 'FAILED') throw new ImageBuildFailedError(image);
      if (Date.now() >= deadline) throw new CocoonTimeoutError(`waiting for image ${image.id} to be ${states.join(' or ')}`, timeoutMs);
      await sleep(Math.min(options.pollIntervalMs ?? 1000, Math.max(1, deadline - Date.now())), options.signal);
    }
  }
}
