/**
 * The guest agent's wire format under fuzzing, on both ends (no VM):
 * - host: FrameDecoder and decodeFields take arbitrary bytes without crashing, buffering more
 *   than a frame, or throwing anything but ProtocolError; valid frames survive any split;
 * - guest: the C parser (agent-wire.h) compiled into a host binary (with ASan/UBSan) takes
 *   arbitrary bytes without crashing and finds exactly the frames the host encoded, also after
 *   stale garbage (resynchronisation on HELLO).
 */
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import fc from 'fast-check';
import {
  AGENT_VERSION,
  FrameDecoder,
  FrameType,
  HEADER_BYTES,
  MAX_PAYLOAD,
  ProtocolError,
  decodeFields,
  encodeFields,
  encodeFrame,
} from '../../src/guest/agent/wire.ts';

const here = path.dirname(new URL(import.meta.url).pathname);

function guestHello(nonce: string): Buffer {
  return encodeFrame(FrameType.HELLO, 0, encodeFields([['hello', 'cocoon-agent'], ['version', String(AGENT_VERSION)], ['nonce', nonce]]));
}

const guestTypes = [FrameType.OUT, FrameType.ERR, FrameType.EXIT, FrameType.RESULT, FrameType.ITEM, FrameType.ERROR, FrameType.END, FrameType.CREDIT, FrameType.STARTED];
const hostTypes = [FrameType.EXEC, FrameType.ATTACH, FrameType.READ, FrameType.WRITE, FrameType.REQ, FrameType.DATA, FrameType.EOF, FrameType.SIGNAL, FrameType.RESIZE, FrameType.CREDIT, FrameType.CLOSE];

const fieldsArb = fc.array(fc.tuple(fc.string({ maxLength: 20 }).filter((s) => !s.includes('\0')), fc.string({ maxLength: 100 }).filter((s) => !s.includes('\0'))), { maxLength: 20 });

describe('agent wire format: host side', () => {
  test('fields round-trip; arbitrary payloads decode or are refused, never throw', () => {
    fc.assert(fc.property(fieldsArb, (fields) => assert.deepEqual(decodeFields(encodeFields(fields)), fields)));
    fc.assert(fc.property(fc.uint8Array({ maxLength: 300 }), (bytes) => {
      const decoded = decodeFields(Buffer.from(bytes));
      assert.ok(decoded === null || Array.isArray(decoded));
    }));
  });

  test('frames after the HELLO answer arrive intact however the bytes are split, after any stale prefix', () => {
    const frameArb = fc.record({ type: fc.constantFrom(...guestTypes), stream: fc.integer({ min: 1, max: 2 ** 32 - 1 }), payload: fc.uint8Array({ maxLength: 3000 }) });
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 500 }), fc.array(frameArb, { maxLength: 10 }), fc.array(fc.integer({ min: 1, max: 5000 }), { minLength: 1, maxLength: 20 }), (stale, frames, cuts) => {
        const nonce = 'abc123';
        const bytes = Buffer.concat([Buffer.from(stale), guestHello(nonce), ...frames.map((f) => encodeFrame(f.type, f.stream, Buffer.from(f.payload)))]);
        const decoder = new FrameDecoder(nonce);
        const got = [];
        let at = 0;
        for (let i = 0; at < bytes.length; i++) {
          const n = cuts[i % cuts.length]!;
          got.push(...decoder.push(bytes.subarray(at, at + n)));
          at += n;
        }
        assert.equal(got[0]?.type, FrameType.HELLO);
        assert.deepEqual(got.slice(1).map((f) => ({ type: f.type, stream: f.stream, payload: new Uint8Array(f.payload) })), frames.map((f) => ({ ...f, payload: new Uint8Array(f.payload) })));
      }),
      { numRuns: 300 },
    );
  });

  test('garbage after the HELLO is a ProtocolError, never another exception or unbounded buffering', () => {
    fc.assert(
      fc.property(fc.array(fc.uint8Array({ minLength: 1, maxLength: 20_000 }), { maxLength: 10 }), (chunks) => {
        const decoder = new FrameDecoder('n');
        decoder.push(guestHello('n'));
        try {
          for (const chunk of chunks) decoder.push(Buffer.from(chunk));
        } catch (error) {
          assert.ok(error instanceof ProtocolError, String(error));
        }
      }),
      { numRuns: 300 },
    );
    const decoder = new FrameDecoder('n');
    decoder.push(guestHello('n'));
    const huge = Buffer.alloc(HEADER_BYTES);
    huge[0] = FrameType.OUT;
    huge.writeUInt32LE(MAX_PAYLOAD + 1, 8);
    assert.throws(() => decoder.push(huge), ProtocolError, 'a frame over 64 KiB is refused before it is buffered');
  });

  test('before the HELLO answer, stale bytes are skipped and the kept tail stays small', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 200_000 }), (bytes) => {
        const decoder = new FrameDecoder('zz');
        assert.deepEqual(decoder.push(Buffer.from(bytes)), []);
        assert.equal(decoder.synced, false);
      }),
      { numRuns: 50 },
    );
  });
});

describe('agent wire format: guest side (the C parser, compiled for this host)', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cocoon-wire-'));
  const binary = path.join(dir, 'harness');
  before(() => {
    const src = path.join(here, 'agent-wire-harness.c');
    try {
      execFileSync('gcc', ['-O1', '-g', '-fsanitize=address,undefined', '-fno-sanitize-recover=all', '-o', binary, src], { stdio: 'pipe' });
    } catch {
      execFileSync('gcc', ['-O1', '-g', '-o', binary, src], { stdio: 'pipe' });
    }
  });
  after(() => fs.rmSync(dir, { recursive: true, force: true }));

  function runHarness(inputs: Buffer[]): string[][] {
    const framed = Buffer.concat(inputs.flatMap((input) => {
      const len = Buffer.alloc(4);
      len.writeUInt32LE(input.length);
      return [len, input];
    }));
    const result = spawnSync(binary, [], { input: framed, maxBuffer: 64 * 1024 * 1024, env: { ...process.env, ASAN_OPTIONS: 'detect_leaks=0' } });
    assert.equal(result.status, 0, `the C parser crashed: ${result.stderr.toString().slice(0, 2000)}`);
    const runs: string[][] = [[]];
    for (const line of result.stdout.toString().split('\n')) {
      if (line === 'end') runs.push([]);
      else if (line) runs[runs.length - 1]!.push(line);
    }
    runs.pop();
    return runs;
  }

  function hostHello(): Buffer {
    return encodeFrame(FrameType.HELLO, 0, encodeFields([['hello', 'cocoon-agent'], ['version', '2'], ['nonce', 'x']]));
  }

  test('arbitrary bytes never crash it', () => {
    const inputs = fc.sample(fc.uint8Array({ maxLength: 5000 }), 300).map((b) => Buffer.from(b));
    // Also: a HELLO followed by garbage, and headers with extreme lengths.
    inputs.push(...fc.sample(fc.uint8Array({ maxLength: 3000 }), 100).map((b) => Buffer.concat([hostHello(), Buffer.from(b)])));
    const extreme = Buffer.alloc(HEADER_BYTES);
    extreme[0] = FrameType.EXEC;
    extreme.writeUInt32LE(0xffffffff, 8);
    inputs.push(Buffer.concat([hostHello(), extreme]));
    assert.equal(runHarness(inputs).length, inputs.length);
  });

  test('it finds exactly the frames the host encoded, after stale bytes and the zero padding', () => {
    const frameArb = fc.record({
      type: fc.constantFrom(...hostTypes),
      stream: fc.integer({ min: 1, max: 2 ** 32 - 1 }),
      fields: fieldsArb,
    });
    const cases = fc.sample(fc.tuple(fc.uint8Array({ maxLength: 300 }), fc.array(frameArb, { maxLength: 8 })), 200);
    const inputs = cases.map(([stale, frames]) =>
      Buffer.concat([
        Buffer.from(stale),
        Buffer.alloc(HEADER_BYTES + MAX_PAYLOAD), // what the host sends before its HELLO
        hostHello(),
        ...frames.map((f) => encodeFrame(f.type, f.stream, encodeFields(f.fields))),
      ]),
    );
    const runs = runHarness(inputs);
    cases.forEach(([, frames], i) => {
      const expected = [`1 0 ${hostHello().length - HEADER_BYTES} 3`, ...frames.map((f) => {
        const len = encodeFields(f.fields).length;
        const n = f.type === FrameType.DATA || f.type === FrameType.CREDIT ? -1 : f.fields.length;
        return `${f.type} ${f.stream} ${len} ${n}`;
      })];
      assert.deepEqual(runs[i], expected);
    });
  });
});
