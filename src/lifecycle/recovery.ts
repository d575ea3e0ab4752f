/**
 * Start-up recovery: whatever a previous daemon left (it may have been SIGKILLed at any
 * instruction), bring every microVM to a consistent state before the gateway takes traffic.
 *
 * | store says | found | becomes |
 * | --- | --- | --- |
 * | PENDING | anything | QEMU killed, files cleared, launched again |
 * | RUNNING | its QEMU alive | adopted (QMP, guest channel, console reconnected) |
 * | RUNNING | no QEMU | FAILED (its memory since the last suspend is gone) |
 * | SUSPENDING | next generation committed, or its device state saved | the snapshot completed → SUSPENDED |
 * | SUSPENDING | nothing saved, QEMU alive | adopted, RUNNING, then suspended again (the suspend is finished) |
 * | SUSPENDING | nothing saved, no QEMU | FAILED |
 * | RESUMING | anything | QEMU killed, the new layer dropped → SUSPENDED (its generation was never touched) |
 * | SUSPENDED | its generation | kept; stray QEMU killed, stray files removed |
 * | TERMINATING | anything | finished → TERMINATED |
 *
 * Only this host's microVMs are recovered (`host_id` = the engine's `hostId`), and those no host
 * has claimed yet (rows from before hosts were recorded; this host claims them first): another
 * host's rows in a shared store are left alone, whatever their state.
 *
 * Afterwards every QEMU under this data directory's `microvms/` that no RUNNING microVM owns is
 * killed, and the directories of microVMs that ended are removed (also those of forks whose rows
 * were never written: a fork interrupted before it committed); a directory whose microVM is
 * active on any host is kept. Checkpoint images left SNAPSHOTTING become
 * READY when their snapshot was committed, else FAILED with nothing kept (fork.ts).
 */
import fs from 'node:fs';
import path from 'node:path';
import { errorMessage } from '../common/errors.ts';
import type { Logger } from '../common/log.ts';
import { ACTIVE_MICROVM_STATES, claimMicrovm, getMicrovm, listHostMicrovms, listMicrovmsInStates, type Microvm } from '../store/microvms.ts';
import type { Db } from '../store/sql.ts';
import type { Vm } from '../vmm/driver.ts';
import { readSnapshotManifest } from '../vmm/snapshot.ts';
import { applyMicrovmEvent } from './apply-event.ts';
import type { LifecycleEngine } from './engine.ts';
import { recoverCheckpoints } from './fork.ts';
import { generationDir, microvmDir, microvmsRoot, runDir, snapshotDirFor } from './paths.ts';
import { appendLog, clearRunFiles, collectGarbage, parseRuntime, runtimeRecord } from './storage.ts';

export interface RecoveryReport {
  adopted: string[];
  relaunched: string[];
  suspendsCompleted: string[];
  suspendsRolledBack: string[];
  resumesRolledBack: string[];
  terminated: string[];
  failed: string[];
  orphansKilled: number[];
  /** Checkpoint images left SNAPSHOTTING: completed (READY) or ended (FAILED, nothing kept). */
  checkpointsCompleted: string[];
  checkpointsFailed: string[];
}

export async function recoverMicrovms(engine: LifecycleEngine, db: Db, dataDir: string, log: Logger): Promise<RecoveryReport> {
  const report: RecoveryReport = {
    adopted: [], relaunched: [], suspendsCompleted: [], suspendsRolledBack: [], resumesRolledBack: [], terminated: [], failed: [], orphansKilled: [],
    checkpointsCompleted: [], checkpointsFailed: [],
  };
  Object.assign(report, await recoverCheckpoints(db, dataDir, log));
  const { driver } = engine;
  const owned = new Set<number>();
  const toSuspend: string[] = [];
  /** PENDING microVMs, launched after the sweep of orphaned QEMUs (which would take theirs for one). */
  const toLaunch: string[] = [];

  const fail = async (microvm: Microvm, reason: string) => {
    await driver.sweep(runDir(dataDir, microvm.id));
    await applyMicrovmEvent(db, microvm.id, 'fail', { error: reason }, microvm.state);
    await clearRunFiles(driver, dataDir, microvm.id);
    await appendLog(dataDir, microvm.id, `failed at start-up: ${reason}`);
    report.failed.push(microvm.id);
  };
  const adopt = async (microvm: Microvm): Promise<Vm | undefined> => {
    try {
      const vm = await driver.adopt({ id: microvm.id, runDir: runDir(dataDir, microvm.id) });
      await vm.ensureRunning();
      owned.add(vm.pid);
      return vm;
    } catch (error) {
      log.warn({ microvm: microvm.id, err: errorMessage(error) }, 'could not adopt the VM');
      return undefined;
    }
  };

  for (const found of await listHostMicrovms(db, engine.hostId, ACTIVE_MICROVM_STATES)) {
    const id = found.id;
    // An unclaimed row: this host takes it, unless another host recovering beside it was first.
    // (A PENDING one is claimed by its launch.)
    if (found.hostId === null && found.state !== 'PENDING' && !(await claimMicrovm(db, id, engine.hostId))) continue;
    const run = runDir(dataDir, id);
    const runtime = parseRuntime(found.runtime);
    try {
      switch (found.state) {
        case 'PENDING':
          await driver.sweep(run);
          await clearRunFiles(driver, dataDir, id);
          toLaunch.push(id);
          report.relaunched.push(id);
          break;
        case 'RUNNING': {
          const vm = await adopt(found);
          if (!vm) {
            await fail(found, 'the VM was not running any more when the daemon restarted; its state since the last suspend is lost');
            continue;
          }
          await engine.adoptLoaded(found, vm);
          await appendLog(dataDir, id, `adopted after a daemon restart (pid ${vm.pid})`);
          report.adopted.push(id);
          continue;
        }
        case 'SUSPENDING': {
          const next = runtime.generation + 1;
          const outcome = await driver.recoverSnapshot(generationDir(dataDir, id, next));
          if (outcome !== 'none') {
            await driver.sweep(run);
            const done = { generation: next, chain: [...runtime.chain, next] };
            // A cluster: stored before SUSPENDED as a suspend does; if the object store is down,
            // it is SUSPENDED here all the same (this host can resume it; its next suspend stores it).
            await engine.shared?.commit(found, done).catch((error: unknown) =>
              log.warn({ microvm: id, err: errorMessage(error) }, 'a suspend completed at start-up could not be stored in the object store'));
            await applyMicrovmEvent(db, id, 'suspended', { runtime: runtimeRecord(done) });
            await clearRunFiles(driver, dataDir, id);
            await collectGarbage(dataDir, id, done);
            await appendLog(dataDir, id, `suspend completed after a daemon restart (${outcome})`);
            report.suspendsCompleted.push(id);
            break;
          }
          const vm = await adopt(found);
          if (!vm) {
            await fail(found, 'the VM ended while being suspended, before its memory was saved');
            continue;
          }
          await applyMicrovmEvent(db, id, 'suspend_abandoned');
          await engine.adoptLoaded((await getMicrovm(db, id))!, vm);
          await appendLog(dataDir, id, 'suspend interrupted by a daemon restart: adopted again, suspending anew');
          toSuspend.push(id);
          report.suspendsRolledBack.push(id);
          continue;
        }
        case 'RESUMING':
          await driver.sweep(run);
          await clearRunFiles(driver, dataDir, id);
          await applyMicrovmEvent(db, id, 'resume_failed');
          await appendLog(dataDir, id, 'resume interrupted by a daemon restart: back to SUSPENDED');
          report.resumesRolledBack.push(id);
          break;
        case 'SUSPENDED':
          // No sweep of its own (each is a scan of /proc: seconds at thousands of SUSPENDED
          // microVMs): a stray QEMU of it can only run in its run directory, on files cleared
          // here, and the sweep of microvms/ below kills every QEMU no RUNNING microVM owns.
          await clearRunFiles(driver, dataDir, id);
          break;
        case 'TERMINATING':
          await driver.sweep(microvmDir(dataDir, id));
          await fs.promises.rm(microvmDir(dataDir, id), { recursive: true, force: true });
          await applyMicrovmEvent(db, id, 'terminated');
          report.terminated.push(id);
          continue;
        default:
          continue;
      }
      const current = (await getMicrovm(db, id))!;
      if (current.state === 'SUSPENDED') {
        const currentRuntime = parseRuntime(current.runtime);
        let local = true;
        try {
          await readSnapshotManifest(snapshotDirFor(dataDir, current, currentRuntime.generation));
        } catch (error) {
          // A cluster: its state may live in the object store only (suspended on another host).
          local = false;
          if (!(await engine.shared?.isStored(current, currentRuntime).catch(() => false))) {
            await fail(current, `its saved state is missing: ${errorMessage(error)}`);
            continue;
          }
        }
        if (local) await collectGarbage(dataDir, id, currentRuntime);
      }
      await engine.adoptLoaded(current, undefined);
    } catch (error) {
      log.error({ microvm: id, err: error }, 'recovery of a microVM failed');
      await fail((await getMicrovm(db, id)) ?? found, `recovery failed: ${errorMessage(error)}`).catch(() => undefined);
    }
  }

  // No QEMU under microvms/ that no microVM owns; no directory of a microVM that ended.
  const root = microvmsRoot(dataDir);
  report.orphansKilled.push(...(await driver.sweep(root + path.sep, { keep: owned })));
  // Active on any host: a directory is kept even when its microVM is another host's.
  const active = new Set((await listMicrovmsInStates(db, ACTIVE_MICROVM_STATES)).map((m) => m.id));
  let entries: string[] = [];
  try {
    entries = await fs.promises.readdir(root);
  } catch {
    // no microVMs yet
  }
  for (const entry of entries) {
    if (!active.has(entry)) await fs.promises.rm(path.join(root, entry), { recursive: true, force: true });
  }
  for (const id of toLaunch) {
    const microvm = await getMicrovm(db, id);
    if (microvm?.state === 'PENDING') await engine.launch(microvm);
  }
  // From now on the engine's scheduler also looks at this host's rows for microVMs due to end.
  engine.startDueScan();
  for (const id of toSuspend) void engine.suspend(id).catch((error: unknown) => log.error({ microvm: id, err: error }, 'suspend after recovery failed'));
  const changed = Object.entries(report).filter(([, list]) => list.length > 0);
  if (changed.length > 0) log.info(Object.fromEntries(changed), 'recovered microVMs after a restart');
  return report;
}
