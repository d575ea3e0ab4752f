import { InvalidArgumentError } from './errors.ts';
import type { CallOptions, Transport } from './http.ts';
import { toStream } from './streams.ts';
import type { Bundle } from './types.ts';

/** What `bundles.push` accepts. */
export type BundleSource =
  /** Node: a folder with a Dockerfile at its root (packed as tar.gz), or a .tar.gz/.zip file. */
  | string
  /** An archive in memory or a browser `File`. */
  | Blob
  | Uint8Array
  | ArrayBuffer
  /** An archive as a stream (a Node `Readable` is an AsyncIterable). */
  | ReadableStream<Uint8Array>
  | AsyncIterable<Uint8Array>;

export interface PushOptions extends CallOptions {
  /** For streams: `application/gzip` or `application/zip` (the server also reads the first bytes). */
  contentType?: string;
}

/** Uploads take as long as they take: 30 minutes unless told otherwise. */
const UPLOAD_TIMEOUT_MS = 30 * 60_000;

function sniff(head: Uint8Array): string | undefined {
  if (head[0] === 0x1f && head[1] === 0x8b) return 'application/gzip';
  if (head[0] === 0x50 && head[1] === 0x4b) return 'application/zip';
  return undefined;
}

export class Bundles {
  readonly #http: Transport;

  constructor(http: Transport) {
    this.#http = http;
  }

  /**
   * Uploads a bundle: a `.tar.gz` or `.zip` with a `Dockerfile` at its root. The server checks
   * it (paths, sizes, the Dockerfile) before storing it. Pass the answer's `uri` to
   * `images.create`.
   */
  async push(source: BundleSource, options: PushOptions = {}): Promise<Bundle> {
    let body: NonNullable<RequestInit['body']>;
    let contentType = options.contentType;
    if (typeof source === 'string') {
      const { openBundlePath } = await import('./node-source.ts');
      const opened = await openBundlePath(source);
      body = opened.body;
      contentType ??= opened.contentType;
    } else if (typeof Blob !== 'undefined' && source instanceof Blob) {
      body = source;
      contentType ??= sniff(new Uint8Array(await source.slice(0, 4).arrayBuffer()));
      if (!contentType) throw new InvalidArgumentError(`${(source as File).name ?? 'the file'} is not a .tar.gz or .zip archive`);
    } else if (source instanceof Uint8Array || source instanceof ArrayBuffer) {
      const bytes = source instanceof ArrayBuffer ? new Uint8Array(source) : source;
      body = new Blob([bytes as Uint8Array<ArrayBuffer>]);
      contentType ??= sniff(bytes);
      if (!contentType) throw new InvalidArgumentError('the bundle is not a .tar.gz or .zip archive');
    } else if (typeof ReadableStream !== 'undefined' && source instanceof ReadableStream) {
      body = source;
    } else if (source && typeof (source as AsyncIterable<Uint8Array>)[Symbol.asyncIterator] === 'function') {
      body = toStream(source as AsyncIterable<Uint8Array>);
    } else {
      throw new InvalidArgumentError('bundles.push takes a path, a Blob, bytes or a stream');
    }
    return this.#http.json<Bundle>({
      method: 'POST',
      path: '/bundles',
      body,
      headers: { 'content-type': contentType ?? 'application/octet-stream' },
      signal: options.signal,
      timeoutMs: options.timeoutMs ?? UPLOAD_TIMEOUT_MS,
    });
  }
}
