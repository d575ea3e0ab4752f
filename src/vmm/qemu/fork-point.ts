/**
 * A fork point: a complete snapshot of a RUNNING VM at one instant, taken while the VM runs on.
 * Forks (new microVMs that continue from it) and checkpoints (images made from it) restore it
 * like any snapshot.
 *
 * What the source VM sees is one short pause:
 *
 *   stop vCPUs (QEMU drains and flushes the disk) → in parallel: save the device state, copy
 *   the RAM file's data and the disk layer (a consistent qcow2 file once flushed) → cont
 *
 * (the copier is started before the stop and waits for a signal; nothing is fsynced during it).
 *
 * Nothing of the source changes: it keeps its RAM file and disk layer and runs on from exactly
 * where it stopped; the copies are the fork point's own. The copies find their data with
 * SEEK_DATA (no writeback of the RAM file first, which a FIEMAP would need): pages the guest
 * touched are in the page cache, so this copies the guest's working set and nothing else.
 * Checksums, fsyncs, an optional rebase of the disk copy onto another backing file, and the
 * manifest come after the VM runs again; the directory appears whole (one rename) or not at all.
 *
 * Should this process die in the middle, nothing needs completing: the partial directory is
 * garbage, and a QEMU left paused is continued when the lifecycle adopts it again.
 */
import fs from 'node:fs';
import path from 'node:path';
import { CocoonError, errorMessage } from '../../common/errors.ts';
import { log } from '../../common/log.ts';
import { saveDeviceState } from './migration.ts';
import { prepareSnapCopy } from '../native/helper.ts';
import type { QemuVm } from './qemu.ts';
import { fsyncDir } from '../../common/fs.ts';
import { sealSnapshotFiles } from '../snapshot-safety.ts';
import { qemuDirOf } from './paths.ts';
import { writeManifestFile } from '../fork-point.ts';
import { dataChecksums, writeSnapshotManifest } from '../snapshot.ts';
import type { ForkPoint, ForkPointOptions } from '../driver.ts';
import { rebaseDisk, relinkBacking } from './disk-layers.ts';
import type { DataChecksum, SnapshotManifest } from '../types.ts';

export type { ForkPoint, ForkPointOptions };

/**
 * Takes a fork point of `vm` into `targetDir` (which must not exist). The VM must be running;
 * it runs on afterwards whatever happens (a failure leaves nothing at `targetDir`).
 */
export async function takeForkPoint(vm: QemuVm, targetDir: string, options: ForkPointOptions = {}): Promise<ForkPoint> {
  const durable = options.durable ?? true;
  const partial = `${targetDir}.partial`;
  if (fs.existsSync(targetDir)) throw new CocoonError('snapshot_exists', `snapshot ${targetDir} already exists`, { status: 409 });
  const status = await vm.qmp.execute('query-status', {});
  if (!status.running) {
    throw new CocoonError('vm_not_running', `${vm.id} is not running (QEMU says ${status.status}); it cannot be forked now`, { status: 409 });
  }
  await fs.promises.rm(partial, { recursive: true, force: true });
  await fs.promises.mkdir(partial, { recursive: true, mode: 0o700 });
  const diskName = vm.disk.format === 'qcow2' ? 'disk.qcow2' : 'disk.raw';
  const mem = path.join(partial, 'mem');
  const disk = path.join(partial, diskName);
  let stopped = false;
  let pausedMs = 0;
  // The copier is started (and has opened nothing yet) before the vCPUs stop: the pause holds
  // the copies, not a process start.
  const copier = await prepareSnapCopy([
    [vm.ramPath, mem],
    [vm.disk.path, disk],
  ]).catch(async (error: unknown) => {
    await fs.promises.rm(partial, { recursive: true, force: true });
    throw error;
  });
  try {
    const started = performance.now();
    const steps: Record<string, number> = {};
    const step = (name: string, since: number) => {
      steps[name] = Math.round((performance.now() - since) * 10) / 10;
    };
    stopped = true;
    await vm.qmp.execute('stop', {});
    step('stop', started);
    // With the vCPUs stopped (QEMU drained and flushed the disk), RAM file and disk layer do
    // not change: the copies and the device state are taken side by side; fsyncs come later.
    const paused = performance.now();
    const [state] = await Promise.all([
      saveDeviceState(vm.qmp, path.join(qemuDirOf(vm.runDir), 'migrate.sock'), path.join(partial, 'state'), undefined, { fsync: false }).finally(() =>
        step('state', paused),
      ),
      copier.go().finally(() => step('copies', paused)),
    ]);
    await options.onPaused?.();
    await vm.qmp.execute('cont', {});
    stopped = false;
    pausedMs = performance.now() - started;
    const after = performance.now();
    // The copy names its backing file relative to where it lives now (disk-layers.ts).
    if (options.rebaseOnto) await rebaseDisk(disk, options.rebaseOnto, { copiedFrom: path.dirname(vm.disk.path) });
    else if (vm.disk.format === 'qcow2') await relinkBacking(disk, { finalDir: targetDir, formerDir: path.dirname(vm.disk.path) });
    let checksums: DataChecksum[] = [];
    if (!options.deferChecksums) {
      const handles = [await fs.promises.open(mem, 'r'), await fs.promises.open(disk, 'r'), await fs.promises.open(path.join(partial, 'state'), 'r')];
      try {
        [checksums] = await Promise.all([
          dataChecksums(handles.slice(0, 2).map((handle) => handle.fd)),
          durable ? Promise.all(handles.map((handle) => handle.datasync())) : undefined,
        ]);
      } finally {
        for (const handle of handles) await handle.close().catch(() => undefined);
      }
    }
    await sealSnapshotFiles(vm.runDir, { mem, disk });
    const manifest: SnapshotManifest = {
      formatVersion: 1,
      createdAt: new Date().toISOString(),
      shape: vm.shape,
      cmdline: vm.cmdline,
      files: {
        state: { name: 'state', ...state },
        mem: { name: 'mem', sizeBytes: vm.shape.memoryMiB * 1024 * 1024, ...(checksums[0] ? { checksum: checksums[0] } : {}) },
        disk: { name: diskName, format: vm.disk.format, sizeBytes: (await fs.promises.stat(disk)).size, ...(checksums[1] ? { checksum: checksums[1] } : {}) },
      },
      guestPorts: [...vm.hostPorts.keys()],
      ...vm.madeBy(),
    };
    if (options.deferChecksums) await writeManifestFile(partial, manifest, false);
    else await writeSnapshotManifest(partial, manifest, durable);
    await fs.promises.rename(partial, targetDir);
    if (durable && !options.deferChecksums) await fsyncDir(path.dirname(targetDir));
    step('seal', after);
    return { manifest, pausedMs, steps };
  } catch (error) {
    copier.cancel();
    if (stopped && !vm.exited) {
      await vm.qmp.execute('cont', {}).catch((contError: unknown) =>
        log.error({ vm: vm.id, error: errorMessage(contError) }, 'cannot continue the VM after a failed fork point'),
      );
    }
    await fs.promises.rm(partial, { recursive: true, force: true });
    if (error instanceof CocoonError && error.code === 'no_space') throw error;
    throw new CocoonError('fork_failed', `cannot take a fork point of ${vm.id}: ${errorMessage(error)}; the VM runs on as before`, {
      status: vm.exited ? 409 : 500,
      cause: error,
    });
  }
}
