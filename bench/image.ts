/**
 * Image creation benchmark: the busybox sample (a shell web app) built N times through the
 * API of a real server (temp data directory, ephemeral port), each from POST /images to READY,
 * one after the other. Reports the wall time seen by the client and each build phase as the
 * server measured it (fetch, build, disk, boot, ready, snapshot).
 *
 *   node bench/image.ts [--runs 3] [--json]
 *
 * For the bench runner: `runImageBench({ runs })` resolves to metrics named
 * `image.create_total_ms`, `image.fetch_ms`, `image.build_ms`, `image.disk_ms`, `image.boot_ms`,
 * `image.ready_ms`, `image.snapshot_ms`.
 */
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { ensureBaseImages } from '../src/builder/base-images.ts';
import { cleanupAbandonedBuild } from '../src/images/cleanup.ts';
import { imagesModule } from '../src/wiring/images.ts';
import { loadConfig } from '../src/config/config.ts';
import { startServer } from '../src/server.ts';
import type { Accelerator } from '../src/vmm/types.ts';
import { summarize, type Metrics } from './stats.ts';

const run = promisify(execFile);

export interface ImageBenchOptions {
  /** Images to build (default 3). */
  runs?: number | undefined;
  /** Accelerator of the build VMs (default: COCOON_ACCEL, else auto). */
  accel?: Accelerator;
  /** Progress lines (default: none). */
  log?: (line: string) => void;
}

const SAMPLE: Record<string, { text: string; mode: number }> = {
  Dockerfile: {
    text: 'FROM busybox\nCOPY www/ /www/\nCOPY start.sh /start.sh\nEXPOSE 8080\nCMD ["/bin/sh", "/start.sh"]\n',
    mode: 0o644,
  },
  'start.sh': { text: '#!/bin/sh\necho "app: starting"\nexec httpd -f -p 8080 -h /www\n', mode: 0o755 },
  'www/index.html': { text: 'hello from the cocoon image benchmark\n', mode: 0o644 },
};

export async function runImageBench(options: ImageBenchOptions = {}): Promise<Metrics> {
  const runs = options.runs ?? 3;
  // The server's request log would drown the benchmark's own lines.
  process.env.COCOON_LOG_LEVEL ??= 'warn';
  const say = options.log ?? (() => undefined);
  await ensureBaseImages({ only: ['busybox'] });
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cocoon-bench-img-'));
  const bundlePath = path.join(dir, 'sample.tar.gz');
  const root = path.join(dir, 'sample');
  for (const [name, file] of Object.entries(SAMPLE)) {
    fs.mkdirSync(path.dirname(path.join(root, name)), { recursive: true });
    fs.writeFileSync(path.join(root, name), file.text, { mode: file.mode });
  }
  await run('tar', ['-czf', bundlePath, '-C', root, '.']);

  const dataDir = path.join(dir, 'data');
  const config = {
    ...loadConfig({ ...process.env, COCOON_DATA_DIR: dataDir }),
    apiPort: 0, gatewayPort: 0, host: '127.0.0.1',
    ...(options.accel ? { accel: options.accel } : {}),
  };
  const server = await startServer(config, [imagesModule({ concurrency: 1 })]);
  const key = fs.readFileSync(path.join(dataDir, 'admin-api-key'), 'utf8').trim();
  const api = async (method: string, route: string, body?: Buffer | object, type?: string): Promise<any> => {
    const response = await fetch(`${server.apiUrl}/api/v1${route}`, {
      method,
      headers: { authorization: `Bearer ${key}`, ...(body ? { 'content-type': type ?? 'application/json' } : {}) },
      body: body instanceof Buffer ? body : body ? JSON.stringify(body) : undefined,
    });
    const text = await response.text();
    if (!response.ok) throw new Error(`${method} ${route}: HTTP ${response.status} ${text}`);
    return text ? JSON.parse(text) : undefined;
  };
  const series: Record<string, number[]> = {
    'image.create_total_ms': [], 'image.fetch_ms': [], 'image.build_ms': [], 'image.disk_ms': [],
    'image.boot_ms': [], 'image.ready_ms': [], 'image.snapshot_ms': [],
  };
  const ids: string[] = [];
  try {
    const bundle = await api('POST', '/bundles', fs.readFileSync(bundlePath), 'application/gzip');
    for (let i = 0; i < runs; i++) {
      const started = performance.now();
      const created = await api('POST', '/images', { name: 'bench-busybox', bundle: bundle.uri });
      ids.push(created.id);
      let image = created;
      while (image.state !== 'READY' && image.state !== 'FAILED') {
        await new Promise((r) => setTimeout(r, 20));
        image = await api('GET', `/images/${created.id}`);
      }
      const total = performance.now() - started;
      if (image.state !== 'READY') throw new Error(`image ${image.id} FAILED: ${image.error}`);
      const tm = image.timings as Record<string, number>;
      series['image.create_total_ms']!.push(total);
      series['image.fetch_ms']!.push(tm.fetchMs ?? NaN);
      series['image.build_ms']!.push(tm.buildMs ?? NaN);
      series['image.disk_ms']!.push(tm.diskMs ?? NaN);
      series['image.boot_ms']!.push(tm.bootMs ?? NaN);
      series['image.ready_ms']!.push(tm.readyMs ?? NaN);
      series['image.snapshot_ms']!.push(tm.snapshotMs ?? NaN);
      say(`run ${i + 1}/${runs}: ${Math.round(total)} ms (${JSON.stringify(tm)})`);
    }
  } finally {
    await server.close();
    for (const id of ids) await cleanupAbandonedBuild(dataDir, id, 2000).catch(() => undefined);
    fs.rmSync(dir, { recursive: true, force: true });
  }
  return Object.fromEntries(Object.entries(series).map(([name, values]) => [name, summarize(values)]));
}

if (import.meta.main) {
  const args = process.argv.slice(2);
  const runsAt = args.indexOf('--runs');
  const runs = runsAt >= 0 ? Number(args[runsAt + 1]) : 3;
  const json = args.includes('--json');
  const metrics = await runImageBench({ runs, log: json ? undefined : (line) => console.log(line) });
  if (json) {
    console.log(JSON.stringify({ metrics }));
  } else {
    for (const [name, m] of Object.entries(metrics)) console.log(`${name.padEnd(24)} p50 ${String(m.p50).padStart(8)} ms   p95 ${String(m.p95).padStart(8)} ms   n=${m.n}`);
  }
}
