/**
 * The host end of one microVM's guest agent channel (docs/guest-protocol.md, "The agent
 * channel"): a unix socket that QEMU serves for the virtio-serial port `cocoon.agent`.
 *
 * Streams are multiplexed with credit-based flow control in both directions: the guest sends
 * output only within the credit this side grants, and this side grants it back only as the
 * consumer takes the output, so a stream holds at most its window here however fast the guest
 * writes and however slow the client reads. A guest that sends beyond its credit, malformed
 * frames or too much of anything is cut off (`agent_protocol_error`): it can hurt only its own
 * sessions.
 */
import { randomBytes } from 'node:crypto';
import net from 'node:net';
import { ERROR_CODES, isErrorCode, type ErrorCode } from '../../common/error-codes.ts';
import { CocoonError } from '../../common/errors.ts';
import {
  AGENT_VERSION,
  type Fields,
  type Frame,
  FrameDecoder,
  FrameType,
  HEADER_BYTES,
  MAX_PAYLOAD,
  ProtocolError,
  decodeFields,
  encodeFields,
  encodeFrame,
  field,
} from './wire.ts';

/** Output bytes a stream may have in flight towards us (what it can cost this process). */
export const STREAM_WINDOW = 256 * 1024;
/** A file download's window: larger, since its throughput is window ÷ round trip through the guest. */
export const BULK_WINDOW = 2 * 1024 * 1024;
/** Items (directory entries, processes) one answer may carry. */
export const MAX_ITEMS = 10_000;
const HELLO_TIMEOUT_MS = 10_000;

export type OpenKind = typeof FrameType.EXEC | typeof FrameType.ATTACH | typeof FrameType.READ | typeof FrameType.WRITE | typeof FrameType.REQ;

export class AgentClient {
  readonly #socket: net.Socket;
  readonly #decoder: FrameDecoder;
  readonly #streams = new Map<number, AgentStream>();
  #nextId = 1;
  #closed = false;
  #closeReason: CocoonError | undefined;
  readonly #closeListeners = new Set<(reason: CocoonError) => void>();
  #hello: { resolve: () => void; reject: (e: Error) => void } | undefined;

  private constructor(socket: net.Socket, nonce: string) {
    this.#socket = socket;
    this.#decoder = new FrameDecoder(nonce);
    socket.setNoDelay?.(true);
    socket.on('data', (chunk: Buffer) => this.#onData(chunk));
    socket.on('close', () => this.close(new CocoonError('agent_gone', 'the guest agent channel closed (the microVM stopped or was suspended)', { status: 503 })));
    socket.on('error', () => undefined);
  }

  /** Connects and greets the agent; rejects when it does not answer or speaks another version. */
  static async connect(socketPath: string, timeoutMs = HELLO_TIMEOUT_MS): Promise<AgentClient> {
    const socket = await new Promise<net.Socket>((resolve, reject) => {
      const s = net.createConnection(socketPath);
      s.once('connect', () => {
        s.off('error', reject);
        resolve(s);
      });
      s.once('error', (error) =>
        reject(new CocoonError('agent_unavailable', `cannot reach the guest agent: ${error.message}`, { status: 503, cause: error })),
      );
    });
    const nonce = randomBytes(16).toString('hex');
    const client = new AgentClient(socket, nonce);
    const hello = new Promise<void>((resolve, reject) => (client.#hello = { resolve, reject }));
    const timer = setTimeout(
      () =>
        client.close(
          new CocoonError(
            'agent_unavailable',
            'the guest agent did not answer; images built before the guest agent existed have none: rebuild the image',
            { status: 503 },
          ),
        ),
      timeoutMs,
    );
    // Zeros first: they complete any frame an earlier connection left half-written in the
    // port, then make the agent resynchronise on our HELLO (see the protocol's "Connecting").
    socket.write(Buffer.alloc(HEADER_BYTES + MAX_PAYLOAD));
    socket.write(encodeFrame(FrameType.HELLO, 0, encodeFields([['hello', 'cocoon-agent'], ['version', String(AGENT_VERSION)], ['nonce', nonce]])));
    try {
      await hello;
    } finally {
      clearTimeout(timer);
    }
    return client;
  }

  get closed(): boolean {
    return this.#closed;
  }

  get openStreams(): number {
    return this.#streams.size;
  }

  onClose(listener: (reason: CocoonError) => void): () => void {
    if (this.#closed) {
      listener(this.#closeReason!);
      return () => undefined;
    }
    this.#closeListeners.add(listener);
    return () => this.#closeListeners.delete(listener);
  }

  /** Opens a stream with its first frame; output credit is granted at once. */
  open(kind: OpenKind, fields: Fields): AgentStream {
    if (this.#closed) throw this.#closeReason!;
    const id = this.#nextId;
    this.#nextId = this.#nextId >= 0xffff_fff0 ? 1 : this.#nextId + 1;
    const window = kind === FrameType.READ ? BULK_WINDOW : STREAM_WINDOW;
    const stream = new AgentStream(this, id, window);
    this.#streams.set(id, stream);
    this.send(encodeFrame(kind, id, encodeFields(fields)));
    if (kind !== FrameType.REQ && kind !== FrameType.WRITE) stream.grant(window);
    return stream;
  }

  /** A one-shot request (`op` in the fields): its RESULT's fields, or its items up to END. */
  async request(fields: Fields, timeoutMs = 30_000): Promise<{ result: Fields | null; items: Fields[] }> {
    const stream = this.open(FrameType.REQ, fields);
    const timer = setTimeout(() => stream.fail(new CocoonError('agent_timeout', 'the guest agent did not answer in time', { status: 504 })), timeoutMs);
    const items: Fields[] = [];
    try {
      for (;;) {
        const frame = await stream.next();
        if (frame === null) throw stream.error ?? new CocoonError('agent_gone', 'the guest agent ended the request', { status: 503 });
        const decoded = decodeFields(frame.payload);
        if (decoded === null) throw this.#violation('malformed fields');
        if (frame.type === FrameType.ERROR) throw guestError(decoded);
        if (frame.type === FrameType.RESULT) return { result: decoded, items };
        if (frame.type === FrameType.END) return { result: null, items };
        if (frame.type === FrameType.ITEM) {
          items.push(decoded);
          if (items.length > MAX_ITEMS) throw new CocoonError('too_many_items', `more than ${MAX_ITEMS} entries: narrow the request`, { status: 413 });
        }
      }
    } finally {
      clearTimeout(timer);
      stream.close();
    }
  }

  /** Writes a frame; resolves once the socket can take more (back-pressure for bulk data). */
  send(frame: Buffer): boolean {
    if (this.#closed) return false;
    return this.#socket.write(frame);
  }

  waitWritable(): Promise<void> {
    if (this.#closed || !this.#socket.writableNeedDrain) return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => {
        this.#socket.off('drain', done);
        this.#socket.off('close', done);
        resolve();
      };
      this.#socket.on('drain', done);
      this.#socket.on('close', done);
    });
  }

  forget(id: number): void {
    this.#streams.delete(id);
  }

  close(reason = new CocoonError('agent_closed', 'the guest agent channel was closed', { status: 503 })): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#closeReason = reason;
    this.#socket.destroy();
    this.#hello?.reject(reason);
    for (const stream of [...this.#streams.values()]) stream.fail(reason);
    this.#streams.clear();
    for (const listener of this.#closeListeners) listener(reason);
    this.#closeListeners.clear();
  }

  #violation(what: string): CocoonError {
    const error = new CocoonError('agent_protocol_error', `the guest agent broke the protocol (${what}); its channel was closed`, { status: 502 });
    this.close(error);
    return error;
  }

  #onData(chunk: Buffer): void {
    let frames: Frame[];
    try {
      frames = this.#decoder.push(chunk);
    } catch (error) {
      this.#violation(error instanceof ProtocolError ? error.message : 'undecodable bytes');
      return;
    }
    for (const frame of frames) {
      if (this.#closed) return;
      if (frame.type === FrameType.HELLO) {
        const fields = decodeFields(frame.payload);
        const version = fields ? Number(field(fields, 'version')) : NaN;
        if (version !== AGENT_VERSION) {
          this.close(
            new CocoonError('agent_version_mismatch', `the guest agent speaks version ${version}, this host ${AGENT_VERSION}: rebuild the image`, { status: 503 }),
          );
          return;
        }
        this.#hello?.resolve();
        this.#hello = undefined;
        continue;
      }
      const stream = this.#streams.get(frame.stream);
      if (!stream) continue; // a stream we closed: late frames are expected
      const problem = stream.deliver(frame);
      if (problem) {
        this.#violation(problem);
        return;
      }
    }
  }
}

/** Turns a guest ERROR's fields into a CocoonError with a status a client can act on. */
export function guestError(fields: Fields): CocoonError {
  const sent = (field(fields, 'code') ?? 'guest_error').replace(/[^a-z_]/g, '').slice(0, 64);
  const message = (field(fields, 'message') ?? 'the guest agent refused').slice(0, 1000);
  // Only codes of the registry pass through (the guest is not trusted to invent public codes);
  // anything else is `guest_error` with the guest's code kept in the message.
  const code = isErrorCode(sent) && GUEST_CODES.has(sent) ? sent : 'guest_error';
  return new CocoonError(code, code === 'guest_error' && sent ? `${message} (${sent})` : message);
}

/** The codes the guest agent may send (src/guest/init/agent.c); statuses come from the registry. */
export const GUEST_CODES: ReadonlySet<ErrorCode> = new Set<ErrorCode>(
  (Object.keys(ERROR_CODES) as ErrorCode[]).filter((code) => ERROR_CODES[code].area === 'guest').concat(['invalid_request', 'no_space', 'unknown_user']),
);

/**
 * One multiplexed stream. The consumer pulls frames with `next()`; each output byte it takes is
 * credited back to the guest. Input (`write`) waits for the guest's credit.
 */
export class AgentStream {
  readonly id: number;
  readonly #client: AgentClient;
  readonly #queue: Frame[] = [];
  #waiter: ((frame: Frame | null) => void) | undefined;
  /** Output credit granted and not yet used by the guest. */
  #outstanding = 0;
  #toReturn = 0;
  /** Input credit the guest granted us. */
  #sendCredit = 0;
  #creditWaiter: (() => void) | undefined;
  #ended = false;
  error: CocoonError | undefined;
  /** Credit goes back once a quarter of the window has been consumed (fewer CREDIT frames). */
  readonly #batch: number;

  constructor(client: AgentClient, id: number, window = STREAM_WINDOW) {
    this.#client = client;
    this.id = id;
    this.#batch = Math.max(16 * 1024, window / 4);
  }

  get ended(): boolean {
    return this.#ended;
  }

  grant(bytes: number): void {
    if (this.#ended) return;
    this.#outstanding += bytes;
    const credit = Buffer.alloc(4);
    credit.writeUInt32LE(bytes);
    this.#client.send(encodeFrame(FrameType.CREDIT, this.id, credit));
  }

  /** From the client: a frame for this stream. Returns a protocol violation, if any. */
  deliver(frame: Frame): string | undefined {
    if (this.#ended) return undefined;
    if (frame.type === FrameType.CREDIT) {
      if (frame.payload.length !== 4) return 'CREDIT payload is not 4 bytes';
      this.#sendCredit += frame.payload.readUInt32LE(0);
      if (this.#sendCredit > 1 << 30) return 'too much credit';
      this.#creditWaiter?.();
      return undefined;
    }
    if (frame.type === FrameType.OUT || frame.type === FrameType.ERR) {
      this.#outstanding -= frame.payload.length;
      if (this.#outstanding < 0) return `stream ${this.id} sent beyond its credit`;
    } else if (frame.type === FrameType.ITEM || frame.type === FrameType.STARTED || frame.type === FrameType.RESULT) {
      if (this.#queue.length > MAX_ITEMS + 2) return `stream ${this.id} sent too many items`;
    }
    const final = frame.type === FrameType.EXIT || frame.type === FrameType.ERROR || frame.type === FrameType.END;
    // Copy: the frame is a view into the decoder's chunk, which must not be pinned.
    const own = { ...frame, payload: Buffer.from(frame.payload) };
    if (final) {
      this.#ended = true;
      this.#client.forget(this.id);
    }
    if (this.#waiter) {
      const waiter = this.#waiter;
      this.#waiter = undefined;
      this.#taken(own);
      waiter(own);
    } else {
      this.#queue.push(own);
    }
    if (final) this.#wakeCredit();
    return undefined;
  }

  /** The next frame, or null once the stream has ended (then `error` says why, if it failed). */
  next(): Promise<Frame | null> {
    const frame = this.#queue.shift();
    if (frame) {
      this.#taken(frame);
      return Promise.resolve(frame);
    }
    if (this.#ended) return Promise.resolve(null);
    return new Promise((resolve) => (this.#waiter = resolve));
  }

  #taken(frame: Frame): void {
    if (frame.type !== FrameType.OUT && frame.type !== FrameType.ERR) return;
    this.#toReturn += frame.payload.length;
    if (this.#toReturn >= this.#batch && !this.#ended) {
      const bytes = this.#toReturn;
      this.#toReturn = 0;
      this.grant(bytes);
    }
  }

  /** Sends input (stdin, file bytes) within the guest's credit; resolves when all is sent. */
  async write(data: Buffer): Promise<void> {
    let at = 0;
    while (at < data.length) {
      if (this.#ended) throw this.error ?? new CocoonError('stream_ended', 'the stream has ended', { status: 409 });
      if (this.#sendCredit <= 0) {
        await new Promise<void>((resolve) => (this.#creditWaiter = resolve));
        this.#creditWaiter = undefined;
        continue;
      }
      const n = Math.min(data.length - at, this.#sendCredit, MAX_PAYLOAD);
      this.#sendCredit -= n;
      const ok = this.#client.send(encodeFrame(FrameType.DATA, this.id, data.subarray(at, at + n)));
      at += n;
      if (!ok) await this.#client.waitWritable();
    }
  }

  #wakeCredit(): void {
    const waiter = this.#creditWaiter;
    this.#creditWaiter = undefined;
    waiter?.();
  }

  control(type: number, fields: Fields = []): void {
    if (!this.#ended) this.#client.send(encodeFrame(type, this.id, encodeFields(fields)));
  }

  /** Ends the stream from this side (the guest stops sending; a foreground process is killed). */
  close(): void {
    if (this.#ended) return;
    this.#client.send(encodeFrame(FrameType.CLOSE, this.id));
    this.fail(undefined);
  }

  /** Ends the stream locally: pending `next()` get null, writers the error. */
  fail(error: CocoonError | undefined): void {
    if (this.#ended) return;
    this.#ended = true;
    this.error = error;
    this.#client.forget(this.id);
    this.#queue.length = 0;
    const waiter = this.#waiter;
    this.#waiter = undefined;
    waiter?.(null);
    this.#wakeCredit();
  }
}
