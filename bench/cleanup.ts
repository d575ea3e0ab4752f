/** Shared by the suites that run a daemon: whatever happened, nothing of the run stays behind. */
import fs from 'node:fs';
import type { Database } from '../src/store/sql.ts';
import { findQemuProcesses } from '../src/vmm/qemu/qemu.ts';
import type { Daemon } from '../test/support/daemon.ts';

/** Kills the daemon, closes the store, kills any QEMU of the run (by its data directory) and removes the directory. */
export async function endDaemonRun(run: { daemon: Daemon | undefined; db: Database | undefined; dataDir: string }): Promise<void> {
  await run.daemon?.kill();
  await run.db?.close();
  for (const pid of findQemuProcesses(run.dataDir)) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // gone
    }
  }
  fs.rmSync(run.dataDir, { recursive: true, force: true });
}
