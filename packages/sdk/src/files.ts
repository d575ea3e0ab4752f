/**
 * Files in a microVM: read and write (strings, bytes, Blobs and streams, streamed both ways),
 * list, stat, mkdir, remove, rename, chmod. Paths are absolute paths in the guest.
 *
 *   await cocoon.files.write(vm.id, '/app/config.json', JSON.stringify(config))
 *   const log = await cocoon.files.read(vm.id, '/var/log/app.log')
 *   const bytes = await cocoon.files.read(vm.id, '/out/model.bin', { format: 'bytes' })
 *   for (const entry of await cocoon.files.list(vm.id, '/app')) console.log(entry.name, entry.size)
 */
import { CocoonError, InvalidArgumentError, isCocoonApiError } from './errors.ts';
import { checkGuestPath, streamError } from './exec-protocol.ts';
import { lines, segment, type CallOptions, type Transport } from './http.ts';
import { toStream } from './streams.ts';

export interface FileStat {
  path: string;
  name: string;
  type: 'file' | 'directory' | 'symlink' | 'other';
  size: number;
  /** Permission bits in octal, e.g. `0644`. */
  mode: string;
  uid: number;
  gid: number;
  /** ISO 8601. */
  mtime: string;
  /** Where a symlink points. */
  linkTarget?: string;
}

/** A change in a watched folder. */
export interface WatchEvent {
  type: 'create' | 'write' | 'remove' | 'rename_from' | 'rename_to' | 'chmod' | 'gone';
  /** The entry's name in the folder. */
  name: string;
  isDir: boolean;
}

/** What `write` takes. A Node `Readable` is an AsyncIterable. */
export type FileData = string | Uint8Array | ArrayBuffer | Blob | ReadableStream<Uint8Array> | AsyncIterable<Uint8Array>;

export type ReadFormat = 'text' | 'bytes' | 'blob' | 'stream';

/** Transfers take as long as they take: 30 minutes unless told otherwise. */
const TRANSFER_TIMEOUT_MS = 30 * 60_000;

/** `0o644` or `'644'` / `'0644'` → `'0644'`. */
export function octalMode(mode: number | string): string {
  const value = typeof mode === 'number' ? mode : /^0?[0-7]{3,4}$/.test(mode) ? parseInt(mode, 8) : NaN;
  if (!Number.isInteger(value) || value < 0 || value > 0o7777) throw new InvalidArgumentError(`mode ${JSON.stringify(mode)} is not a file mode such as 0644`);
  return value.toString(8).padStart(4, '0');
}


function bodyOf(data: FileData): NonNullable<RequestInit['body']> {
  if (typeof data === 'string') return new Blob([data]);
  if (data instanceof Uint8Array) return new Blob([data as Uint8Array<ArrayBuffer>]);
  if (data instanceof ArrayBuffer) return new Blob([data]);
  if (typeof Blob !== 'undefined' && data instanceof Blob) return data;
  if (typeof ReadableStream !== 'undefined' && data instanceof ReadableStream) return data;
  if (data && typeof (data as AsyncIterable<Uint8Array>)[Symbol.asyncIterator] === 'function') return toStream(data as AsyncIterable<Uint8Array>);
  throw new InvalidArgumentError('files.write takes a string, bytes, a Blob or a stream');
}

export class Files {
  readonly #http: Transport;

  constructor(http: Transport) {
    this.#http = http;
  }

  #path(microvmId: string, suffix = ''): string {
    return `/microvms/${segment(microvmId)}/files${suffix}`;
  }

  /** A file's content: text (UTF-8, the default), bytes, a Blob, or a stream to read as it comes. */
  read(microvmId: string, path: string, options?: CallOptions & { format?: 'text' }): Promise<string>;
  read(microvmId: string, path: string, options: CallOptions & { format: 'bytes' }): Promise<Uint8Array>;
  read(microvmId: string, path: string, options: CallOptions & { format: 'blob' }): Promise<Blob>;
  read(microvmId: string, path: string, options: CallOptions & { format: 'stream' }): Promise<ReadableStream<Uint8Array>>;
  async read(microvmId: string, path: string, options: CallOptions & { format?: ReadFormat } = {}): Promise<string | Uint8Array | Blob | ReadableStream<Uint8Array>> {
    checkGuestPath(path);
    const format = options.format ?? 'text';
    const response = await this.#http.send({
      method: 'GET',
      path: this.#path(microvmId),
      query: { path },
      headers: { accept: 'application/octet-stream' },
      stream: format === 'stream',
      signal: options.signal,
      timeoutMs: options.timeoutMs ?? TRANSFER_TIMEOUT_MS,
    });
    if (format === 'stream') return response.body ?? new ReadableStream<Uint8Array>({ start: (c) => c.close() });
    if (format === 'bytes') return new Uint8Array(await response.arrayBuffer());
    if (format === 'blob') return response.blob();
    return response.text();
  }

  /**
   * Writes a file (created or replaced; its folder must exist), streamed: a stream or a Blob
   * is never held whole in memory. Answers the file's stat.
   */
  async write(microvmId: string, path: string, data: FileData, options: CallOptions & { mode?: number | string } = {}): Promise<FileStat> {
    checkGuestPath(path);
    const body = bodyOf(data);
    return this.#http.json<FileStat>({
      method: 'PUT',
      path: this.#path(microvmId),
      query: { path, mode: options.mode === undefined ? undefined : octalMode(options.mode) },
      body,
      headers: { 'content-type': 'application/octet-stream' },
      signal: options.signal,
      timeoutMs: options.timeoutMs ?? TRANSFER_TIMEOUT_MS,
    });
  }

  async stat(microvmId: string, path: string, options: CallOptions = {}): Promise<FileStat> {
    checkGuestPath(path);
    return this.#http.json<FileStat>({ method: 'GET', path: this.#path(microvmId, '/stat'), query: { path }, ...options });
  }

  /** Whether something exists at `path`. */
  async exists(microvmId: string, path: string, options: CallOptions = {}): Promise<boolean> {
    try {
      await this.stat(microvmId, path, options);
      return true;
    } catch (error) {
      if (isCocoonApiError(error, 'not_found') && error.code !== 'microvm_not_found') return false;
      throw error;
    }
  }

  /** A folder's entries. */
  async list(microvmId: string, path: string, options: CallOptions = {}): Promise<FileStat[]> {
    checkGuestPath(path);
    const page = await this.#http.json<{ items: FileStat[] }>({ method: 'GET', path: this.#path(microvmId, '/list'), query: { path }, ...options });
    return page.items;
  }

  /** Makes a folder; `parents: true` makes the missing ones above it too (and is fine if it exists). */
  async mkdir(microvmId: string, path: string, options: CallOptions & { parents?: boolean; mode?: number | string } = {}): Promise<FileStat> {
    checkGuestPath(path);
    const { parents, mode, ...call } = options;
    const json: Record<string, unknown> = { path };
    if (parents !== undefined) json.parents = parents;
    if (mode !== undefined) json.mode = octalMode(mode);
    return this.#http.json<FileStat>({ method: 'POST', path: this.#path(microvmId, '/mkdir'), json, ...call });
  }

  /** Removes a file, or a folder (`recursive: true` for one that is not empty). */
  async remove(microvmId: string, path: string, options: CallOptions & { recursive?: boolean } = {}): Promise<void> {
    checkGuestPath(path);
    const { recursive, ...call } = options;
    await this.#http.send({ method: 'POST', path: this.#path(microvmId, '/remove'), json: recursive ? { path, recursive } : { path }, ...call });
  }

  async rename(microvmId: string, from: string, to: string, options: CallOptions = {}): Promise<FileStat> {
    checkGuestPath(from, 'source path');
    checkGuestPath(to, 'target path');
    return this.#http.json<FileStat>({ method: 'POST', path: this.#path(microvmId, '/rename'), json: { from, to }, ...options });
  }

  /**
   * Watches a folder (not its subfolders): `onEvent` gets each change until `stop()`, `signal`,
   * or the folder is gone (a last `gone` event). Resolves once the server watches, so that
   * nothing made after it is missed; `done` settles when the watch ends (rejects if it broke).
   *
   *   const watcher = await cocoon.files.watch(vm.id, '/out', (change) => console.log(change.type, change.name))
   *   …
   *   watcher.stop()
   */
  async watch(microvmId: string, path: string, onEvent: (event: WatchEvent) => void, options: { signal?: AbortSignal } = {}): Promise<{ stop(): void; done: Promise<void> }> {
    checkGuestPath(path);
    const controller = new AbortController();
    const onAbort = () => controller.abort(options.signal?.reason);
    if (options.signal?.aborted) onAbort();
    else options.signal?.addEventListener('abort', onAbort, { once: true });
    const response = await this.#http.send({
      method: 'GET',
      path: this.#path(microvmId, '/watch'),
      query: { path },
      headers: { accept: 'application/x-ndjson' },
      stream: true,
      signal: controller.signal,
    });
    const label = `watching ${path} in ${microvmId}`;
    const events = lines(response.body ?? new ReadableStream(), controller.signal, 64 * 1024)[Symbol.asyncIterator]();
    const parse = (line: string): Record<string, unknown> => {
      try {
        return JSON.parse(line) as Record<string, unknown>;
      } catch (error) {
        throw new CocoonError(`the server sent a line that is not JSON while ${label}`, { cause: error });
      }
    };
    // The first event says the watch is in place.
    const first = await events.next();
    if (!first.done) {
      const event = parse(first.value);
      if (event.type === 'error') throw streamError(event.error, label);
    }
    const done = (async () => {
      try {
        for (;;) {
          const { value, done: ended } = await events.next();
          if (ended) return;
          if (value.trim() === '') continue;
          const event = parse(value);
          if (event.type === 'error') throw streamError(event.error, label);
          if (typeof event.type !== 'string' || typeof event.name !== 'string') continue;
          onEvent({ type: event.type as WatchEvent['type'], name: event.name, isDir: event.isDir === true });
          if (event.type === 'gone') return;
        }
      } catch (error) {
        if (controller.signal.aborted) return;
        throw error;
      } finally {
        options.signal?.removeEventListener('abort', onAbort);
        controller.abort();
        await events.return?.(undefined);
      }
    })();
    done.catch(() => undefined);
    return { stop: () => controller.abort(), done };
  }

  /** Changes a file's mode and/or owner. */
  async chmod(microvmId: string, path: string, change: { mode?: number | string; uid?: number; gid?: number }, options: CallOptions = {}): Promise<FileStat> {
    checkGuestPath(path);
    const json: Record<string, unknown> = { path };
    if (change.mode !== undefined) json.mode = octalMode(change.mode);
    for (const key of ['uid', 'gid'] as const) {
      const value = change[key];
      if (value === undefined) continue;
      if (!Number.isInteger(value) || value < 0) throw new InvalidArgumentError(`${key} is a whole number ≥ 0`);
      json[key] = value;
    }
    return this.#http.json<FileStat>({ method: 'POST', path: this.#path(microvmId, '/chmod'), json, ...options });
  }
}
