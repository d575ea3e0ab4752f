/**
 * Gateway overhead benchmark (not a test): latency p50/p95 at concurrency 1 and requests/s at
 * concurrency 32, direct to a loopback upstream vs through the gateway, measured side by side
 * in one run, rounds interleaved so machine drift hits every variant alike.
 *
 *   node bench/gateway-overhead.ts [--json] [--rounds 5] [--duration-ms 2000] [--requests 2000]
 *       [--clients undici,node] [--body-bytes 64] [--upstream-delay-ms 0]
 *
 * Three processes: the upstream (node:http), the gateway (one per upstream client kind), and
 * this one generating load with an undici Pool (keep-alive, one connection per concurrent
 * request). With --json the last line is {"machine", "metrics"} as docs/contract.md's benchmarks.
 */
import { fork, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { Pool } from 'undici';

const { values: args } = parseArgs({
  options: {
    role: { type: 'string', default: 'main' },
    json: { type: 'boolean', default: false },
    rounds: { type: 'string', default: '5' },
    'duration-ms': { type: 'string', default: '2000' },
    requests: { type: 'string', default: '2000' },
    clients: { type: 'string', default: 'undici,node' },
    'body-bytes': { type: 'string', default: '64' },
    /** Simulated app time per request (an I/O-bound guest); 0 = the bare loopback upstream. */
    'upstream-delay-ms': { type: 'string', default: '0' },
    client: { type: 'string', default: 'undici' },
    'upstream-port': { type: 'string', default: '0' },
  },
});

type Ready = { port: number; token?: string };

// ---- child roles -----------------------------------------------------------------------------

async function runUpstream(): Promise<void> {
  const body = Buffer.alloc(Number(args['body-bytes']), 'x');
  const delayMs = Number(args['upstream-delay-ms']);
  const server = http.createServer((req, res) => {
    req.resume();
    req.on('end', () => {
      const answer = (): void => {
        res.writeHead(200, { 'content-type': 'text/plain', 'content-length': body.length });
        res.end(body);
      };
      if (delayMs > 0) setTimeout(answer, delayMs);
      else answer();
    });
  });
  server.keepAliveTimeout = 60_000;
  server.listen(0, '127.0.0.1', () => process.send!({ port: (server.address() as AddressInfo).port } satisfies Ready));
}

async function runGateway(): Promise<void> {
  const { createGateway } = await import('../src/gateway/gateway.ts');
  const { createTokenVerifier } = await import('../src/gateway/tokens.ts');
  const { openMetadataStore } = await import('../src/store/open.ts');
  const { createTenant } = await import('../src/store/tenants.ts');
  const { createImage, transitionImage } = await import('../src/store/images.ts');
  const { createMicrovm } = await import('../src/store/microvms.ts');
  const { createToken } = await import('../src/store/tokens.ts');
  const upstreamPort = Number(args['upstream-port']);
  // Tokens live in the metadata store: a throwaway one, with one microVM renamed 'bench'.
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cocoon-bench-gw-'));
  process.once('exit', () => fs.rmSync(dir, { recursive: true, force: true }));
  process.once('disconnect', () => process.exit(0));
  const { db } = await openMetadataStore(dir);
  const tenant = await createTenant(db, { name: 'bench' });
  const image = await createImage(db, {
    tenantId: tenant.id, region: 'local', name: 'bench', bundleUri: 'cocoon://bench', vcpus: 1, memoryMiB: 256, diskMiB: 64, port: 8080,
    readiness: { httpPath: null, timeoutSeconds: 60 },
  });
  for (const [from, to] of [['PENDING', 'BUILDING'], ['BUILDING', 'BOOTING'], ['BOOTING', 'SNAPSHOTTING'], ['SNAPSHOTTING', 'READY']] as const) {
    await transitionImage(db, image.id, from, to);
  }
  const { microvm } = await createMicrovm(db, {
    tenantId: tenant.id, region: 'local', imageId: image.id, maximumDurationSeconds: 3600,
    idlePolicy: { autoResumeEnabled: true, maxIdleDurationSeconds: 300, suspendedDurationSeconds: null },
  });
  await db.run("UPDATE microvms SET id = 'bench' WHERE id = ?", [microvm.id]);
  const route = {
    id: 'bench',
    state: 'RUNNING' as const,
    appPort: 8080,
    autoResumeEnabled: true,
    upstreamHost: '127.0.0.1',
    upstreamPortFor: (p: number) => (p === 8080 ? upstreamPort : null),
  };
  const gateway = createGateway({
    directory: {
      lookup: (id) => (id === 'bench' ? route : null),
      ensureRunning: async () => route,
      requestStarted() {},
      requestFinished() {},
      webSocketOpened() {},
      webSocketClosed() {},
    },
    tokens: createTokenVerifier(db),
    upstreamClient: args.client === 'node' ? 'node' : 'undici',
  });
  const { secret: token } = await createToken(db, { microvmId: 'bench', tenantId: tenant.id });
  const { port } = await gateway.listen(0, '127.0.0.1');
  process.send!({ port, token } satisfies Ready);
}

// ---- load generation -------------------------------------------------------------------------

function start(role: string, extra: string[] = []): Promise<{ child: ChildProcess; ready: Ready }> {
  const child = fork(import.meta.filename, ['--role', role, '--body-bytes', String(args['body-bytes']), '--upstream-delay-ms', String(args['upstream-delay-ms']), ...extra], {
    stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
    execArgv: role === 'gateway' && process.env.BENCH_GATEWAY_PROF ? ['--cpu-prof', `--cpu-prof-dir=${process.env.BENCH_GATEWAY_PROF}`] : [],
  });
  return new Promise((resolve, reject) => {
    child.once('message', (m) => resolve({ child, ready: m as Ready }));
    child.once('exit', (code) => reject(new Error(`${role} exited with ${code}`)));
  });
}

interface Target {
  name: string;
  pool: Pool;
  headers: Record<string, string>;
}

async function once(t: Target): Promise<void> {
  const { statusCode, body } = await t.pool.request({ path: '/', method: 'GET', headers: t.headers });
  await body.dump();
  if (statusCode !== 200) throw new Error(`${t.name}: status ${statusCode}`);
}

function percentile(sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]!;
}

async function latency(t: Target, n: number): Promise<{ p50: number; p95: number }> {
  for (let i = 0; i < 200; i++) await once(t); // warm-up
  const samples: number[] = [];
  for (let i = 0; i < n; i++) {
    const s = process.hrtime.bigint();
    await once(t);
    samples.push(Number(process.hrtime.bigint() - s) / 1e6);
  }
  samples.sort((a, b) => a - b);
  return { p50: percentile(samples, 50), p95: percentile(samples, 95) };
}

async function throughput(t: Target, concurrency: number, durationMs: number): Promise<number> {
  const warmEnd = Date.now() + 300;
  const end = warmEnd + durationMs;
  let done = 0;
  const worker = async (): Promise<void> => {
    while (Date.now() < end) {
      await once(t);
      if (Date.now() >= warmEnd) done++;
    }
  };
  await Promise.all(Array.from({ length: concurrency }, worker));
  return done / (durationMs / 1000);
}

const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

async function main(): Promise<void> {
  const rounds = Number(args.rounds);
  const durationMs = Number(args['duration-ms']);
  const requests = Number(args.requests);
  const kinds = String(args.clients).split(',').filter((k) => k === 'undici' || k === 'node');
  const children: ChildProcess[] = [];
  try {
    const up = await start('upstream');
    children.push(up.child);
    const targets: Target[] = [
      { name: 'direct', pool: new Pool(`http://127.0.0.1:${up.ready.port}`, { connections: 32 }), headers: {} },
    ];
    for (const kind of kinds) {
      const gw = await start('gateway', ['--client', kind, '--upstream-port', String(up.ready.port)]);
      children.push(gw.child);
      targets.push({
        name: `gateway(${kind})`,
        pool: new Pool(`http://127.0.0.1:${gw.ready.port}`, { connections: 32 }),
        headers: { host: 'bench.vm.localhost', 'x-cocoon-token': gw.ready.token! },
      });
    }
    const results = new Map(targets.map((t) => [t.name, { p50: [] as number[], p95: [] as number[], rps: [] as number[] }]));
    for (let r = 0; r < rounds; r++) {
      // Rotate the order each round so no variant always runs first or last.
      const order = targets.map((_, i) => targets[(i + r) % targets.length]!);
      for (const t of order) {
        const l = await latency(t, requests);
        const rps = await throughput(t, 32, durationMs);
        const acc = results.get(t.name)!;
        acc.p50.push(l.p50);
        acc.p95.push(l.p95);
        acc.rps.push(rps);
      }
      if (!args.json) process.stderr.write(`round ${r + 1}/${rounds} done\n`);
    }
    for (const t of targets) await t.pool.close();

    const direct = results.get('direct')!;
    const rows = targets.map((t) => {
      const a = results.get(t.name)!;
      return {
        target: t.name,
        'p50 ms (c=1)': median(a.p50).toFixed(3),
        'p95 ms (c=1)': median(a.p95).toFixed(3),
        'added p50 ms': (median(a.p50) - median(direct.p50)).toFixed(3),
        'req/s (c=32)': Math.round(median(a.rps)),
        'rps ratio vs direct': (median(a.rps) / median(direct.rps)).toFixed(3),
      };
    });
    const machine = { accel: 'tcg', cpus: os.availableParallelism(), node: process.version, rounds, requests, durationMs };
    if (!args.json) {
      console.log(`\ngateway overhead, ${machine.cpus} CPUs, ${rounds} rounds, upstream delay ${args['upstream-delay-ms']} ms, body ${args['body-bytes']} B (medians of per-round figures)`);
      console.table(rows);
    }
    const main = results.get(`gateway(${kinds[0] ?? 'undici'})`);
    const metrics: Record<string, { p50: number; p95: number; unit: string; n: number }> = {};
    if (main !== undefined) {
      const added = main.p50.map((v, i) => v - direct.p50[i]!);
      const added95 = main.p95.map((v, i) => v - direct.p95[i]!);
      const ratios = main.rps.map((v, i) => v / direct.rps[i]!);
      metrics['gateway.added_latency_c1_ms'] = { p50: median(added), p95: median(added95), unit: 'ms', n: rounds };
      metrics['gateway.throughput_ratio_c32'] = { p50: median(ratios), p95: Math.min(...ratios), unit: 'ratio', n: rounds };
    }
    for (const t of targets) {
      const a = results.get(t.name)!;
      const key = t.name.replace(/[()]/g, '_').replace(/_$/, '');
      metrics[`gateway.${key}.latency_c1_ms`] = { p50: median(a.p50), p95: median(a.p95), unit: 'ms', n: rounds };
      metrics[`gateway.${key}.rps_c32`] = { p50: median(a.rps), p95: Math.min(...a.rps), unit: 'rps', n: rounds };
    }
    console.log(JSON.stringify({ machine: { accel: machine.accel, cpus: machine.cpus }, metrics }));
  } finally {
    for (const c of children) c.kill('SIGINT');
  }
}

if (args.role !== 'main') {
  // Children end with their parent, and exit cleanly (so --cpu-prof can write its profile).
  process.on('SIGINT', () => process.exit(0));
  process.on('disconnect', () => process.exit(0));
}
if (args.role === 'upstream') await runUpstream();
else if (args.role === 'gateway') await runGateway();
else await main();
