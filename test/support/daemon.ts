/**
 * A Cocoon server in a process of its own, for tests that kill it (SIGKILL at chosen points of
 * a suspend or resume) and benchmarks that measure it apart from their load generator.
 *
 * As a program (`node test/support/daemon.ts`): runs `startServer` with the default modules'
 * microVM subsystem, API and gateway on ports from the environment (0 = any). Environment:
 *   COCOON_DATA_DIR            required
 *   COCOON_TEST_PAUSE_AT       a lifecycle pause point ('suspend:state-saved', …): on reaching
 *                              it the daemon writes `<data dir>/paused` and hangs there
 *   COCOON_ON_STOP             `suspend` (default) or `leave` RUNNING microVMs on SIGTERM
 *   COCOON_TEST_RESUME_PHASES  a file: each resume's phases are appended to it, one JSON line
 *                              {"microvmId", "reason", "phases"} (bench/microvm.ts reads them)
 *   COCOON_TEST_RESTORE_TUNING a file: on SIGUSR2 the daemon reads it (JSON, e.g.
 *                              {"pooledInline": false}), sets those switches of the VM driver's
 *                              `restoreTuning` (src/vmm/qemu/tuning.ts) or of the gateway's
 *                              `gatewayTuning` (src/gateway/tuning.ts) and writes `<file>.applied`
 *                              (bench/microvm.ts: the old way beside the new in one run)
 *   COCOON_TEST_GATEWAY_CLIENT the gateway's upstream client (`adaptive`, `undici`, `node`;
 *                              GatewayOptions.upstreamClient): the bench's before/after
 *   COCOON_DATABASE_URL        a PostgreSQL database: the daemon is a host of a cluster
 *                              (registers, heartbeats, runs microVMs under leases)
 * Once up it prints one line `COCOON_DAEMON_READY {"apiUrl", "gatewayPort", "pid", "recovery"}`.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { RecoveryReport } from '../../src/lifecycle/recovery.ts';

const READY = 'COCOON_DAEMON_READY ';

export interface DaemonInfo {
  apiUrl: string;
  gatewayPort: number;
  pid: number;
  recovery: RecoveryReport;
}

export interface Daemon {
  child: ChildProcess;
  info: DaemonInfo;
  /** Everything it printed (for failure messages). */
  output(): string;
  /** SIGKILL, then wait for the exit. */
  kill(): Promise<void>;
  /** SIGTERM (a graceful stop), then wait for the exit. */
  stop(): Promise<void>;
}

/** Starts the daemon and resolves once it is up (or rejects with its output). */
export async function spawnDaemon(dataDir: string, env: Record<string, string> = {}, timeoutMs = 120_000): Promise<Daemon> {
  const node = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../node_modules/.bin/node');
  const child = spawn(node, ['--disable-warning=ExperimentalWarning', fileURLToPath(import.meta.url)], {
    env: { ...process.env, NODE_ENV: 'test', COCOON_DATA_DIR: dataDir, COCOON_API_PORT: '0', COCOON_GATEWAY_PORT: '0', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let output = '';
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  const info = await new Promise<DaemonInfo>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`the daemon did not start within ${timeoutMs} ms:\n${output}`)), timeoutMs);
    const onData = (chunk: Buffer) => {
      output += chunk.toString('utf8');
      const line = output.split('\n').find((l) => l.startsWith(READY));
      if (line) {
        clearTimeout(timer);
        resolve(JSON.parse(line.slice(READY.length)) as DaemonInfo);
      }
    };
    child.stdout!.on('data', onData);
    child.stderr!.on('data', (chunk: Buffer) => (output += chunk.toString('utf8')));
    void exited.then(() => {
      clearTimeout(timer);
      reject(new Error(`the daemon exited while starting:\n${output}`));
    });
  });
  return {
    child,
    info,
    output: () => output,
    async kill() {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
      await exited;
    },
    async stop() {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
      await exited;
    },
  };
}

/** Waits until the daemon reached its pause point; answers what `paused` says ("<point> <microvm id>"). */
export async function waitForPause(dataDir: string, timeoutMs = 60_000): Promise<string> {
  const file = path.join(dataDir, 'paused');
  const deadline = Date.now() + timeoutMs;
  while (!fs.existsSync(file)) {
    if (Date.now() > deadline) throw new Error(`the daemon did not reach its pause point within ${timeoutMs} ms`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  const content = fs.readFileSync(file, 'utf8');
  fs.rmSync(file);
  return content;
}

async function main(): Promise<void> {
  const { loadConfig } = await import('../../src/config/config.ts');
  const { microvmModule } = await import('../../src/wiring/microvms.ts');
  const { startServer } = await import('../../src/server.ts');
  const { clusterModule } = await import('../../src/wiring/cluster.ts');
  const config = loadConfig();
  const pausePoint = process.env.COCOON_TEST_PAUSE_AT;
  const phasesFile = process.env.COCOON_TEST_RESUME_PHASES;
  const upstreamClient = process.env.COCOON_TEST_GATEWAY_CLIENT;
  if (upstreamClient !== undefined && upstreamClient !== 'adaptive' && upstreamClient !== 'undici' && upstreamClient !== 'node') {
    throw new Error(`COCOON_TEST_GATEWAY_CLIENT must be adaptive, undici or node, not ${upstreamClient}`);
  }
  const module = microvmModule({
    ...(upstreamClient ? { gateway: { upstreamClient } } : {}),
    lifecycle: {
      onStop: process.env.COCOON_ON_STOP === 'leave' ? 'leave' : 'suspend',
      ...(phasesFile
        ? {
            // Written after the answer's way is clear (not awaited): the bench waits for the line.
            onResumePhases: (microvmId: string, reason: string, phases: Readonly<Record<string, number>>) =>
              void fs.promises.appendFile(phasesFile, `${JSON.stringify({ microvmId, reason, phases })}\n`),
          }
        : {}),
      ...(pausePoint
        ? {
            pauseAt: async (point: string, microvmId: string) => {
              if (point !== pausePoint) return;
              // Written aside and renamed: the test polls for the file and must never read it empty.
              const marker = path.join(config.dataDir, 'paused');
              fs.writeFileSync(`${marker}.tmp`, `${point} ${microvmId}`);
              fs.renameSync(`${marker}.tmp`, marker);
              await new Promise(() => undefined); // hang here until killed
            },
          }
        : {}),
    },
  });
  // The cluster module does nothing unless COCOON_DATABASE_URL names a PostgreSQL database.
  const server = await startServer(config, [module, clusterModule(module)]);
  const info: DaemonInfo = { apiUrl: server.apiUrl, gatewayPort: module.gatewayPort, pid: process.pid, recovery: module.recovery! };
  process.stdout.write(`${READY}${JSON.stringify(info)}\n`);
  const tuningFile = process.env.COCOON_TEST_RESTORE_TUNING;
  if (tuningFile) {
    const { restoreTuning } = await import('../../src/vmm/qemu/tuning.ts');
    const { gatewayTuning } = await import('../../src/gateway/tuning.ts');
    process.on('SIGUSR2', () => {
      const wanted = JSON.parse(fs.readFileSync(tuningFile, 'utf8')) as Record<string, unknown>;
      for (const [name, value] of Object.entries(wanted)) {
        if (typeof value !== 'boolean') continue;
        if (name in restoreTuning) (restoreTuning as Record<string, boolean>)[name] = value;
        else if (name in gatewayTuning) (gatewayTuning as Record<string, boolean>)[name] = value;
      }
      fs.writeFileSync(`${tuningFile}.applied`, JSON.stringify({ ...restoreTuning, ...gatewayTuning }));
    });
  }
  const stop = async () => {
    await server.close();
    process.exit(0);
  };
  process.once('SIGTERM', () => void stop());
  process.once('SIGINT', () => void stop());
}

if (import.meta.main) await main();
