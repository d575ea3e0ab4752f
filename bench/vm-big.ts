/**
 * The biggest shape (16 vCPUs, 32 GiB) of the busybox test app, part of the `vm` suite (issue
 * 12): what its files hold on disk and how long a wake takes, beside the 256 MiB wake measured
 * by the same procedure in the same run.
 *
 *   vm.big_image_disk_mib       allocated blocks of its compacted snapshot (state, memory, disk),
 *                               what an image of it holds
 *   vm.big_running_disk_mib     allocated blocks of a RUNNING clone's run directory (RAM file,
 *                               disk layer, logs) once it answered
 *   vm.big_suspended_disk_mib   allocated blocks of its suspended snapshot
 *   vm.big_wake_ms              restore of that suspended snapshot → first HTTP answer
 *   vm.big_wake_ratio           big_wake_ms p50 ÷ the 256 MiB wake p50 (`vm.resume_first_byte_ms`)
 */
import fs from 'node:fs';
import path from 'node:path';
import type { GuestArtifacts } from '../src/guest/artifacts.ts';
import { QemuVm } from '../src/vmm/qemu/qemu.ts';
import type { Accelerator } from '../src/vmm/types.ts';
import { elapsedMs, type Metric, type Metrics, single, summarize } from './stats.ts';

const MiB = 1024 * 1024;

/** Bytes allocated (st_blocks) to a file or to every file under a directory. */
function allocatedMiB(target: string): number {
  const walk = (p: string): number => {
    const stats = fs.lstatSync(p);
    if (!stats.isDirectory()) return stats.blocks * 512;
    return fs.readdirSync(p).reduce((sum, entry) => sum + walk(path.join(p, entry)), 0);
  };
  return walk(target) / MiB;
}

export async function runBigVmBench(o: {
  dir: string;
  rootDisk: string;
  accel: Accelerator;
  guest: GuestArtifacts;
  runs: number;
  smallWake: Metric;
  firstByte: (vm: QemuVm) => Promise<void>;
  say: (line: string) => void;
}): Promise<Metrics> {
  const network = { forwards: [{ guestPort: 8080 }] };
  const running = new Set<QemuVm>();
  const track = (vm: QemuVm) => (running.add(vm), vm);
  const restore = (id: string, snapshotDir: string) => QemuVm.restore({ id, runDir: path.join(o.dir, id), snapshotDir, network });
  try {
    const disk = path.join(o.dir, 'big.raw');
    fs.copyFileSync(o.rootDisk, disk);
    const base = track(
      await QemuVm.boot({ id: 'big', runDir: path.join(o.dir, 'big'), vcpus: 16, memoryMiB: 32768, accel: o.accel, guest: o.guest, disk: { path: disk, format: 'raw' }, network }),
    );
    await o.firstByte(base);
    const image = path.join(o.dir, 'big-snap');
    await base.snapshot(image, { compact: true });
    running.delete(base);
    const imageMiB = allocatedMiB(image);
    o.say(`32 GiB / 16 vCPU image snapshot: ${imageMiB.toFixed(1)} MiB allocated`);

    const runningMiB: number[] = [];
    const suspendedMiB: number[] = [];
    const wake: number[] = [];
    let vm = track(await restore('big-0', image));
    await o.firstByte(vm);
    for (let i = 0; i < o.runs; i++) {
      runningMiB.push(allocatedMiB(path.join(o.dir, `big-${i}`)));
      const suspended = path.join(o.dir, `big-${i}-suspended`);
      await vm.snapshot(suspended);
      running.delete(vm);
      suspendedMiB.push(allocatedMiB(suspended));
      const started = performance.now();
      vm = track(await restore(`big-${i + 1}`, suspended));
      await o.firstByte(vm);
      wake.push(elapsedMs(started));
      // (Each suspended snapshot stays: the next one's disk layer stands on it.)
    }
    await vm.destroy();
    running.delete(vm);
    const wakeSummary = summarize(wake);
    o.say(
      `32 GiB: RUNNING ${summarize(runningMiB, 'MiB').p50} MiB, SUSPENDED ${summarize(suspendedMiB, 'MiB').p50} MiB allocated; ` +
        `wake p50 ${wakeSummary.p50} ms (256 MiB: ${o.smallWake.p50} ms)`,
    );
    return {
      'vm.big_image_disk_mib': single(imageMiB, 'MiB'),
      'vm.big_running_disk_mib': summarize(runningMiB, 'MiB'),
      'vm.big_suspended_disk_mib': summarize(suspendedMiB, 'MiB'),
      'vm.big_wake_ms': wakeSummary,
      'vm.big_wake_ratio': single(wakeSummary.p50 / o.smallWake.p50, 'ratio'),
    };
  } finally {
    for (const vm of running) await vm.destroy().catch(() => undefined);
  }
}
