/**
 * Shared scaffolding for tests that run real VMs: a private temp directory (short, for unix
 * socket paths) removed after the test, a check that no QEMU process from it survives, and
 * a patient HTTP GET for guests that are still coming up.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { TestContext } from 'node:test';

export function tempDir(prefix = 'cocoon-test-'): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}

/**
 * PIDs of QEMU processes whose command line mentions `marker` (a test's directory), or whose
 * working directory is below it (a QEMU started ahead and then given its run directory:
 * src/vmm/qemu/pool.ts), but not one still waiting in a pool (`vm-pool/`, closed with its engine).
 */
export function qemuProcessesMentioning(marker: string, options: { withPools?: boolean } = {}): number[] {
  const pids: number[] = [];
  for (const entry of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const cmdline = fs.readFileSync(`/proc/${entry}/cmdline`, 'utf8');
      if (!cmdline.includes('qemu-system')) continue;
      const cwd = cmdline.includes(marker) ? '' : fs.readlinkSync(`/proc/${entry}/cwd`);
      if (cmdline.includes(marker) || (cwd.startsWith(`${marker}/`) && (options.withPools || !cwd.includes('/vm-pool/')))) pids.push(Number(entry));
    } catch {
      // exited meanwhile
    }
  }
  return pids;
}

/**
 * Kills any QEMU left under `dir` (a failed test must not leak) and removes the directory;
 * answers those of VMs (a pool's waiting processes, left by a daemon that died, are killed too).
 */
export function cleanupDir(dir: string): number[] {
  const leaked = qemuProcessesMentioning(dir);
  for (const pid of qemuProcessesMentioning(dir, { withPools: true })) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // gone
    }
  }
  fs.rmSync(dir, { recursive: true, force: true });
  return leaked;
}

/** A temp dir for one test (or suite), cleaned up after it whatever happens. */
export function useTempDir(t: Pick<TestContext, 'after'>, prefix?: string): string {
  const dir = tempDir(prefix);
  t.after(() => {
    cleanupDir(dir);
  });
  return dir;
}

/** GET a URL, retrying connection errors until `timeoutMs`; returns the trimmed body. */
export async function httpGet(url: string, timeoutMs = 30_000): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      const response = await fetch(url, { signal: AbortSignal.timeout(10_000) });
      const body = await response.text();
      if (response.ok) return body.trim();
      throw new Error(`${url}: HTTP ${response.status}`);
    } catch (error) {
      if (Date.now() > deadline) throw error;
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
  }
}
