/**
 * `npm run bench -- cluster` (issue 15): a local cluster of three Cocoon hosts on this machine
 * (src/cluster/local/: PostgreSQL, s3rver, `cocoon serve` × 3), the busybox test app built
 * through host a's API, then, side by side in one run:
 *
 * - cluster.gateway_owner_ms / cluster.gateway_forwarded_ms / cluster.forward_added_latency_ms:
 *   GET / of a RUNNING microVM through its owner's gateway and through another host's gateway
 *   (forwarded), interleaved, keep-alive clients; the added latency is the difference of p50s
 *   (p95 field: of p95s);
 * - cluster.wake_same_host_ms: a request to a SUSPENDED microVM through its owner's gateway → the
 *   answer (a local resume);
 * - cluster.wake_other_host_ms: the same after its owner was SIGKILLed and declared dead, through
 *   another host: that host takes the lease and downloads what it lacks from S3 (the suspended
 *   generation at least) before the resume; the killed host is started again between rounds;
 * - cluster.launches_per_s_1host / _3hosts: K microVMs started at once through one host's API,
 *   then through all three in turn, each until it answered through its gateway (K / seconds).
 *
 * Hosts run with a 1 s heartbeat and 3 s dead-after. Everything lives under
 * $TMPDIR/cocoon-bench-cluster-* and is stopped at the end (or by run.ts on a signal).
 */
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import pg from 'pg';
import { clusterDown, clusterUp, type LocalCluster } from '../src/cluster/local/cluster.ts';
import { testAppBundle } from '../test/support/fixtures.ts';
import { elapsedMs, single, summarize, type Metrics } from './stats.ts';

interface Answer {
  status: number;
  body: string;
}

function call(port: number, method: string, route: string, headers: Record<string, string>, body?: Buffer | string, agent?: http.Agent): Promise<Answer> {
  return new Promise((resolve, reject) => {
    const req = http.request({ host: '127.0.0.1', port, method, path: route, headers, agent: agent ?? false }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks).toString('utf8') }));
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end(body);
  });
}

export async function runClusterBench(options: { runs?: number; log?: (line: string) => void } = {}): Promise<Metrics> {
  const runs = options.runs ?? 5;
  const say = options.log ?? (() => undefined);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cocoon-bench-cluster-'));
  const scratch = path.join(dir, 'scratch');
  const metrics: Metrics = {};
  let cluster: LocalCluster | undefined;
  try {
    cluster = await clusterUp({
      dir,
      hosts: 3,
      env: { COCOON_HEARTBEAT_INTERVAL: '1', COCOON_HOST_DEAD_AFTER: '3', COCOON_LOG_LEVEL: 'warn' },
      progress: say,
    });
    const c = cluster;
    const key = c.adminKey;
    const names = c.state.hosts.map((h) => h.name);
    const apiPort = (name: string) => Number(new URL(c.host(name).apiUrl).port);
    const gatewayPort = (name: string) => Number(new URL(c.host(name).gatewayUrl).port);
    const nameOf = (hostId: string) => hostId.replace(/^host-/, '');
    const api = async (name: string, method: string, route: string, body?: unknown): Promise<any> => {
      const answer = await call(apiPort(name), method, `/api/v1${route}`, {
        authorization: `Bearer ${key}`,
        ...(body === undefined ? {} : { 'content-type': body instanceof Buffer ? 'application/gzip' : 'application/json' }),
      }, body === undefined ? undefined : body instanceof Buffer ? body : JSON.stringify(body));
      if (answer.status >= 300) throw new Error(`${method} ${route} through ${name}: ${answer.status} ${answer.body.slice(0, 400)}`);
      return answer.body ? JSON.parse(answer.body) : undefined;
    };
    const waitState = async (id: string, state: string): Promise<void> => {
      const deadline = Date.now() + 300_000;
      for (;;) {
        const vm = await api(names[0]!, 'GET', `/microvms/${id}`);
        if (vm.state === state) return;
        if (['FAILED', 'TERMINATED'].includes(vm.state) || Date.now() > deadline) throw new Error(`microVM ${id} is ${vm.state} (${vm.error}), waiting for ${state}`);
        await new Promise((r) => setTimeout(r, 25));
      }
    };
    const get = (name: string, id: string, token: string, agent?: http.Agent) =>
      call(gatewayPort(name), 'GET', '/', { host: `${id}.vm.localhost`, 'x-cocoon-token': token }, undefined, agent);
    const getOk = async (name: string, id: string, token: string, agent?: http.Agent): Promise<void> => {
      const answer = await get(name, id, token, agent);
      if (answer.status !== 200) throw new Error(`GET through ${name}: ${answer.status} ${answer.body.slice(0, 300)}`);
    };

    say('building the test app through host a');
    const upload = await api('a', 'POST', '/bundles', testAppBundle(scratch, { secondPort: 8081 }));
    const image = await api('a', 'POST', '/images', { name: 'bench-cluster', bundle: upload.uri, port: 8080, readiness: { httpPath: '/', timeoutSeconds: 300 } });
    for (;;) {
      const state = (await api('a', 'GET', `/images/${image.id}`)).state;
      if (state === 'READY') break;
      if (state === 'FAILED') throw new Error('the bench image failed to build');
      await new Promise((r) => setTimeout(r, 200));
    }

    // ---- forwarding's added latency -----------------------------------------------------
    const started = await api('a', 'POST', '/microvms', { image: image.id, idlePolicy: { maxIdleDurationSeconds: 3600 } });
    const id = started.id as string;
    const token = started.token as string;
    await waitState(id, 'RUNNING');
    let owner = nameOf((await c.lease(id)).hostId!);
    const other = names.find((n) => n !== owner)!;
    const agents = { owner: new http.Agent({ keepAlive: true, maxSockets: 1 }), other: new http.Agent({ keepAlive: true, maxSockets: 1 }) };
    for (let i = 0; i < 50; i++) {
      await getOk(owner, id, token, agents.owner);
      await getOk(other, id, token, agents.other);
    }
    const direct: number[] = [];
    const forwarded: number[] = [];
    for (let i = 0; i < 300; i++) {
      let t = performance.now();
      await getOk(owner, id, token, agents.owner);
      direct.push(elapsedMs(t));
      t = performance.now();
      await getOk(other, id, token, agents.other);
      forwarded.push(elapsedMs(t));
    }
    agents.owner.destroy();
    agents.other.destroy();
    metrics['cluster.gateway_owner_ms'] = summarize(direct);
    metrics['cluster.gateway_forwarded_ms'] = summarize(forwarded);
    metrics['cluster.forward_added_latency_ms'] = {
      ...summarize([]),
      p50: Math.round((metrics['cluster.gateway_forwarded_ms'].p50 - metrics['cluster.gateway_owner_ms'].p50) * 100) / 100,
      p95: Math.round((metrics['cluster.gateway_forwarded_ms'].p95 - metrics['cluster.gateway_owner_ms'].p95) * 100) / 100,
      n: direct.length,
    };
    say(`forwarding adds ${metrics['cluster.forward_added_latency_ms'].p50} ms (p50)`);

    // ---- wake on the same host vs on another host ---------------------------------------
    const same: number[] = [];
    const elsewhere: number[] = [];
    const dbClient = new pg.Client({ connectionString: c.state.databaseUrl });
    await dbClient.connect();
    try {
      for (let i = 0; i < runs; i++) {
        owner = nameOf((await c.lease(id)).hostId!);
        await api(owner, 'POST', `/microvms/${id}/suspend`);
        await waitState(id, 'SUSPENDED');
        let t = performance.now();
        await getOk(owner, id, token);
        same.push(elapsedMs(t));

        await api(owner, 'POST', `/microvms/${id}/suspend`);
        await waitState(id, 'SUSPENDED');
        const victim = owner;
        const waker = names.find((n) => n !== victim)!;
        await c.killHost(victim);
        // Wait until another host declared it dead (not part of the wake's time).
        const deadline = Date.now() + 60_000;
        for (;;) {
          const { rows } = await dbClient.query<{ state: string }>('SELECT state FROM hosts WHERE id = $1', [c.host(victim).id]);
          if (rows[0]?.state === 'DEAD') break;
          if (Date.now() > deadline) throw new Error(`host ${victim} was not declared dead within 60 s`);
          await new Promise((r) => setTimeout(r, 100));
        }
        t = performance.now();
        await getOk(waker, id, token);
        elsewhere.push(elapsedMs(t));
        const now = nameOf((await c.lease(id)).hostId!);
        if (now !== waker) throw new Error(`woken through ${waker} but owned by ${now}`);
        await c.startHost(victim);
        say(`wake round ${i + 1}: same host ${Math.round(same.at(-1)!)} ms, other host ${Math.round(elsewhere.at(-1)!)} ms`);
      }
    } finally {
      await dbClient.end();
    }
    metrics['cluster.wake_same_host_ms'] = summarize(same);
    metrics['cluster.wake_other_host_ms'] = summarize(elsewhere);
    await api(names[0]!, 'DELETE', `/microvms/${id}`).catch(() => undefined);

    // ---- launches per second with 1 and with 3 hosts ------------------------------------
    const launches = async (through: string[], count: number): Promise<number> => {
      const t = performance.now();
      const ids = await Promise.all(
        Array.from({ length: count }, async (_, i) => {
          const name = through[i % through.length]!;
          const vm = await api(name, 'POST', '/microvms', { image: image.id, idlePolicy: { maxIdleDurationSeconds: 3600 } });
          for (;;) {
            const answer = await get(name, vm.id, vm.token);
            if (answer.status === 200) break;
            if (answer.status !== 503 && answer.status !== 502) throw new Error(`launch through ${name}: ${answer.status} ${answer.body.slice(0, 300)}`);
            await new Promise((r) => setTimeout(r, 20));
          }
          return vm.id as string;
        }),
      );
      const seconds = elapsedMs(t) / 1000;
      for (const vm of ids) await api(names[0]!, 'DELETE', `/microvms/${vm}`).catch(() => undefined);
      return count / seconds;
    };
    const count = 6;
    metrics['cluster.launches_per_s_1host'] = single(await launches(['a'], count), 'rps');
    metrics['cluster.launches_per_s_3hosts'] = single(await launches(names, count), 'rps');
    say(`launches/s: 1 host ${metrics['cluster.launches_per_s_1host'].p50}, 3 hosts ${metrics['cluster.launches_per_s_3hosts'].p50}`);
    return metrics;
  } finally {
    await clusterDown(dir, { purge: true });
  }
}
