/**
 * What durable snapshots cost (docs/reliability.md): the data checksums of a 256 MiB guest's
 * memory file and disk, as a suspend computes them and as a restore checks them, and the
 * restore's check on its own: in full (the first restore of an image snapshot in a process, and
 * every resume: a suspended microVM's files are new), and with the image snapshot's files
 * remembered as verified (src/vmm/verified-files.ts: every later restore of that image).
 *
 *   node bench/reliability.ts [--runs N]
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { loadGuestArtifacts } from '../src/guest/artifacts.ts';
import { chooseAccelerator, parseAcceleratorChoice } from '../src/vmm/qemu/accel.ts';
import { QemuVm } from '../src/vmm/qemu/qemu.ts';
import { dataChecksums, readSnapshotManifest, verifySnapshot, verifySnapshotData } from '../src/vmm/snapshot.ts';
import { forgetVerifiedFiles } from '../src/vmm/verified-files.ts';
import type { Accelerator } from '../src/vmm/types.ts';
import { makeTestRootDisk } from '../test/support/rootfs.ts';
import { elapsedMs, type Metrics, single, summarize } from './stats.ts';
import { firstByte, network } from './vm-http.ts';

export async function runReliabilityBench(options: { runs?: number; accel?: Accelerator; log?: (line: string) => void } = {}): Promise<Metrics> {
  const runs = options.runs ?? 10;
  const say = options.log ?? (() => undefined);
  const guest = loadGuestArtifacts();
  const accel = options.accel ?? (await chooseAccelerator(parseAcceleratorChoice(process.env.COCOON_ACCEL), guest));
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cocoon-bench-rel-'));
  try {
    makeTestRootDisk(path.join(dir, 'root.raw'));
    const boot = await QemuVm.boot({
      id: 'rel-base',
      runDir: path.join(dir, 'rel-base'),
      vcpus: 1,
      memoryMiB: 256,
      accel,
      guest,
      disk: { path: path.join(dir, 'root.raw'), format: 'raw' },
      network,
    });
    await firstByte(boot);
    const base = path.join(dir, 'base');
    await boot.snapshot(base, { compact: true });
    const vm = await QemuVm.restore({ id: 'rel-vm', runDir: path.join(dir, 'rel-vm'), snapshotDir: base, network });
    await firstByte(vm);
    const suspended = path.join(dir, 'suspended');
    await vm.snapshot(suspended);

    const measure = async (what: string, fn: () => Promise<unknown>) => {
      const samples: number[] = [];
      await fn(); // page cache warm, helper built
      for (let i = 0; i < runs; i++) {
        const start = performance.now();
        await fn();
        samples.push(elapsedMs(start));
      }
      say(`${what}: p50 ${summarize(samples).p50} ms`);
      return summarize(samples);
    };
    const files = (snapshot: string, disk: string) => [path.join(snapshot, 'mem'), path.join(snapshot, disk)];
    const baseManifest = await readSnapshotManifest(base);
    // Files changed in the last 2 s are verified but not remembered (verified-files.ts).
    await new Promise((resolve) => setTimeout(resolve, 2500));
    const suspendedManifest = await readSnapshotManifest(suspended);
    const dataMiB = (file: string) => (fs.statSync(file).blocks * 512) / 1024 / 1024;
    return {
      'reliability.checksum_image_snapshot_ms': await measure('checksums, image snapshot', () => dataChecksums(files(base, 'disk.raw'))),
      'reliability.checksum_suspended_ms': await measure('checksums, suspended VM', () => dataChecksums(files(suspended, 'disk.qcow2'))),
      // As before files were remembered: the memory file's and disk's checksums, read in full.
      'reliability.verify_restore_ms': await measure('restore check, in full', async () => {
        forgetVerifiedFiles();
        await verifySnapshotData(base, baseManifest);
      }),
      'reliability.verify_resume_ms': await measure('resume check', async () => {
        forgetVerifiedFiles();
        await verifySnapshotData(suspended, suspendedManifest);
      }),
      // The device state's SHA-256 included.
      'reliability.verify_restore_remembered_ms': await measure('restore check, image snapshot remembered as verified', async () => {
        await verifySnapshot(base, baseManifest);
        await verifySnapshotData(base, baseManifest);
      }),
      'reliability.image_mem_data_mib': single(+dataMiB(path.join(base, 'mem')).toFixed(1), 'count'),
      'reliability.suspended_mem_data_mib': single(+dataMiB(path.join(suspended, 'mem')).toFixed(1), 'count'),
    };
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

if (import.meta.main) {
  const runsFlag = process.argv.indexOf('--runs');
  const runs = runsFlag > 0 ? Number(process.argv[runsFlag + 1]) : 10;
  console.log(JSON.stringify(await runReliabilityBench({ runs, log: (line) => console.error(line) }), null, 2));
}
