/**
 * 100 MiB each way through the gateway, streamed: the whole exchange (client, gateway and
 * guest all live in this process) must not grow the RSS by more than a few MiB.
 *
 * Every socket read allocates a fresh Buffer; V8 collects them only when external memory has
 * grown by tens of MiB, so without help the RSS shows garbage awaiting collection (measured:
 * ~85 MiB on the first 100 MiB moved, with or without the gateway). The sampler therefore runs
 * a full GC before each sample: what remains is memory something actually holds, which is
 * what buffering a body would show.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import http from 'node:http';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { test } from 'node:test';
import { request, startGateway, startGuest } from './helpers.ts';

const MiB = 1024 * 1024;
const TOTAL = 100 * MiB;
const CHUNK = 64 * 1024;
/**
 * RSS growth allowed for moving 100 MiB after a 16 MiB warm-up each way; buffering a body
 * would show as ~100 MiB. Measured here: 0-1 MiB. Live Buffer memory is
 * held to a loose bound only: even a direct client→guest transfer without the gateway peaks at
 * 10-24 MiB of it (freshly read socket buffers not yet swept).
 */
const RSS_BUDGET = 16 * MiB;
/** Live buffers: the no-gateway baseline peaks near 24 MiB; a buffered body adds ~100 MiB. */
const BUFFER_BUDGET = 64 * MiB;

/** A deterministic 100 MiB stream made of one reused 64 KiB chunk (so the source itself costs nothing). */
function source(total = TOTAL): Readable {
  const chunk = Buffer.alloc(CHUNK);
  for (let i = 0; i < CHUNK; i++) chunk[i] = (i * 31) & 0xff;
  let sent = 0;
  return new Readable({
    read() {
      if (sent >= total) return void this.push(null);
      sent += CHUNK;
      this.push(chunk);
    },
  });
}

function expectedDigest(): string {
  const h = createHash('sha256');
  const chunk = Buffer.alloc(CHUNK);
  for (let i = 0; i < CHUNK; i++) chunk[i] = (i * 31) & 0xff;
  for (let n = 0; n < TOTAL; n += CHUNK) h.update(chunk);
  return h.digest('hex');
}

setFlagsFromString('--expose-gc');
const gc = runInNewContext('gc') as () => void;

interface Growth {
  /** Peak RSS minus RSS at the start. */
  rss: number;
  /** Peak live Buffer/ArrayBuffer memory minus the start's. */
  buffers: number;
}

function memorySampler(): { stop(): Growth } {
  gc();
  const base = process.memoryUsage();
  let rss = base.rss;
  let buffers = base.arrayBuffers;
  const sample = (): void => {
    gc();
    const m = process.memoryUsage();
    rss = Math.max(rss, m.rss);
    buffers = Math.max(buffers, m.arrayBuffers);
  };
  const timer = setInterval(sample, 20);
  return {
    stop() {
      clearInterval(timer);
      sample();
      return { rss: rss - base.rss, buffers: buffers - base.arrayBuffers };
    },
  };
}

for (const client of (process.env.CLIENTS ?? 'undici,node').split(',') as Array<'undici' | 'node'>) {
  test(`100 MiB upload and 100 MiB download stream through the gateway (${client} upstream)`, async (t) => {
    const digest = expectedDigest();
    const guest = await startGuest(t, (req, res, record) => {
      if (req.method === 'PUT') {
        const h = createHash('sha256');
        req.on('data', (c: Buffer) => {
          record.bodyBytes += c.length;
          h.update(c);
        });
        req.on('end', () => res.end(JSON.stringify({ bytes: record.bodyBytes, sha256: h.digest('hex') })));
        return;
      }
      const total = req.url === '/warm' ? 16 * MiB : TOTAL;
      res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': total });
      source(total).pipe(res);
    });
    const f = await startGateway(t, { upstreamClient: client });
    f.directory.add({ id: 'big', ports: new Map([[8080, guest.port]]) });
    const { token } = await f.token('big');
    const headers = { host: 'big.vm.localhost', 'x-cocoon-token': token };
    // Warm up code paths, pools and the allocator (16 MiB each way) so they do not count as growth.
    await request(f.port, { method: 'PUT', headers, body: Buffer.alloc(16 * MiB) });
    await request(f.port, { path: '/warm', headers });

    // Upload (chunked, no Content-Length).
    let sampler = memorySampler();
    const upload = await new Promise<{ status: number; body: string }>((resolve, reject) => {
      const req = http.request({ host: '127.0.0.1', port: f.port, method: 'PUT', path: '/up', headers, agent: false }, (res) => {
        let body = '';
        res.setEncoding('utf8');
        res.on('data', (c: string) => (body += c));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
      });
      req.on('error', reject);
      source().pipe(req);
    });
    const uploadGrowth = sampler.stop();
    assert.equal(upload.status, 200, upload.body);
    assert.deepEqual(JSON.parse(upload.body), { bytes: TOTAL, sha256: digest });

    // Download.
    sampler = memorySampler();
    let got = 0;
    const h = createHash('sha256');
    await new Promise<void>((resolve, reject) => {
      const req = http.request({ host: '127.0.0.1', port: f.port, path: '/down', headers, agent: false }, (res) => {
        assert.equal(res.statusCode, 200);
        assert.equal(res.headers['content-length'], String(TOTAL));
        pipeline(
          res,
          async function* (chunks: AsyncIterable<Buffer>) {
            for await (const c of chunks) {
              got += c.length;
              h.update(c);
            }
          },
        ).then(resolve, reject);
      });
      req.on('error', reject);
      req.end();
    });
    const downloadGrowth = sampler.stop();
    assert.equal(got, TOTAL);
    assert.equal(h.digest('hex'), digest);

    const mib = (n: number): string => `${(n / MiB).toFixed(1)} MiB`;
    t.diagnostic(`growth: upload RSS ${mib(uploadGrowth.rss)} buffers ${mib(uploadGrowth.buffers)}; download RSS ${mib(downloadGrowth.rss)} buffers ${mib(downloadGrowth.buffers)}`);
    for (const [what, g] of [['upload', uploadGrowth], ['download', downloadGrowth]] as const) {
      assert.ok(g.rss < RSS_BUDGET, `${what} grew RSS by ${mib(g.rss)}`);
      assert.ok(g.buffers < BUFFER_BUDGET, `${what} held ${mib(g.buffers)} of buffers at once`);
    }
  });
}
