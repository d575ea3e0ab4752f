/**
 * E2B benchmarks (issue 13), the unmodified `e2b` SDK against a real Cocoon (in this process:
 * API, gateway and the E2B surface; real QEMU) on a Debian image prepared like E2B's `base`:
 *
 *   e2b.create_first_command_ms     Sandbox.create('base') → first commands.run('true') result
 *                                   (time to interactive, as the outside leaderboards quote it)
 *   e2b.connect_paused_first_command_ms
 *                                   Sandbox.connect of a paused sandbox → first commands.run result
 *   e2b.command_roundtrip_ms        commands.run('true') on a RUNNING sandbox (what the command
 *                                   itself costs: envd on the agent, `bash -l -c`)
 *
 * Goal under TCG: both p50 ≤ 400 ms. The image build is not timed.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Sandbox } from 'e2b';
import { e2bModule } from '../src/compat/e2b/module.ts';
import { loadConfig } from '../src/config/config.ts';
import { imagesModule } from '../src/wiring/images.ts';
import { microvmModule } from '../src/wiring/microvms.ts';
import { startServer, type RunningServer } from '../src/server.ts';
import { client, makeBundle } from '../test/images/helpers.ts';
import { cleanupDir } from '../test/support/vm.ts';
import { elapsedMs, type Metrics, summarize } from './stats.ts';

export async function runE2bBench(options: { runs?: number; log?: (line: string) => void } = {}): Promise<Metrics> {
  const runs = options.runs ?? 10;
  const say = options.log ?? (() => undefined);
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'cocoon-bench-e2b-'));
  // The server runs in this process: its request log would drown the figures.
  process.env.COCOON_LOG_LEVEL ??= 'warn';
  let server: RunningServer | undefined;
  const sandboxes: Sandbox[] = [];
  try {
    const microvms = microvmModule();
    server = await startServer({ ...loadConfig({ COCOON_DATA_DIR: dataDir }), apiPort: 0, gatewayPort: 0 }, [imagesModule(), microvms, e2bModule(microvms)]);
    const key = fs.readFileSync(path.join(dataDir, 'admin-api-key'), 'utf8').trim();
    const api = client(server.apiUrl, key);
    const upload = await api.uploadBundle(
      await makeBundle({ Dockerfile: 'FROM debian:bookworm-slim\nRUN useradd -m -s /bin/bash user\nUSER user\nWORKDIR /home/user\nCMD ["sleep", "infinity"]\n' }),
    );
    if (upload.status !== 201) throw new Error(`bundle: ${upload.status} ${upload.text}`);
    const image = await api.post('/images', { name: 'base', bundle: upload.body.uri, port: null });
    if (image.status !== 202) throw new Error(`image: ${image.status} ${image.text}`);
    const ready = await api.waitForState(image.body.id, ['READY', 'FAILED'], 850_000);
    if (ready.state !== 'READY') throw new Error(`image: ${ready.error}`);
    const opts = { apiUrl: `${server.apiUrl}/e2b`, sandboxUrl: `http://127.0.0.1:${microvms.gatewayPort}`, apiKey: key };

    // One untimed round first: connection pools, the JIT, page cache of the image's snapshot.
    const warm = await Sandbox.create('base', opts);
    await warm.commands.run('true');
    await warm.kill();

    const create: number[] = [];
    const connect: number[] = [];
    const roundtrip: number[] = [];
    for (let i = 0; i < runs; i++) {
      let t = performance.now();
      const sandbox = await Sandbox.create('base', opts);
      sandboxes.push(sandbox);
      await sandbox.commands.run('true');
      create.push(elapsedMs(t));
      // On the running sandbox: what one command costs by itself (envd over the agent, bash -l).
      for (let j = 0; j < 3; j++) {
        t = performance.now();
        await sandbox.commands.run('true');
        roundtrip.push(elapsedMs(t));
      }

      await sandbox.pause();
      t = performance.now();
      const back = await Sandbox.connect(sandbox.sandboxId, opts);
      await back.commands.run('true');
      connect.push(elapsedMs(t));
      await back.kill();
      sandboxes.pop();
    }
    const metrics: Metrics = {
      'e2b.create_first_command_ms': summarize(create),
      'e2b.connect_paused_first_command_ms': summarize(connect),
      'e2b.command_roundtrip_ms': summarize(roundtrip),
    };
    say(`Sandbox.create → first command: p50 ${metrics['e2b.create_first_command_ms']!.p50} ms`);
    say(`connect of a paused sandbox → first command: p50 ${metrics['e2b.connect_paused_first_command_ms']!.p50} ms`);
    say(`commands.run('true') on a running sandbox: p50 ${metrics['e2b.command_roundtrip_ms']!.p50} ms`);
    return metrics;
  } finally {
    for (const sandbox of sandboxes) await sandbox.kill().catch(() => undefined);
    await server?.close();
    cleanupDir(dataDir);
  }
}
