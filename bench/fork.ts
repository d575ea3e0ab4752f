/**
 * Fork and checkpoint (issue 16) against a real daemon (a child process) with real QEMU,
 * measured side by side in one run, interleaved:
 *
 *   fork.restore_first_byte_ms      POST /microvms → first answer through the gateway (the reference: a restore)
 *   fork.fork1_first_byte_ms        POST /microvms/{id}/fork {count: 1} → the fork's first answer through the gateway
 *   fork.fork1_answer_ms            POST …/fork {count: 1} → its answer (the fork RUNNING)
 *   fork.fork1_over_restore_ms      fork.fork1_first_byte_ms p50 − fork.restore_first_byte_ms p50 (goal ≤ 20 ms)
 *   fork.fork8_first_byte_ms        POST …/fork {count: 8} → every fork has answered once
 *   fork.source_paused_ms           how long the source's vCPUs were stopped per fork (the server's figure; goal ≤ 30 ms)
 *   fork.source_stall_ms            the longest answer of the source to requests sent back to back during a fork
 *   fork.checkpoint_ready_ms        POST …/checkpoint → the image READY (polled every 10 ms)
 *
 *   node bench/fork.ts [--runs N]
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { getImage } from '../src/store/images.ts';
import { openMetadataStore } from '../src/store/open.ts';
import type { Database } from '../src/store/sql.ts';
import { findTenantByName } from '../src/store/tenants.ts';
import { spawnDaemon, type Daemon } from '../test/support/daemon.ts';
import { createTestImage } from '../test/support/image.ts';
import { apiClient, gatewayRequest } from '../test/support/server.ts';
import { endDaemonRun } from './cleanup.ts';
import { elapsedMs, type Metrics, single, summarize } from './stats.ts';

export interface ForkBenchOptions {
  runs?: number;
  log?: (line: string) => void;
}

interface Vm {
  id: string;
  token: string;
}

export async function runForkBench(options: ForkBenchOptions = {}): Promise<Metrics> {
  const runs = options.runs ?? 10;
  const say = options.log ?? (() => undefined);
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'cocoon-bench-fork-'));
  let daemon: Daemon | undefined;
  let db: Database | undefined;
  const metrics: Metrics = {};
  try {
    daemon = await spawnDaemon(dataDir, process.env.COCOON_BENCH_VERBOSE === '1' ? { COCOON_LOG_LEVEL: 'info' } : {});
    const adminKey = fs.readFileSync(path.join(dataDir, 'admin-api-key'), 'utf8').trim();
    const api = apiClient(daemon.info.apiUrl, adminKey);
    const gatewayPort = daemon.info.gatewayPort;
    db = (await openMetadataStore(dataDir)).db;
    const admin = await findTenantByName(db, 'admin');
    const image = await createTestImage({ db, dataDir, tenantId: admin!.id, idle: true });
    say(`image ${image.arn} ready`);

    const get = async (vm: Vm, route = '/'): Promise<void> => {
      const answer = await gatewayRequest(gatewayPort, vm.id, vm.token, route);
      if (answer.status !== 200) throw new Error(`GET ${route} of ${vm.id}: ${answer.status} ${answer.body}`);
    };
    const start = async (): Promise<Vm> => {
      const answer = await api('POST', '/microvms', { image: image.id, idlePolicy: { maxIdleDurationSeconds: 3600 } });
      if (answer.status !== 201) throw new Error(`start: ${answer.status} ${JSON.stringify(answer.body)}`);
      return { id: answer.body.id, token: answer.body.token };
    };
    const fork = async (source: Vm, count: number): Promise<{ forks: Vm[]; pausedMs: number }> => {
      const answer = await api('POST', `/microvms/${source.id}/fork`, { count });
      if (answer.status !== 201) throw new Error(`fork: ${answer.status} ${JSON.stringify(answer.body)}`);
      return { forks: answer.body.items.map((item: Vm) => ({ id: item.id, token: item.token })), pausedMs: answer.body.sourcePausedMs };
    };
    const terminate = async (vms: Vm[]) => {
      for (const vm of vms) await api('DELETE', `/microvms/${vm.id}`);
    };

    const source = await start();
    await get(source);
    const restore: number[] = [];
    const fork1: number[] = [];
    const forkApi: number[] = [];
    const paused: number[] = [];
    const stall: number[] = [];
    for (let i = 0; i < runs; i++) {
      // A restore and a fork of one, one after the other: the machine's drift touches both alike.
      let started = performance.now();
      const launched = await start();
      await get(launched);
      restore.push(elapsedMs(started));
      await terminate([launched]);

      // Requests to the source back to back while it is forked: the longest says what its users saw.
      let probing = true;
      let longest = 0;
      const probe = (async () => {
        while (probing) {
          const t = performance.now();
          await get(source);
          longest = Math.max(longest, elapsedMs(t));
        }
      })();
      started = performance.now();
      const { forks, pausedMs } = await fork(source, 1);
      forkApi.push(elapsedMs(started));
      await get(forks[0]!);
      fork1.push(elapsedMs(started));
      probing = false;
      await probe;
      paused.push(pausedMs);
      stall.push(longest);
      await terminate(forks);
    }
    metrics['fork.restore_first_byte_ms'] = summarize(restore);
    metrics['fork.fork1_first_byte_ms'] = summarize(fork1);
    metrics['fork.fork1_answer_ms'] = summarize(forkApi);
    metrics['fork.fork1_over_restore_ms'] = single(metrics['fork.fork1_first_byte_ms'].p50 - metrics['fork.restore_first_byte_ms'].p50, 'ms');
    say(`restore → first byte p50 ${metrics['fork.restore_first_byte_ms'].p50} ms; fork of 1 → first byte p50 ${metrics['fork.fork1_first_byte_ms'].p50} ms`);

    const fork8: number[] = [];
    for (let i = 0; i < Math.max(1, Math.ceil(runs / 3)); i++) {
      const started = performance.now();
      const { forks, pausedMs } = await fork(source, 8);
      await Promise.all(forks.map((f) => get(f)));
      fork8.push(elapsedMs(started));
      paused.push(pausedMs);
      await terminate(forks);
    }
    metrics['fork.fork8_first_byte_ms'] = summarize(fork8);
    metrics['fork.source_paused_ms'] = summarize(paused);
    metrics['fork.source_stall_ms'] = summarize(stall);
    say(`fork of 8 → every first byte p50 ${metrics['fork.fork8_first_byte_ms'].p50} ms; source paused p50 ${metrics['fork.source_paused_ms'].p50} ms`);

    const checkpoint: number[] = [];
    const images: string[] = [];
    for (let i = 0; i < Math.max(1, Math.ceil(runs / 2)); i++) {
      const started = performance.now();
      const answer = await api('POST', `/microvms/${source.id}/checkpoint`, { name: 'bench-checkpoint' });
      if (answer.status !== 202) throw new Error(`checkpoint: ${answer.status} ${JSON.stringify(answer.body)}`);
      for (;;) {
        // The bench daemon runs the microVM module only: the image is read from the store.
        const state = (await getImage(db, answer.body.id))?.state;
        if (state === 'READY') break;
        if (state !== 'SNAPSHOTTING') throw new Error(`checkpoint image ${answer.body.id} is ${state}`);
        await new Promise((resolve) => setTimeout(resolve, 10));
      }
      checkpoint.push(elapsedMs(started));
      images.push(answer.body.id);
    }
    metrics['fork.checkpoint_ready_ms'] = summarize(checkpoint);
    if (process.env.COCOON_BENCH_VERBOSE === '1') {
      for (const line of daemon.output().split('\n')) if (/fork point taken|microVM forked|vm started/.test(line)) say(line);
    }
    say(`checkpoint → READY p50 ${metrics['fork.checkpoint_ready_ms'].p50} ms`);
    await terminate([source]);
    return metrics;
  } finally {
    await endDaemonRun({ daemon, db, dataDir });
  }
}

if (import.meta.main) {
  const { values } = parseArgs({ options: { runs: { type: 'string' } } });
  const metrics = await runForkBench({ ...(values.runs ? { runs: Number(values.runs) } : {}), log: (line) => console.error(line) });
  console.log(JSON.stringify(metrics, null, 2));
}
