/**
 * An image's build log: one append-only file per image (`images/<id>/build.log`), written line
 * by line as the build goes, read by `GET /images/{id}/logs` (and followed with `?follow=1`).
 *
 * Lines are written synchronously, in order, before the state change they lead to: a reader
 * that sees a final state and then reads to the end of the file has every line. The file is
 * bounded: past `maxBytes` only Cocoon's own lines (`[cocoon] …`) are still written, so a
 * chatty build cannot fill the disk, yet the outcome is always at the end.
 */
import { EventEmitter } from 'node:events';
import fs from 'node:fs';
import path from 'node:path';

export const DEFAULT_BUILD_LOG_MAX_BYTES = 16 * 1024 * 1024;
const MAX_LINE = 16 * 1024;

/** Tells log followers in this process that an image's log grew or its build ended. */
export class BuildLogEvents extends EventEmitter<{ changed: [imageId: string] }> {
  constructor() {
    super();
    this.setMaxListeners(0);
  }

  /** Resolves on the next change of `imageId`'s log, or after `ms`, or when `signal` fires. */
  waitForChange(imageId: string, ms: number, signal?: AbortSignal): Promise<void> {
    return new Promise((resolve) => {
      const done = (): void => {
        clearTimeout(timer);
        this.off('changed', onChange);
        signal?.removeEventListener('abort', done);
        resolve();
      };
      const onChange = (id: string): void => {
        if (id === imageId) done();
      };
      const timer = setTimeout(done, ms);
      this.on('changed', onChange);
      signal?.addEventListener('abort', done, { once: true });
    });
  }
}

export class BuildLog {
  readonly path: string;
  private readonly imageId: string;
  private readonly events: BuildLogEvents | undefined;
  private readonly maxBytes: number;
  private fd: number;
  private size: number;
  private truncated = false;

  constructor(file: string, imageId: string, options: { events?: BuildLogEvents; maxBytes?: number } = {}) {
    this.path = file;
    this.imageId = imageId;
    this.events = options.events;
    this.maxBytes = options.maxBytes ?? DEFAULT_BUILD_LOG_MAX_BYTES;
    fs.mkdirSync(path.dirname(file), { recursive: true });
    this.fd = fs.openSync(file, 'a', 0o600);
    this.size = fs.fstatSync(this.fd).size;
  }

  /** A line from Cocoon itself (always written, also past the bound). */
  say(text: string): void {
    for (const line of text.split('\n')) this.write(`[cocoon] ${line}`, true);
  }

  /** A line from a tool (buildah, the guest console…), written while under the bound. */
  line(text: string, prefix = ''): void {
    this.write(prefix + text, false);
  }

  close(): void {
    if (this.fd < 0) return;
    fs.closeSync(this.fd);
    this.fd = -1;
    this.events?.emit('changed', this.imageId);
  }

  private write(text: string, always: boolean): void {
    if (this.fd < 0) return;
    // eslint-disable-next-line no-control-regex
    let line = text.replace(/[\u0000-\u0008\u000b-\u001f\u007f]/g, '');
    if (line.length > MAX_LINE) line = `${line.slice(0, MAX_LINE)}…`;
    if (!always && this.size >= this.maxBytes) {
      if (!this.truncated) {
        this.truncated = true;
        this.write(`[cocoon] the build log reached ${this.maxBytes} bytes: further output is left out`, true);
      }
      return;
    }
    const bytes = Buffer.from(`${line}\n`, 'utf8');
    try {
      fs.writeSync(this.fd, bytes);
      this.size += bytes.length;
    } catch {
      // A full disk must not fail the build on a log line.
    }
    this.events?.emit('changed', this.imageId);
  }
}

/** Reads `file` from `offset` to its current end (empty when missing). */
export async function readFrom(file: string, offset: number, maxBytes = 1024 * 1024): Promise<Buffer> {
  let handle: fs.promises.FileHandle;
  try {
    handle = await fs.promises.open(file, 'r');
  } catch {
    return Buffer.alloc(0);
  }
  try {
    const { size } = await handle.stat();
    const length = Math.min(maxBytes, size - offset);
    if (length <= 0) return Buffer.alloc(0);
    const buffer = Buffer.alloc(length);
    const { bytesRead } = await handle.read(buffer, 0, length, offset);
    return buffer.subarray(0, bytesRead);
  } finally {
    await handle.close();
  }
}

/**
 * Copies new lines of a growing file (the VM's serial console) into the build log, every
 * `intervalMs` and once more at `stop()`.
 */
export class FileFollower {
  private offset = 0;
  private rest = '';
  private timer: NodeJS.Timeout | undefined;
  private busy: Promise<void> = Promise.resolve();
  private readonly file: string;
  private readonly emit: (line: string) => void;

  constructor(file: string, emit: (line: string) => void, intervalMs = 250) {
    this.file = file;
    this.emit = emit;
    this.timer = setInterval(() => this.poll(), intervalMs);
    this.timer.unref();
  }

  private poll(): Promise<void> {
    this.busy = this.busy.then(async () => {
      // The serial log rotates at its bound: a file shorter than what was read is a new one.
      const size = await fs.promises.stat(this.file).then((s) => s.size, () => 0);
      if (size < this.offset) this.offset = 0;
      for (;;) {
        const chunk = await readFrom(this.file, this.offset);
        if (chunk.length === 0) return;
        this.offset += chunk.length;
        const text = this.rest + chunk.toString('latin1');
        const lines = text.split('\n');
        this.rest = lines.pop() ?? '';
        for (const l of lines) this.emit(l.replace(/\r$/, ''));
      }
    }).catch(() => undefined);
    return this.busy;
  }

  async stop(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
    await this.poll();
    if (this.rest !== '') this.emit(this.rest);
    this.rest = '';
  }
}
