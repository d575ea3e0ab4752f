/**
 * The VM core benchmark (issue 2): cold boot, snapshot, restore (one clone, and eight started
 * together), suspend and resume, each to the first HTTP byte from the guest's app, measured
 * side by side in one run on real QEMU; then the same app at 16 vCPUs / 32 GiB (vm-big.ts). And
 * what a suspended VM keeps on disk beyond its image: its memory as a diff against the image's
 * (docs/vmm.md "Memory diffs", what a suspended microVM keeps), and, from the same snapshots
 * before they are diffed, the whole memory file (what it kept before diffs).
 *
 *   node bench/vm.ts [--runs N] [--skip-big]   (--skip-big: without the 16 vCPU / 32 GiB part)
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { loadGuestArtifacts } from '../src/guest/artifacts.ts';
import { chooseAccelerator, parseAcceleratorChoice } from '../src/vmm/qemu/accel.ts';
import { QemuVm, restoreTuning, startQemu } from '../src/vmm/qemu/qemu.ts';
import { activeQemuPool, closeQemuPool, openQemuPool } from '../src/vmm/qemu/pool.ts';
import { suspendTuning } from '../src/vmm/qemu/tuning.ts';
import { diffSnapshotMemory } from '../src/vmm/mem-diff.ts';
import { releaseUnusedRam } from '../src/vmm/ram-file.ts';
import type { Accelerator } from '../src/vmm/types.ts';
import { makeTestRootDisk } from '../test/support/rootfs.ts';
import type { Phases } from '../src/vmm/phases.ts';
import { PhaseSamples } from './phases.ts';
import { elapsedMs, type Metrics, single, summarize } from './stats.ts';
import { runBigVmBench } from './vm-big.ts';
import { firstByte, network } from './vm-http.ts';

const MiB = 1024 * 1024;

/** Allocated bytes (st_blocks) of the files in a directory. */
function allocatedIn(dir: string): number {
  return fs.readdirSync(dir).reduce((sum, name) => sum + fs.statSync(path.join(dir, name)).blocks * 512, 0);
}

export async function runVmBench(options: { runs?: number; accel?: Accelerator; log?: (line: string) => void; skipBig?: boolean } = {}): Promise<Metrics> {
  const runs = options.runs ?? 10;
  const say = options.log ?? (() => undefined);
  const guest = loadGuestArtifacts();
  const accel = options.accel ?? (await chooseAccelerator(parseAcceleratorChoice(process.env.COCOON_ACCEL), guest));
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cocoon-bench-vm-'));
  const running = new Set<QemuVm>();
  const track = (vm: QemuVm) => (running.add(vm), vm);
  try {
    const rootDisk = path.join(dir, 'root.raw');
    makeTestRootDisk(rootDisk);
    const boot = (id: string) => {
      const disk = path.join(dir, `${id}.raw`);
      fs.copyFileSync(rootDisk, disk);
      return QemuVm.boot({ id, runDir: path.join(dir, id), vcpus: 1, memoryMiB: 256, accel, guest, disk: { path: disk, format: 'raw' }, network });
    };
    const restore = (id: string, snapshotDir: string, memoryBase?: string) =>
      QemuVm.restore({ id, runDir: path.join(dir, id), snapshotDir, network, ...(memoryBase ? { memoryBase } : {}) });

    const cold: number[] = [];
    const snapshot: number[] = [];
    for (let i = 0; i < runs; i++) {
      const start = performance.now();
      const vm = track(await boot(`cold-${i}`));
      await firstByte(vm);
      cold.push(elapsedMs(start));
      const snapStart = performance.now();
      await vm.snapshot(path.join(dir, `cold-${i}-snap`));
      snapshot.push(elapsedMs(snapStart));
      await vm.destroy();
      running.delete(vm);
      fs.rmSync(path.join(dir, `cold-${i}-snap`), { recursive: true, force: true });
      say(`cold boot ${i + 1}/${runs}: ${cold.at(-1)?.toFixed(0)} ms, snapshot ${snapshot.at(-1)?.toFixed(1)} ms`);
    }

    // The image-like base: booted once, snapshotted compacted, restored many times.
    const base = track(await boot('base'));
    await firstByte(base);
    const baseSnapshot = path.join(dir, 'base-snap');
    await base.snapshot(baseSnapshot, { compact: true });
    running.delete(base);

    // Each restore and resume is measured four ways, interleaved (issue 12): as the driver does
    // it (a QEMU started ahead taken from the pool: src/vmm/qemu/pool.ts; the memory copied into
    // it), the same with the pooled QEMU's steps one after the other as before
    // (`restoreTuning.pooledInline` off: src/vmm/qemu/pooled-restore.ts), without the pool (QEMU
    // started while the memory is copied, disk layers from a template), and one step after the
    // other with a qemu-img per layer, as before (src/vmm/qemu/tuning.ts).
    await openQemuPool(path.join(dir, 'vm-pool'), startQemu, 2);
    const variants = [
      { name: 'pool', pool: true, overlap: true, inline: true, restore: [] as number[], resume: [] as number[], restorePhases: new PhaseSamples(), resumePhases: new PhaseSamples() },
      { name: 'pool_stepwise', pool: true, overlap: true, inline: false, restore: [] as number[], resume: [] as number[], restorePhases: new PhaseSamples(), resumePhases: new PhaseSamples() },
      { name: 'nopool', pool: false, overlap: true, inline: true, restore: [] as number[], resume: [] as number[], restorePhases: new PhaseSamples(), resumePhases: new PhaseSamples() },
      { name: 'sequential', pool: false, overlap: false, inline: true, restore: [] as number[], resume: [] as number[], restorePhases: new PhaseSamples(), resumePhases: new PhaseSamples() },
    ];
    const use = (variant: { pool: boolean; overlap: boolean; inline: boolean }) => {
      restoreTuning.overlap = restoreTuning.layerTemplate = variant.overlap;
      restoreTuning.pool = variant.pool;
      restoreTuning.pooledInline = variant.inline;
    };
    const asTheDriverDoes = { pool: true, overlap: true, inline: true };
    // The pool refills in the background after a take: each measurement starts once it has
    // (a QEMU starting beside a restore takes a core from it).
    const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));
    const settle = async () => {
      await sleep(400);
      const deadline = Date.now() + 3000;
      while ((activeQemuPool()?.readyCount ?? 2) < 2 && Date.now() < deadline) await sleep(20);
    };
    const inTurn = (i: number) => (i % 2 === 0 ? variants : [...variants].reverse());
    // The pool learns a machine from a restore of it: one first, not measured.
    const teach = track(await restore('teach-pool', baseSnapshot));
    await teach.destroy();
    running.delete(teach);
    for (let i = 0; i < runs; i++) {
      for (const variant of inTurn(i)) {
        use(variant);
        await settle();
        const start = performance.now();
        const vm = track(await restore(`r1-${i}-${variant.name.replace("_", "-")}`, baseSnapshot));
        await firstByte(vm);
        variant.restore.push(elapsedMs(start));
        variant.restorePhases.add(vm.startPhases, variant.restore.at(-1));
        await vm.destroy();
        running.delete(vm);
      }
    }
    use(asTheDriverDoes);
    for (const v of variants) say(`restore, one clone (${v.name}): p50 ${summarize(v.restore).p50} ms (${v.restorePhases.line()})`);

    const restoreEight: number[] = [];
    for (let i = 0; i < runs; i++) {
      const start = performance.now();
      const clones = await Promise.all(
        Array.from({ length: 8 }, async (_, k) => {
          const vm = track(await restore(`r8-${i}-${k}`, baseSnapshot));
          await firstByte(vm);
          restoreEight.push(elapsedMs(start));
          return vm;
        }),
      );
      for (const vm of clones) {
        await vm.destroy();
        running.delete(vm);
      }
    }
    say(`restore, eight together: p50 ${summarize(restoreEight).p50} ms`);

    // Suspends, committed with their memory as a diff against the image's, both ways in turn
    // (issue 12; src/vmm/qemu/tuning.ts `suspendTuning`): the diff made inside the snapshot's
    // commit, from the paused VM's RAM file while the device state is saved (as the lifecycle
    // suspends), and the old way: the whole RAM file checksummed, synced and committed, then
    // diffed (`diffSnapshotMemory`) before the microVM counted as SUSPENDED.
    const suspend: number[] = [];
    const wholeThenDiff: number[] = [];
    const wholeSnapshot: number[] = [];
    const diffMs: number[] = [];
    const wholeMiB: number[] = [];
    const diffMiB: number[] = [];
    const suspendPhases = new PhaseSamples();
    const wholeThenDiffPhases = new PhaseSamples();
    let vm = track(await restore('cycle-0', baseSnapshot));
    await firstByte(vm);
    let cycle = 0;
    for (let i = 0; i < runs; i++) {
      for (const variant of inTurn(i)) {
        const suspended = path.join(dir, `cycle-${cycle}-suspended`);
        const phases: Phases = {};
        const inCommit = cycle % 2 === 0;
        suspendTuning.diffInCommit = inCommit;
        const suspendStart = performance.now();
        const manifest = await vm.snapshot(suspended, { phases, memoryBase: baseSnapshot, endAfterAnswer: inCommit }); // (as the lifecycle suspends)
        const snapshotMs = elapsedMs(suspendStart);
        suspendTuning.diffInCommit = true;
        running.delete(vm);
        if (inCommit) {
          if (!manifest.files.mem.base) throw new Error('the suspend did not keep a memory diff');
          suspend.push(snapshotMs);
          suspendPhases.add(phases);
        } else {
          // What the suspended VM holds with whole memory (its reservation given back, as a
          // snapshot does in the background), then as a diff against the image's.
          wholeSnapshot.push(snapshotMs);
          await releaseUnusedRam(path.join(suspended, 'mem'));
          wholeMiB.push(allocatedIn(suspended) / MiB);
          const diffStart = performance.now();
          await diffSnapshotMemory(suspended, baseSnapshot, { durable: true });
          diffMs.push(elapsedMs(diffStart));
          wholeThenDiff.push(snapshotMs + diffMs.at(-1)!);
          wholeThenDiffPhases.add({ ...phases, memory_diff_after: diffMs.at(-1)! });
        }
        diffMiB.push(allocatedIn(suspended) / MiB);
        use(variant);
        await settle();
        const resumeStart = performance.now();
        vm = track(await restore(`cycle-${++cycle}`, suspended, baseSnapshot));
        await firstByte(vm);
        variant.resume.push(elapsedMs(resumeStart));
        variant.resumePhases.add(vm.startPhases, variant.resume.at(-1));
        use(asTheDriverDoes);
      }
    }
    await vm.destroy();
    running.delete(vm);
    say(`suspend (committed, memory diff made in the commit) p50 ${summarize(suspend).p50} ms (${suspendPhases.line()})`);
    say(`suspend the old way (whole memory committed, then diffed) p50 ${summarize(wholeThenDiff).p50} ms (${wholeThenDiffPhases.line()})`);
    for (const v of variants) say(`resume (${v.name}) p50 ${summarize(v.resume).p50} ms (${v.resumePhases.line()})`);
    say(`suspended on disk beyond the image: p50 ${summarize(diffMiB, 'MiB').p50} MiB with a memory diff, ${summarize(wholeMiB, 'MiB').p50} MiB with whole memory`);

    const [overlap, stepwise, nopool, sequential] = variants as [(typeof variants)[number], (typeof variants)[number], (typeof variants)[number], (typeof variants)[number]];
    // The 32 GiB / 16 vCPU shape, its wake beside the 256 MiB one above (bench/vm-big.ts).
    const big = options.skipBig ? {} : await runBigVmBench({ dir, rootDisk, accel, guest, runs: Math.min(runs, 5), smallWake: summarize(overlap.resume), firstByte, say });

    const coldSummary = summarize(cold);
    const restoreSummary = summarize(overlap.restore);
    return {
      ...big,
      'vm.cold_boot_first_byte_ms': coldSummary,
      'vm.snapshot_ms': summarize(snapshot),
      'vm.restore_first_byte_ms': restoreSummary,
      'vm.restore8_first_byte_ms': summarize(restoreEight),
      'vm.suspend_ms': summarize(suspend),
      'vm.resume_first_byte_ms': summarize(overlap.resume),
      'vm.suspend_diff_ms': summarize(diffMs),
      'vm.suspend_whole_then_diff_ms': summarize(wholeThenDiff),
      'vm.suspend_whole_snapshot_ms': summarize(wholeSnapshot),
      'vm.suspended_disk_mib': summarize(diffMiB, 'MiB'),
      'vm.suspended_disk_whole_memory_mib': summarize(wholeMiB, 'MiB'),
      'vm.restore_speedup_ratio': single(coldSummary.p50 / restoreSummary.p50, 'ratio'),
      'vm.restore_first_byte_pool_stepwise_ms': summarize(stepwise.restore),
      'vm.resume_first_byte_pool_stepwise_ms': summarize(stepwise.resume),
      'vm.restore_first_byte_nopool_ms': summarize(nopool.restore),
      'vm.resume_first_byte_nopool_ms': summarize(nopool.resume),
      'vm.restore_first_byte_sequential_ms': summarize(sequential.restore),
      'vm.resume_first_byte_sequential_ms': summarize(sequential.resume),
      ...overlap.restorePhases.metrics('vm.restore_phase'),
      ...suspendPhases.metrics('vm.suspend_phase'),
      ...wholeThenDiffPhases.metrics('vm.suspend_whole_then_diff_phase'),
      ...overlap.resumePhases.metrics('vm.resume_phase'),
      ...stepwise.restorePhases.metrics('vm.restore_pool_stepwise_phase'),
      ...stepwise.resumePhases.metrics('vm.resume_pool_stepwise_phase'),
      ...nopool.restorePhases.metrics('vm.restore_nopool_phase'),
      ...nopool.resumePhases.metrics('vm.resume_nopool_phase'),
      ...sequential.restorePhases.metrics('vm.restore_sequential_phase'),
      ...sequential.resumePhases.metrics('vm.resume_sequential_phase'),
    };
  } finally {
    restoreTuning.overlap = restoreTuning.layerTemplate = restoreTuning.pool = restoreTuning.pooledInline = true;
    suspendTuning.diffInCommit = true;
    await closeQemuPool().catch(() => undefined);
    for (const vm of running) await vm.destroy().catch(() => undefined);
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

if (import.meta.main) {
  const runsFlag = process.argv.indexOf('--runs');
  const runs = runsFlag > 0 ? Number(process.argv[runsFlag + 1]) : 10;
  console.log(JSON.stringify(await runVmBench({ runs, skipBig: process.argv.includes('--skip-big'), log: (line) => console.error(line) }), null, 2));
}
