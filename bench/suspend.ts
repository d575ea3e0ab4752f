/**
 * Suspend (committed, its memory a diff against the image's) as the driver does it now and as it
 * did before issue 12's suspend levers (src/vmm/qemu/tuning.ts `suspendTuning`: each lever a
 * switch; and the snapshot option `endAfterAnswer`), interleaved in one run on one VM chain: restore → a few HTTP requests → suspend →
 * restore from that suspend …, every other suspend the old way, the order swapped every round.
 * The vm suite's `vm.suspend_ms` is the same measurement inside its larger run; this suite is the
 * smallest one that shows a suspend's figure and its phases before and after.
 *
 *   suspend.ms / suspend.before_ms                      vm.snapshot({memoryBase}) → returned
 *   suspend.phase_<phase>_ms / suspend.before_phase_…   its phases (src/vmm/phases.ts)
 *
 *   npm run bench -- --json --runs 8 suspend
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { loadGuestArtifacts } from '../src/guest/artifacts.ts';
import { chooseAccelerator, parseAcceleratorChoice } from '../src/vmm/qemu/accel.ts';
import { QemuVm } from '../src/vmm/qemu/qemu.ts';
import { suspendTuning } from '../src/vmm/qemu/tuning.ts';
import type { Phases } from '../src/vmm/phases.ts';
import type { Accelerator } from '../src/vmm/types.ts';
import { makeTestRootDisk } from '../test/support/rootfs.ts';
import { PhaseSamples } from './phases.ts';
import { elapsedMs, type Metrics, summarize } from './stats.ts';
import { firstByte, network } from './vm-http.ts';

const NOW = { ...suspendTuning };
/**
 * Every lever of issue 12's suspend work off (diffInCommit stays: it landed before); and the
 * snapshot waits for QEMU's exit (`endAfterAnswer` off, as the lifecycle's suspend did).
 */
const BEFORE: typeof suspendTuning = { ...suspendTuning, narrowCompare: false, diffServer: false, compareThreads: 1 };

export async function runSuspendBench(options: { runs?: number; accel?: Accelerator; log?: (line: string) => void } = {}): Promise<Metrics> {
  const runs = options.runs ?? 8;
  const say = options.log ?? (() => undefined);
  const guest = loadGuestArtifacts();
  const accel = options.accel ?? (await chooseAccelerator(parseAcceleratorChoice(process.env.COCOON_ACCEL), guest));
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cocoon-bench-suspend-'));
  const running = new Set<QemuVm>();
  try {
    const rootDisk = path.join(dir, 'root.raw');
    makeTestRootDisk(rootDisk);
    const base = await QemuVm.boot({ id: 'base', runDir: path.join(dir, 'base'), vcpus: 1, memoryMiB: 256, accel, guest, disk: { path: rootDisk, format: 'raw' }, network });
    running.add(base);
    await firstByte(base);
    const baseSnapshot = path.join(dir, 'base-snap');
    await base.snapshot(baseSnapshot, { compact: true });
    running.delete(base);
    // As a daemon's image snapshot is: verified once and remembered (verified-files.ts: only
    // files older than 2 s are), not checked by the first suspends.
    await new Promise((resolve) => setTimeout(resolve, 2100));

    const variants = [
      { name: 'now', tuning: NOW, endAfterAnswer: true, ms: [] as number[], phases: new PhaseSamples() },
      { name: 'before', tuning: BEFORE, endAfterAnswer: false, ms: [] as number[], phases: new PhaseSamples() },
    ];
    let vm = await QemuVm.restore({ id: 'cycle-0', runDir: path.join(dir, 'cycle-0'), snapshotDir: baseSnapshot, network });
    running.add(vm);
    let cycle = 0;
    for (let i = 0; i < runs; i++) {
      for (const variant of i % 2 === 0 ? variants : [...variants].reverse()) {
        for (let k = 0; k < 5; k++) await firstByte(vm);
        await new Promise((resolve) => setTimeout(resolve, 200));
        const suspended = path.join(dir, `cycle-${cycle}-suspended`);
        const phases: Phases = {};
        Object.assign(suspendTuning, variant.tuning);
        const start = performance.now();
        try {
          const manifest = await vm.snapshot(suspended, { phases, memoryBase: baseSnapshot, endAfterAnswer: variant.endAfterAnswer });
          if (!manifest.files.mem.base) throw new Error('the suspend did not keep a memory diff');
        } finally {
          Object.assign(suspendTuning, NOW);
        }
        variant.ms.push(elapsedMs(start));
        variant.phases.add(phases);
        running.delete(vm);
        say(`suspend ${variant.name}: ${variant.ms.at(-1)} ms (${Object.entries(phases).map(([k, v]) => `${k} ${v.toFixed(1)}`).join(', ')})`);
        vm = await QemuVm.restore({ id: `cycle-${++cycle}`, runDir: path.join(dir, `cycle-${cycle}`), snapshotDir: suspended, network, memoryBase: baseSnapshot });
        running.add(vm);
        await firstByte(vm);
      }
    }
    for (const v of variants) say(`suspend (${v.name}) p50 ${summarize(v.ms).p50} ms (${v.phases.line()})`);
    const [now, before] = variants as [(typeof variants)[number], (typeof variants)[number]];
    return {
      'suspend.ms': summarize(now.ms),
      'suspend.before_ms': summarize(before.ms),
      ...now.phases.metrics('suspend.phase'),
      ...before.phases.metrics('suspend.before_phase'),
    };
  } finally {
    Object.assign(suspendTuning, NOW);
    for (const vm of running) await vm.destroy().catch(() => undefined);
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

if (import.meta.main) {
  const runsFlag = process.argv.indexOf('--runs');
  const runs = runsFlag > 0 ? Number(process.argv[runsFlag + 1]) : 8;
  console.log(JSON.stringify(await runSuspendBench({ runs, log: (line) => console.error(line) }), null, 2));
}
