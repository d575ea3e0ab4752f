/**
 * `npm run bench -- [--json] [--runs N] [suite ...]`: runs the benchmark suites side by side in
 * one process and prints a table; with --json the last line is one JSON object
 * `{"machine": {"accel", "cpus"}, "metrics": {...}}` (docs/contract.md). Without suites, all run.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { loadGuestArtifacts } from '../src/guest/artifacts.ts';
import { chooseAccelerator, parseAcceleratorChoice } from '../src/vmm/qemu/accel.ts';
import type { Accelerator } from '../src/vmm/types.ts';
import type { Metrics } from './stats.ts';

interface SuiteOptions {
  runs?: number;
  /** How long a timed suite (soak) runs. */
  seconds?: number;
  accel: Accelerator;
  log: (line: string) => void;
}

/** Suites by name. Each is loaded only when asked for. */
const SUITES: Record<string, (options: SuiteOptions) => Promise<Metrics>> = {
  vm: async (o) => (await import('./vm.ts')).runVmBench(o),
  suspend: async (o) => (await import('./suspend.ts')).runSuspendBench(o),
  reliability: async (o) => (await import('./reliability.ts')).runReliabilityBench(o),
  image: async (o) => (await import('./image.ts')).runImageBench(o),
  microvm: async (o) => (await import('./microvm.ts')).runMicrovmBench({ ...o, parts: ['launch', 'resume'] }),
  gateway: async (o) => (await import('./microvm.ts')).runMicrovmBench({ ...o, parts: ['gateway'] }),
  density: async (o) => (await import('./microvm.ts')).runMicrovmBench({ ...o, parts: ['density'] }),
  fork: async (o) => (await import('./fork.ts')).runForkBench(o),
  soak: async (o) => (await import('./soak.ts')).runSoakBench(o),
  exec: async (o) => (await import('./exec.ts')).runExecBench(o),
  e2b: async (o) => (await import('./e2b.ts')).runE2bBench(o),
  cluster: async (o) => (await import('./cluster.ts')).runClusterBench(o),
};

/**
 * Run only when named: minutes of load, not a side-by-side figure; a cluster of three hosts; or a
 * figure the vm suite measures already (suspend: its levers before/after, the smallest run for it).
 */
const OPT_IN = new Set(['soak', 'cluster', 'suspend']);

function parseArgs(argv: string[]): { json: boolean; runs: number | undefined; seconds: number | undefined; suites: string[] } {
  let json = false;
  let runs: number | undefined;
  let seconds: number | undefined;
  const suites: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i] as string;
    if (arg === '--json') json = true;
    else if (arg === '--runs') runs = Number(argv[++i]);
    else if (arg === '--seconds') seconds = Number(argv[++i]);
    else if (arg in SUITES) suites.push(arg);
    else throw new Error(`unknown argument ${arg}; suites: ${Object.keys(SUITES).join(', ')}`);
  }
  if (runs !== undefined && (!Number.isInteger(runs) || runs < 1)) throw new Error('--runs takes a positive integer');
  if (seconds !== undefined && (!Number.isInteger(seconds) || seconds < 1)) throw new Error('--seconds takes a positive integer');
  return { json, runs, seconds, suites: suites.length ? suites : Object.keys(SUITES).filter((name) => !OPT_IN.has(name)) };
}

/**
 * A benchmark stopped by a signal (Ctrl-C, a timeout) must not leave guests running: QEMU runs in
 * its own process group, so it outlives us unless we end it. Every suite works under
 * `$TMPDIR/cocoon-bench-*`, which names the processes and files to remove.
 */
function cleanUpOnSignal(): void {
  const stop = (signal: NodeJS.Signals) => {
    spawnSync('pkill', ['-KILL', '-f', `qemu-system.*${os.tmpdir()}/cocoon-bench-`]);
    for (const entry of fs.readdirSync(os.tmpdir())) {
      if (entry.startsWith('cocoon-bench-')) fs.rmSync(path.join(os.tmpdir(), entry), { recursive: true, force: true });
    }
    process.kill(process.pid, signal);
  };
  for (const signal of ['SIGINT', 'SIGTERM'] as const) process.once(signal, () => stop(signal));
}

cleanUpOnSignal();
const args = parseArgs(process.argv.slice(2));
const accel = await chooseAccelerator(parseAcceleratorChoice(process.env.COCOON_ACCEL), loadGuestArtifacts());
const metrics: Metrics = {};
for (const suite of args.suites) {
  console.error(`bench: ${suite} (accel ${accel})`);
  const started = performance.now();
  Object.assign(metrics, await SUITES[suite]!({ runs: args.runs, seconds: args.seconds, accel, log: (line) => console.error(`  ${line}`) }));
  console.error(`bench: ${suite} done in ${((performance.now() - started) / 1000).toFixed(1)} s`);
}

console.error('\nmetric                                   p50        p95  unit   n');
for (const [name, m] of Object.entries(metrics)) {
  console.error(`${name.padEnd(38)} ${String(m.p50).padStart(9)} ${String(m.p95).padStart(10)}  ${m.unit.padEnd(5)} ${m.n}`);
}
if (args.json) console.log(JSON.stringify({ machine: { accel, cpus: os.cpus().length }, metrics }));
