/**
 * Exec benchmarks (issue 11) against a real daemon (a child process) with real QEMU:
 *
 *   exec.roundtrip_ms        POST /exec of `true` on a RUNNING microVM → its exit event (keep-alive client)
 *   exec.wake_roundtrip_ms   the same on a SUSPENDED microVM (the wake included)
 *   exec.upload_mib_s        PUT /files of 64 MiB (into the guest's tmpfs) → 201
 *   exec.download_mib_s      GET /files of the same 64 MiB, read to the end
 *   exec.pty_echo_ms         one keystroke into a PTY shell over the WebSocket → its echo back
 *
 * Goals under TCG (issue 11): round trip p50 ≤ 20 ms; upload and download ≥ 100 MiB/s.
 */
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import WebSocket from 'ws';
import { openMetadataStore } from '../src/store/open.ts';
import type { Database } from '../src/store/sql.ts';
import { findTenantByName } from '../src/store/tenants.ts';
import { spawnDaemon, type Daemon } from '../test/support/daemon.ts';
import { createTestImage } from '../test/support/image.ts';
import { apiClient } from '../test/support/server.ts';
import { endDaemonRun } from './cleanup.ts';
import { elapsedMs, type Metrics, summarize } from './stats.ts';

const MiB = 1024 * 1024;

export async function runExecBench(options: { runs?: number; log?: (line: string) => void } = {}): Promise<Metrics> {
  const runs = options.runs ?? 20;
  const say = options.log ?? (() => undefined);
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'cocoon-bench-exec-'));
  let daemon: Daemon | undefined;
  let db: Database | undefined;
  const agent = new http.Agent({ keepAlive: true, maxSockets: 4 });
  const metrics: Metrics = {};
  try {
    daemon = await spawnDaemon(dataDir);
    const key = fs.readFileSync(path.join(dataDir, 'admin-api-key'), 'utf8').trim();
    const api = apiClient(daemon.info.apiUrl, key);
    const port = Number(new URL(daemon.info.apiUrl).port);
    db = (await openMetadataStore(dataDir)).db;
    const admin = await findTenantByName(db, 'admin');
    const image = await createTestImage({ db, dataDir, tenantId: admin!.id, idle: true });
    const started = await api('POST', '/microvms', { image: image.id, idlePolicy: { maxIdleDurationSeconds: 3600 } });
    if (started.status !== 201) throw new Error(`start: ${started.status} ${JSON.stringify(started.body)}`);
    const id = started.body.id as string;

    const call = (method: string, route: string, body?: Buffer | string, headers: Record<string, string> = {}): Promise<{ status: number; body: Buffer }> =>
      new Promise((resolve, reject) => {
        const req = http.request({ host: '127.0.0.1', port, method, path: `/api/v1${route}`, agent, headers: { authorization: `Bearer ${key}`, ...headers } }, (res) => {
          const chunks: Buffer[] = [];
          res.on('data', (c: Buffer) => chunks.push(c));
          res.on('end', () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks) }));
          res.on('error', reject);
        });
        req.on('error', reject);
        req.end(body);
      });
    const exec = async (command: string[]): Promise<void> => {
      const r = await call('POST', `/microvms/${id}/exec`, JSON.stringify({ command }), { 'content-type': 'application/json' });
      if (r.status !== 200 || !r.body.toString().includes('"type":"exit","exitCode":0')) throw new Error(`exec: ${r.status} ${r.body.toString().slice(0, 500)}`);
    };
    await exec(['/bin/busybox', 'true']); // the agent connection is made once

    const roundtrip: number[] = [];
    for (let i = 0; i < runs * 5; i++) {
      const t = performance.now();
      await exec(['/bin/busybox', 'true']);
      roundtrip.push(elapsedMs(t));
    }
    metrics['exec.roundtrip_ms'] = summarize(roundtrip);
    say(`exec round trip: p50 ${metrics['exec.roundtrip_ms'].p50} ms`);

    const wake: number[] = [];
    for (let i = 0; i < Math.max(3, Math.round(runs / 2)); i++) {
      const s = await api('POST', `/microvms/${id}/suspend`);
      if (s.body?.state !== 'SUSPENDED') throw new Error(`suspend: ${s.status} ${JSON.stringify(s.body)}`);
      const t = performance.now();
      await exec(['/bin/busybox', 'true']);
      wake.push(elapsedMs(t));
    }
    metrics['exec.wake_roundtrip_ms'] = summarize(wake);
    say(`exec on a SUSPENDED microVM: p50 ${metrics['exec.wake_roundtrip_ms'].p50} ms`);

    const size = 64 * MiB;
    const payload = Buffer.alloc(size);
    for (let i = 0; i < size; i += 4) payload.writeUInt32LE((i * 2654435761) >>> 0, i);
    const up: number[] = [];
    const down: number[] = [];
    for (let i = 0; i < Math.max(3, Math.round(runs / 4)); i++) {
      let t = performance.now();
      const u = await call('PUT', `/microvms/${id}/files?path=/dev/shm/bench`, payload, { 'content-type': 'application/octet-stream' });
      if (u.status !== 201) throw new Error(`upload: ${u.status} ${u.body.toString()}`);
      up.push(size / MiB / (elapsedMs(t) / 1000));
      t = performance.now();
      const d = await call('GET', `/microvms/${id}/files?path=/dev/shm/bench`);
      if (d.status !== 200 || d.body.length !== size) throw new Error(`download: ${d.status} ${d.body.length}`);
      down.push(size / MiB / (elapsedMs(t) / 1000));
      await exec(['/bin/busybox', 'rm', '/dev/shm/bench']); // the next upload's temporary file needs the room
    }
    metrics['exec.upload_mib_s'] = summarize(up, 'MiB/s');
    metrics['exec.download_mib_s'] = summarize(down, 'MiB/s');
    say(`upload ${metrics['exec.upload_mib_s'].p50} MiB/s, download ${metrics['exec.download_mib_s'].p50} MiB/s`);

    const echo = await ptyEcho(`ws://127.0.0.1:${port}/api/v1/microvms/${id}/exec/ws`, key, runs * 2);
    metrics['exec.pty_echo_ms'] = summarize(echo);
    say(`PTY keystroke echo: p50 ${metrics['exec.pty_echo_ms'].p50} ms`);
    await api('DELETE', `/microvms/${id}`);
    return metrics;
  } catch (error) {
    if (daemon) console.error(`the daemon's last words:\n${daemon.output().slice(-4000)}`);
    throw error;
  } finally {
    agent.destroy();
    await endDaemonRun({ daemon, db, dataDir });
  }
}

/** Opens a PTY shell and times single keystrokes (letters, echoed by the terminal) until their echo. */
async function ptyEcho(url: string, key: string, count: number): Promise<number[]> {
  const ws = new WebSocket(url, { headers: { authorization: `Bearer ${key}` } });
  await new Promise<void>((resolve, reject) => {
    ws.once('open', () => resolve());
    ws.once('error', reject);
  });
  let output = '';
  let waiter: (() => void) | undefined;
  ws.on('message', (data, isBinary) => {
    if (!isBinary) return;
    output += (data as Buffer).subarray(1).toString('latin1');
    waiter?.();
  });
  const waitFor = (text: string) =>
    new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no echo of ${JSON.stringify(text)}; output ${JSON.stringify(output.slice(-200))}`)), 30_000);
      const check = () => {
        if (output.includes(text)) {
          clearTimeout(timer);
          waiter = undefined;
          resolve();
        }
      };
      waiter = check;
      check();
    });
  ws.send(JSON.stringify({ type: 'start', command: ['/bin/sh'], tty: true, cols: 80, rows: 24 }));
  ws.send(Buffer.from('echo READY\n'));
  await waitFor('READY\r\n');
  const times: number[] = [];
  for (let i = 0; i < count; i++) {
    output = '';
    const key = String.fromCharCode(97 + (i % 26));
    const t = performance.now();
    ws.send(Buffer.from(key));
    await waitFor(key);
    times.push(elapsedMs(t));
  }
  ws.close();
  return times;
}
