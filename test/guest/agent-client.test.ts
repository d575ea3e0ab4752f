/**
 * The host's agent client against hostile "guests" (a unix socket playing the guest side, no
 * VM): silence, floods beyond credit, corrupt frames and version mismatches end only that
 * connection, with a clear error, quickly, and nothing is buffered beyond a stream's window.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { after, describe, test } from 'node:test';
import { AgentClient, STREAM_WINDOW } from '../../src/guest/agent/client.ts';
import { CocoonError } from '../../src/common/errors.ts';
import { FrameDecoder, FrameType, HELLO_MAGIC, decodeFields, encodeFields, encodeFrame, field, type Frame } from '../../src/guest/agent/wire.ts';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cocoon-agent-client-'));
after(() => fs.rmSync(dir, { recursive: true, force: true }));
let n = 0;

/** A fake guest: parses the host's frames (after its HELLO) and lets the test answer. */
function fakeGuest(onFrame: (frame: Frame, socket: net.Socket) => void, options: { version?: string; silent?: boolean } = {}): Promise<{ path: string; server: net.Server }> {
  const socketPath = path.join(dir, `g${n++}.sock`);
  const server = net.createServer((socket) => {
    let buffer = Buffer.alloc(0);
    let synced = false;
    socket.on('error', () => undefined);
    socket.on('data', (chunk: Buffer) => {
      buffer = Buffer.concat([buffer, chunk]);
      if (!synced) {
        const at = buffer.indexOf(HELLO_MAGIC);
        if (at < 12) return;
        buffer = buffer.subarray(at - 12);
        synced = true;
      }
      for (;;) {
        if (buffer.length < 12) return;
        const len = buffer.readUInt32LE(8);
        if (buffer.length < 12 + len) return;
        const frame = { type: buffer[0]!, stream: buffer.readUInt32LE(4), payload: buffer.subarray(12, 12 + len) };
        buffer = buffer.subarray(12 + len);
        if (frame.type === FrameType.HELLO) {
          if (options.silent) continue;
          const nonce = field(decodeFields(frame.payload)!, 'nonce')!;
          socket.write(encodeFrame(FrameType.HELLO, 0, encodeFields([['hello', 'cocoon-agent'], ['version', options.version ?? '2'], ['nonce', nonce]])));
        } else {
          onFrame(frame, socket);
        }
      }
    });
  });
  return new Promise((resolve) => server.listen(socketPath, () => resolve({ path: socketPath, server })));
}

describe('agent client against hostile guests', () => {
  test('a guest that never answers: connect fails with agent_unavailable at its timeout', async () => {
    const g = await fakeGuest(() => undefined, { silent: true });
    await assert.rejects(AgentClient.connect(g.path, 300), (e: CocoonError) => e.code === 'agent_unavailable');
    g.server.close();
  });

  test('another protocol version is refused with a clear error', async () => {
    const g = await fakeGuest(() => undefined, { version: '1' });
    await assert.rejects(AgentClient.connect(g.path, 2000), (e: CocoonError) => e.code === 'agent_version_mismatch');
    g.server.close();
  });

  test('output beyond the granted credit closes the channel; the stream ends with agent_protocol_error', async () => {
    const g = await fakeGuest((frame, socket) => {
      if (frame.type === FrameType.EXEC) {
        socket.write(encodeFrame(FrameType.STARTED, frame.stream, encodeFields([['pid', '42']])));
        // Flood: far more than the window, without waiting for credit.
        const chunk = encodeFrame(FrameType.OUT, frame.stream, Buffer.alloc(65536, 1));
        for (let i = 0; i < 64; i++) socket.write(chunk);
      }
    });
    const client = await AgentClient.connect(g.path, 2000);
    const stream = client.open(FrameType.EXEC, [['arg', 'x']]);
    const errors: string[] = [];
    client.onClose((reason) => errors.push(reason.code));
    await new Promise((r) => setTimeout(r, 300)); // a client that does not read yet: credit is not returned
    let bytes = 0;
    for (;;) {
      const frame = await stream.next();
      if (frame === null) break;
      if (frame.type === FrameType.OUT) bytes += frame.payload.length;
    }
    assert.deepEqual(errors, ['agent_protocol_error']);
    assert.ok(bytes <= STREAM_WINDOW, `no more than the window was accepted (${bytes})`);
    assert.equal(stream.error?.code, 'agent_protocol_error');
    g.server.close();
  });

  test('corrupt frames close the channel at once', async () => {
    const g = await fakeGuest((frame, socket) => {
      if (frame.type === FrameType.REQ) socket.write(Buffer.from('this is not a frame at all, just noise............'));
    });
    const client = await AgentClient.connect(g.path, 2000);
    await assert.rejects(client.request([['op', 'ping']]), (e: CocoonError) => e.code === 'agent_protocol_error');
    assert.equal(client.closed, true);
    g.server.close();
  });

  test('a slow consumer: the guest gets credit only as output is taken, so at most one window is buffered', async () => {
    let credited = 0;
    let sent = 0;
    const g = await fakeGuest((frame, socket) => {
      if (frame.type === FrameType.EXEC) socket.write(encodeFrame(FrameType.STARTED, frame.stream, encodeFields([['pid', '7']])));
      if (frame.type === FrameType.CREDIT) {
        credited += frame.payload.readUInt32LE(0);
        // A well-behaved guest: send exactly what it may.
        while (sent < credited && sent < 4 * 1024 * 1024) {
          const n = Math.min(65536, credited - sent);
          socket.write(encodeFrame(FrameType.OUT, frame.stream, Buffer.alloc(n, 2)));
          sent += n;
        }
        if (sent >= 4 * 1024 * 1024) socket.write(encodeFrame(FrameType.EXIT, frame.stream, encodeFields([['code', '0'], ['timedout', '0']])));
      }
    });
    const client = await AgentClient.connect(g.path, 2000);
    const stream = client.open(FrameType.EXEC, [['arg', 'x']]);
    assert.equal((await stream.next())?.type, FrameType.STARTED);
    await new Promise((r) => setTimeout(r, 200)); // not reading: the guest must stop at the window
    assert.equal(sent, STREAM_WINDOW);
    let got = 0;
    for (;;) {
      const frame = await stream.next();
      if (frame === null || frame.type === FrameType.EXIT) break;
      got += frame.payload.length;
    }
    assert.equal(got, 4 * 1024 * 1024, 'everything arrives once the consumer reads');
    client.close();
    g.server.close();
  });

  test('frames for unknown streams and stale bytes before the HELLO are ignored', async () => {
    const g = await fakeGuest((frame, socket) => {
      if (frame.type === FrameType.REQ) {
        socket.write(encodeFrame(FrameType.OUT, 999, Buffer.from('late')));
        socket.write(encodeFrame(FrameType.RESULT, frame.stream, encodeFields([['version', '2']])));
      }
    });
    const client = await AgentClient.connect(g.path, 2000);
    const { result } = await client.request([['op', 'ping']]);
    assert.equal(field(result!, 'version'), '2');
    client.close();
    g.server.close();
    assert.ok(new FrameDecoder('x'));
  });
});
