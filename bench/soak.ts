/**
 * Load and soak (issue 6): many microVMs behind one real daemon (a child process), many
 * concurrent requests through the gateway, idle suspends and wake-ups interleaved, for a
 * bounded time. Every microVM runs the C test app, whose `/count` answers a counter kept in the
 * guest's memory: the answers a microVM gives over the run must be consecutive numbers, each once, or
 * some state was lost (a counter that restarted) or a request was answered twice.
 *
 * Each microVM alternates bursts (its share of the clients, back to back) with quiet spells
 * longer than its idle timeout, so that it is suspended and woken again and again while the
 * others carry load. Reported:
 *
 *   soak.requests              requests sent
 *   soak.failed                requests that did not end in a 200 (a 503 retried is not one; see soak.retried)
 *   soak.retried               503 + Retry-After answers (wake or busy bounds) that a retry then served
 *   soak.lost_state            microVMs whose counter answers were not consecutive, each once
 *   soak.suspends / resumes    idle suspends and wakes done during the run (from the store)
 *   soak.request_ms            latency of each successful request (p50, p95; wakes included)
 *   soak.wake_request_ms       latency of the first request of each burst (usually a wake)
 *   soak.daemon_rss_mib        the daemon's RSS sampled through the run (p50, p95)
 *   soak.daemon_rss_growth_mib RSS at the end minus RSS after the warm-up
 *
 *   npm run bench -- soak [--seconds 120]    (COCOON_SOAK_MICROVMS, COCOON_SOAK_CLIENTS, COCOON_SOAK_IDLE_SECONDS)
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Pool } from 'undici';
import { getMicrovm } from '../src/store/microvms.ts';
import { openMetadataStore } from '../src/store/open.ts';
import type { Database } from '../src/store/sql.ts';
import { findTenantByName } from '../src/store/tenants.ts';
import { spawnDaemon, type Daemon } from '../test/support/daemon.ts';
import { createTestImage, TESTAPP_PORT } from '../test/support/image.ts';
import { apiClient } from '../test/support/server.ts';
import { endDaemonRun } from './cleanup.ts';
import { type Metrics, elapsedMs, single, summarize } from './stats.ts';

export interface SoakOptions {
  seconds?: number;
  microvms?: number;
  /** Concurrent clients in all (each microVM's bursts get clients / microvms of them). */
  clients?: number;
  idleSeconds?: number;
  log?: (line: string) => void;
}

interface Target {
  id: string;
  token: string;
  /** Every counter value this microVM answered. */
  counts: number[];
}

interface Tally {
  requests: number;
  failed: number;
  retried: number;
  latency: number[];
  wakeLatency: number[];
  failures: string[];
}

const MiB = 1024 * 1024;

export async function runSoakBench(options: SoakOptions = {}): Promise<Metrics> {
  const seconds = options.seconds ?? envNumber('COCOON_SOAK_SECONDS', 120);
  const count = options.microvms ?? envNumber('COCOON_SOAK_MICROVMS', 8);
  const clients = options.clients ?? envNumber('COCOON_SOAK_CLIENTS', 32);
  const idleSeconds = options.idleSeconds ?? envNumber('COCOON_SOAK_IDLE_SECONDS', 2);
  const say = options.log ?? (() => undefined);
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'cocoon-bench-soak-'));
  let daemon: Daemon | undefined;
  let db: Database | undefined;
  let pool: Pool | undefined;
  try {
    daemon = await spawnDaemon(dataDir, { COCOON_LOG_LEVEL: 'warn' });
    const adminKey = fs.readFileSync(path.join(dataDir, 'admin-api-key'), 'utf8').trim();
    const api = apiClient(daemon.info.apiUrl, adminKey);
    db = (await openMetadataStore(dataDir)).db;
    const admin = await findTenantByName(db, 'admin');
    const image = await createTestImage({ db, dataDir, tenantId: admin!.id, idle: true });
    const targets: Target[] = [];
    for (let i = 0; i < count; i++) {
      const answer = await api('POST', '/microvms', { image: image.id, idlePolicy: { maxIdleDurationSeconds: idleSeconds } });
      if (answer.status !== 201) throw new Error(`start: ${answer.status} ${JSON.stringify(answer.body)}`);
      targets.push({ id: answer.body.id, token: answer.body.token, counts: [] });
    }
    pool = new Pool(`http://127.0.0.1:${daemon.info.gatewayPort}`, { connections: clients, keepAliveTimeout: 60_000 });
    const tally: Tally = { requests: 0, failed: 0, retried: 0, latency: [], wakeLatency: [], failures: [] };
    // Warm-up: every microVM answers once (its counter's 1) before memory is first sampled.
    await Promise.all(targets.map((target) => countOnce(pool!, target, tally)));
    const rss = [daemonRssMiB(daemon.info.pid)];
    const generationsBefore = await generations(db, targets);
    say(`${count} microVMs up; ${clients} clients for ${seconds} s, idle timeout ${idleSeconds} s`);
    const sampler = setInterval(() => rss.push(daemonRssMiB(daemon!.info.pid)), 2000);
    const end = Date.now() + seconds * 1000;
    const perTarget = Math.max(1, Math.floor(clients / count));
    try {
      await Promise.all(targets.map((target, index) => cycle(pool!, target, tally, { end, perTarget, idleSeconds, seed: index })));
    } finally {
      clearInterval(sampler);
    }
    rss.push(daemonRssMiB(daemon.info.pid));
    const generationsAfter = await generations(db, targets);
    const suspends = generationsAfter - generationsBefore;
    const lost = targets.filter((target) => !consecutiveOnce(target.counts));
    for (const target of lost) say(`LOST STATE: ${target.id} answered ${describeCounts(target.counts)}`);
    for (const failure of tally.failures.slice(0, 10)) say(`failed: ${failure}`);
    const metrics: Metrics = {
      'soak.requests': single(tally.requests, 'count'),
      'soak.failed': single(tally.failed, 'count'),
      'soak.retried': single(tally.retried, 'count'),
      'soak.lost_state': single(lost.length, 'count'),
      'soak.suspends': single(suspends, 'count'),
      'soak.resumes': single(Math.max(0, suspends - (await suspendedNow(db, targets))), 'count'),
      'soak.request_ms': summarize(tally.latency),
      'soak.wake_request_ms': summarize(tally.wakeLatency),
      'soak.daemon_rss_mib': summarize(rss, 'MiB'),
      'soak.daemon_rss_growth_mib': single(rss.at(-1)! - rss[0]!, 'MiB'),
    };
    say(
      `${tally.requests} requests, ${tally.failed} failed, ${tally.retried} retried after 503, ${lost.length} microVMs lost state; ` +
        `${suspends} suspends; daemon RSS ${rss[0]!.toFixed(0)} → ${rss.at(-1)!.toFixed(0)} MiB (max ${Math.max(...rss).toFixed(0)})`,
    );
    for (const target of targets) await api('DELETE', `/microvms/${target.id}`);
    return metrics;
  } catch (error) {
    if (daemon) console.error(`the daemon's last words:\n${daemon.output().slice(-4000)}`);
    throw error;
  } finally {
    await pool?.close();
    await endDaemonRun({ daemon, db, dataDir });
  }
}

/** Bursts of 1-4 s with `perTarget` clients, then quiet for 1.5-3× the idle timeout (a suspend). */
async function cycle(pool: Pool, target: Target, tally: Tally, o: { end: number; perTarget: number; idleSeconds: number; seed: number }): Promise<void> {
  let random = o.seed + 1;
  const next = () => {
    random = (random * 1103515245 + 12345) % 2147483648;
    return random / 2147483648;
  };
  // Stagger the microVMs so that suspends and wakes of some overlap bursts of others.
  await sleep(next() * o.idleSeconds * 1000);
  while (Date.now() < o.end) {
    const burstEnd = Math.min(o.end, Date.now() + 1000 + next() * 3000);
    const started = performance.now();
    await countOnce(pool, target, tally);
    tally.wakeLatency.push(elapsedMs(started));
    await Promise.all(
      Array.from({ length: o.perTarget }, async () => {
        while (Date.now() < burstEnd) await countOnce(pool, target, tally);
      }),
    );
    const quiet = o.idleSeconds * 1000 * (1.5 + 1.5 * next());
    if (Date.now() + quiet >= o.end) break;
    await sleep(quiet);
  }
}

/** GET /count through the gateway; a 503 with Retry-After is retried (up to 5 times). */
async function countOnce(pool: Pool, target: Target, tally: Tally): Promise<void> {
  tally.requests++;
  const started = performance.now();
  for (let attempt = 0; ; attempt++) {
    try {
      const { statusCode, headers, body } = await pool.request({
        path: '/count',
        method: 'GET',
        headers: { host: `${target.id}.vm.localhost`, 'x-cocoon-token': target.token, 'x-cocoon-port': String(TESTAPP_PORT) },
        headersTimeout: 60_000,
        bodyTimeout: 60_000,
      });
      const text = await body.text();
      if (statusCode === 200) {
        target.counts.push(Number(text.trim()));
        tally.latency.push(elapsedMs(started));
        return;
      }
      if (statusCode === 503 && headers['retry-after'] && attempt < 5) {
        tally.retried++;
        await sleep(Number(headers['retry-after']) * 1000);
        continue;
      }
      tally.failed++;
      tally.failures.push(`${target.id}: ${statusCode} ${text.slice(0, 200)}`);
      return;
    } catch (error) {
      tally.failed++;
      tally.failures.push(`${target.id}: ${(error as Error).message}`);
      return;
    }
  }
}

/** The answers are consecutive, each once (the image's own readiness checks may have counted before). */
function consecutiveOnce(counts: number[]): boolean {
  const sorted = [...counts].sort((a, b) => a - b);
  return sorted.every((value, index) => value === sorted[0]! + index);
}

function describeCounts(counts: number[]): string {
  const sorted = [...counts].sort((a, b) => a - b);
  const duplicates = sorted.filter((value, index) => index > 0 && value === sorted[index - 1]);
  return `${counts.length} answers, max ${sorted.at(-1)}, duplicates ${duplicates.slice(0, 10).join(',') || 'none'}`;
}

async function generations(db: Database, targets: Target[]): Promise<number> {
  let total = 0;
  for (const target of targets) total += Number((await getMicrovm(db, target.id))?.runtime.generation ?? 0);
  return total;
}

async function suspendedNow(db: Database, targets: Target[]): Promise<number> {
  let suspended = 0;
  for (const target of targets) if ((await getMicrovm(db, target.id))?.state === 'SUSPENDED') suspended++;
  return suspended;
}

function daemonRssMiB(pid: number): number {
  const match = /VmRSS:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  return match ? (Number(match[1]) * 1024) / MiB : Number.NaN;
}

function envNumber(name: string, fallback: number): number {
  const value = process.env[name];
  if (value === undefined || value === '') return fallback;
  const parsed = Number(value);
  if (!Number.isInteger(parsed) || parsed < 1) throw new Error(`${name} must be a positive integer, got ${value}`);
  return parsed;
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
