/**
 * The guest agent's wire format, host side (docs/guest-protocol.md, "The agent channel"; the
 * guest's twin is src/guest/init/agent-wire.h). A frame is a 12-byte header — type, three zero
 * bytes, stream id (u32 LE), payload length (u32 LE) — and at most 64 KiB of payload. Control
 * payloads are `key\0value\0` pairs (a key may repeat: `arg`, `env`).
 *
 * Everything here is pure so that it can be fuzzed (test/guest/agent-wire.test.ts).
 */

export const AGENT_VERSION = 2;
export const HEADER_BYTES = 12;
export const MAX_PAYLOAD = 65536;
/** The first pair of every HELLO payload, which both sides scan for to resynchronise. */
export const HELLO_MAGIC = Buffer.from('hello\0cocoon-agent\0', 'latin1');

export const FrameType = {
  HELLO: 0x01,
  // host → guest
  EXEC: 0x10,
  ATTACH: 0x11,
  READ: 0x12,
  WRITE: 0x13,
  REQ: 0x14,
  DATA: 0x20,
  EOF: 0x21,
  SIGNAL: 0x22,
  RESIZE: 0x23,
  CREDIT: 0x30,
  CLOSE: 0x31,
  // guest → host
  STARTED: 0x40,
  OUT: 0x41,
  ERR: 0x42,
  EXIT: 0x43,
  RESULT: 0x44,
  ITEM: 0x45,
  ERROR: 0x46,
  END: 0x47,
} as const;

const GUEST_TYPES = new Set<number>([
  FrameType.HELLO,
  FrameType.CREDIT,
  FrameType.STARTED,
  FrameType.OUT,
  FrameType.ERR,
  FrameType.EXIT,
  FrameType.RESULT,
  FrameType.ITEM,
  FrameType.ERROR,
  FrameType.END,
]);

export interface Frame {
  type: number;
  stream: number;
  payload: Buffer;
}

export function encodeFrame(type: number, stream: number, payload: Buffer = Buffer.alloc(0)): Buffer {
  if (payload.length > MAX_PAYLOAD) throw new RangeError(`frame payload of ${payload.length} bytes exceeds ${MAX_PAYLOAD}`);
  const header = Buffer.alloc(HEADER_BYTES);
  header[0] = type;
  header.writeUInt32LE(stream >>> 0, 4);
  header.writeUInt32LE(payload.length, 8);
  return payload.length === 0 ? header : Buffer.concat([header, payload]);
}

export type Fields = [key: string, value: string][];

/** Encodes `key\0value\0` pairs; values and keys may not contain NUL (paths and argv cannot). */
export function encodeFields(fields: Fields): Buffer {
  const parts: Buffer[] = [];
  for (const [key, value] of fields) {
    if (key.includes('\0') || value.includes('\0')) throw new RangeError(`field ${key} contains a NUL byte`);
    parts.push(Buffer.from(`${key}\0${value}\0`, 'utf8'));
  }
  return Buffer.concat(parts);
}

/** Decodes a fields payload; null when it is not a well-formed list of pairs. */
export function decodeFields(payload: Buffer): Fields | null {
  if (payload.length === 0) return [];
  if (payload[payload.length - 1] !== 0) return null;
  const words = payload.subarray(0, payload.length - 1).toString('utf8').split('\0');
  if (words.length % 2 !== 0) return null;
  const fields: Fields = [];
  for (let i = 0; i < words.length; i += 2) fields.push([words[i]!, words[i + 1]!]);
  return fields;
}

export function field(fields: Fields, key: string): string | undefined {
  return fields.find(([k]) => k === key)?.[1];
}

export function fieldsAll(fields: Fields, key: string): string[] {
  return fields.filter(([k]) => k === key).map(([, v]) => v);
}

export class ProtocolError extends Error {}

/**
 * Splits the guest's byte stream into frames. Starts out of sync: bytes before the HELLO that
 * answers ours (it carries our nonce) are stale — left in the port by an earlier connection or a
 * restored snapshot — and are skipped. Once in sync, anything that is not a valid guest frame is
 * a protocol error (the caller drops the connection). Buffers at most one frame.
 */
export class FrameDecoder {
  #buffer: Buffer = Buffer.alloc(0);
  #synced = false;
  readonly #hello: Buffer;

  constructor(nonce: string) {
    this.#hello = Buffer.concat([HELLO_MAGIC, Buffer.from(`version\0`, 'latin1')]);
    this.#nonce = Buffer.from(`nonce\0${nonce}\0`, 'latin1');
  }

  readonly #nonce: Buffer;

  get synced(): boolean {
    return this.#synced;
  }

  /** Feeds bytes; returns the complete frames they finish. Throws ProtocolError on garbage. */
  push(chunk: Buffer): Frame[] {
    this.#buffer = this.#buffer.length === 0 ? chunk : Buffer.concat([this.#buffer, chunk]);
    const frames: Frame[] = [];
    if (!this.#synced && !this.#sync()) return frames;
    let at = 0;
    const buf = this.#buffer;
    while (buf.length - at >= HEADER_BYTES) {
      const type = buf[at]!;
      if (!GUEST_TYPES.has(type) || buf[at + 1] !== 0 || buf[at + 2] !== 0 || buf[at + 3] !== 0) {
        throw new ProtocolError(`invalid frame header (type ${type})`);
      }
      const length = buf.readUInt32LE(at + 8);
      if (length > MAX_PAYLOAD) throw new ProtocolError(`frame of ${length} bytes exceeds ${MAX_PAYLOAD}`);
      if (buf.length - at < HEADER_BYTES + length) break;
      frames.push({ type, stream: buf.readUInt32LE(at + 4), payload: buf.subarray(at + HEADER_BYTES, at + HEADER_BYTES + length) });
      at += HEADER_BYTES + length;
    }
    this.#buffer = at === 0 ? buf : buf.subarray(at);
    // Frames keep views into the old buffer; a retained tail is copied so it does not pin it.
    if (at > 0 && this.#buffer.length > 0) this.#buffer = Buffer.from(this.#buffer);
    return frames;
  }

  /** Looks for our HELLO's answer; drops what comes before it. */
  #sync(): boolean {
    const buf = this.#buffer;
    let from = 0;
    for (;;) {
      const magic = buf.indexOf(this.#hello, from);
      if (magic < 0) break;
      const start = magic - HEADER_BYTES;
      if (start >= 0 && buf[start] === FrameType.HELLO) {
        const length = buf.readUInt32LE(start + 8);
        if (length <= MAX_PAYLOAD && buf.length >= start + HEADER_BYTES + length) {
          const payload = buf.subarray(start + HEADER_BYTES, start + HEADER_BYTES + length);
          if (payload.indexOf(this.#nonce) >= 0) {
            this.#buffer = buf.subarray(start);
            this.#synced = true;
            return true;
          }
        } else if (length <= MAX_PAYLOAD) {
          // A HELLO whose payload has not fully arrived: keep from its start.
          this.#buffer = buf.subarray(start);
          return false;
        }
      }
      from = magic + 1;
    }
    // Keep a tail that may hold the start of the answer.
    const keep = HEADER_BYTES + this.#hello.length + 64;
    if (buf.length > keep) this.#buffer = Buffer.from(buf.subarray(buf.length - keep));
    return false;
  }
}
