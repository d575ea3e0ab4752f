/**
 * Making things go wrong for real, for the reliability tests: small filesystems that fill up,
 * a disk whose writes fail only when they reach the device (so fsync fails), killing QEMU at a
 * chosen moment, and measuring whether the host stays responsive.
 *
 * Everything here needs root (mounts, loop devices) and cleans up after itself: `useFaultDir`
 * unmounts what it mounted and kills QEMU processes left under its directory.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import type net from 'node:net';
import path from 'node:path';
import type { TestContext } from 'node:test';
import { cleanupDir, qemuProcessesMentioning, tempDir } from './vm.ts';

export interface FaultDir {
  dir: string;
  /** A tmpfs of `sizeMiB` at `dir/<name>`. */
  tmpfs(name: string, sizeMiB: number): string;
  /** An ext4 filesystem of `sizeMiB` on a loop device at `dir/<name>`, no blocks reserved for root. */
  ext4(name: string, sizeMiB: number): string;
  /**
   * An ext4 filesystem that believes it has `sizeMiB` but whose device can store only
   * `deviceMiB` more than it holds when made: a thin-provisioned disk. Its metadata and journal
   * have their storage from the start; once the device is full (fill `device`), new data fails
   * at writeback, so fsync fails: how a failing or overcommitted disk looks in real life.
   */
  thinExt4(name: string, sizeMiB: number, deviceMiB: number): { mount: string; device: string };
  unmountAll(): void;
}

function sh(command: string, args: string[]): string {
  return execFileSync(command, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}

/** A temp directory for mounts, cleaned up after the suite: QEMUs killed, unmounted, removed. */
export function useFaultDir(hooks: { after: (fn: () => void) => void }, prefix = 'cocoon-fault-'): FaultDir {
  const dir = tempDir(prefix);
  const mounts: string[] = [];
  const unmount = (mount: string) => {
    for (let attempt = 0; attempt < 5; attempt++) {
      try {
        sh('umount', [mount]);
        return;
      } catch {
        try {
          sh('umount', ['-l', mount]);
          return;
        } catch {
          // busy: a process still holds it; try again
        }
      }
    }
  };
  const fault: FaultDir = {
    dir,
    tmpfs(name, sizeMiB) {
      const mount = path.join(dir, name);
      fs.mkdirSync(mount, { recursive: true });
      sh('mount', ['-t', 'tmpfs', '-o', `size=${sizeMiB}m,mode=0755`, 'tmpfs', mount]);
      mounts.push(mount);
      return mount;
    },
    ext4(name, sizeMiB) {
      const image = path.join(dir, `${name}.img`);
      const mount = path.join(dir, name);
      fs.mkdirSync(mount, { recursive: true });
      sh('truncate', ['-s', `${sizeMiB}M`, image]);
      sh('mkfs.ext4', ['-q', '-F', '-m', '0', image]);
      sh('mount', ['-o', 'loop', image, mount]);
      mounts.push(mount);
      fs.chmodSync(mount, 0o755);
      return mount;
    },
    thinExt4(name, sizeMiB, deviceMiB) {
      const device = fault.tmpfs(`${name}-device`, sizeMiB + 64);
      const image = path.join(device, 'disk.img');
      sh('truncate', ['-s', `${sizeMiB}M`, image]);
      sh('mkfs.ext4', ['-q', '-F', '-m', '0', image]);
      // Back every block with device storage, then give back the free ones: metadata and journal
      // keep their storage (so the filesystem itself stays healthy), new data needs fresh storage.
      sh('fallocate', ['-l', `${sizeMiB}M`, image]);
      const blockSize = Number(/Block size:\s+(\d+)/.exec(sh('dumpe2fs', ['-h', image]))?.[1]);
      for (const match of sh('dumpe2fs', [image]).matchAll(/^\s+Free blocks: (.+)$/gm)) {
        for (const range of (match[1] ?? '').split(', ')) {
          const [first, last = first] = range.split('-').map(Number);
          if (first === undefined || Number.isNaN(first) || last === undefined) continue;
          sh('fallocate', ['--punch-hole', '--offset', String(first * blockSize), '--length', String((last - first + 1) * blockSize), image]);
        }
      }
      const used = Math.ceil(Number(sh('du', ['-k', image]).split('\t')[0]) / 1024);
      sh('mount', ['-o', `remount,size=${used + deviceMiB}m`, device]);
      const mount = path.join(dir, name);
      fs.mkdirSync(mount, { recursive: true });
      sh('mount', ['-o', 'loop,errors=continue', image, mount]);
      mounts.push(mount);
      fs.chmodSync(mount, 0o755);
      return { mount, device };
    },
    unmountAll() {
      for (const pid of qemuProcessesMentioning(dir)) {
        try {
          process.kill(pid, 'SIGKILL');
        } catch {
          // gone
        }
      }
      for (const mount of mounts.splice(0).reverse()) unmount(mount);
    },
  };
  hooks.after(() => {
    fault.unmountAll();
    cleanupDir(dir);
  });
  return fault;
}

/** Fills the filesystem holding `dir` with a file until nothing more fits; returns its path. */
export function fillFilesystem(dir: string, name = 'filler'): string {
  const file = path.join(dir, name);
  const chunk = Buffer.alloc(1024 * 1024, 0x5a);
  const fd = fs.openSync(file, 'w');
  try {
    for (let size = chunk.length; size >= 512; ) {
      try {
        fs.writeSync(fd, chunk, 0, size);
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code !== 'ENOSPC') throw error;
        size >>= 1; // the last bits of space, in smaller writes
      }
    }
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
  return file;
}

/** Free bytes of the filesystem holding `dir`, for callers. */
export function freeBytes(dir: string): number {
  const stats = fs.statfsSync(dir);
  return stats.bavail * stats.bsize;
}

/** Waits (polling, bounded) until `predicate` holds; false at the deadline. */
export async function waitUntil(predicate: () => boolean, timeoutMs: number, intervalMs = 1): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (predicate()) return true;
    await new Promise((resolve) => setTimeout(resolve, intervalMs));
  }
  return predicate();
}

/** SIGKILLs the QEMU whose command line mentions `marker` as soon as one exists; resolves with its pid. */
export async function killQemuWhenItAppears(marker: string, timeoutMs = 30_000): Promise<number | undefined> {
  let pid: number | undefined;
  await waitUntil(() => {
    pid = qemuProcessesMentioning(marker)[0];
    return pid !== undefined;
  }, timeoutMs);
  if (pid !== undefined) process.kill(pid, 'SIGKILL');
  return pid;
}

/** A stand-in for the API: a plain HTTP server on 127.0.0.1 answering a small JSON body. */
export async function startApiStandIn(): Promise<{ port: number; close: () => Promise<void> }> {
  const server = http.createServer((request, response) => {
    request.resume();
    response.writeHead(200, { 'content-type': 'application/json' });
    response.end('{"status":"ok"}');
  });
  server.keepAliveTimeout = 60_000;
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    port: (server.address() as net.AddressInfo).port,
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}

/** Latency of `count` sequential GETs over one keep-alive connection, in ms. */
export async function requestLatencies(port: number, count: number): Promise<number[]> {
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  const samples: number[] = [];
  try {
    for (let i = 0; i < count; i++) {
      const start = performance.now();
      await new Promise<void>((resolve, reject) => {
        const request = http.get({ host: '127.0.0.1', port, path: '/api/v1/health', agent }, (response) => {
          response.resume();
          response.once('end', () => resolve());
        });
        request.once('error', reject);
        request.setTimeout(10_000, () => request.destroy(new Error('request timed out')));
      });
      samples.push(performance.now() - start);
    }
  } finally {
    agent.destroy();
  }
  return samples;
}

export function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const middle = sorted.length >> 1;
  return sorted.length % 2 ? (sorted[middle] as number) : ((sorted[middle - 1] as number) + (sorted[middle] as number)) / 2;
}

/**
 * p50 latency of the stand-in API while a hostile guest runs, against the same with the guest
 * paused (QMP stop): blocks alternate, so load from elsewhere on the host hits both alike.
 */
export async function latencyUnderLoad(
  control: { pause: () => Promise<void>; resume: () => Promise<void> },
  port: number,
  options: { blocks?: number; requestsPerBlock?: number; settleMs?: number } = {},
): Promise<{ idleP50: number; loadedP50: number; ratio: number; samples: number }> {
  const blocks = options.blocks ?? 6;
  const perBlock = options.requestsPerBlock ?? 50;
  const settle = options.settleMs ?? 300;
  const idle: number[] = [];
  const loaded: number[] = [];
  await requestLatencies(port, 20); // warm up the server and the client
  for (let block = 0; block < blocks; block++) {
    await control.pause();
    await new Promise((resolve) => setTimeout(resolve, settle));
    idle.push(...(await requestLatencies(port, perBlock)));
    await control.resume();
    await new Promise((resolve) => setTimeout(resolve, settle));
    loaded.push(...(await requestLatencies(port, perBlock)));
  }
  const idleP50 = median(idle);
  const loadedP50 = median(loaded);
  return { idleP50, loadedP50, ratio: loadedP50 / idleP50, samples: idle.length + loaded.length };
}
