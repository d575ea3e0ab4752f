/**
 * The VM driver interface: all the lifecycle engine, recovery, the image pipeline and fork
 * need of a hypervisor. QEMU implements it (src/vmm/qemu/driver.ts); another VMM (Firecracker
 * on KVM, say) would implement the same, and test/conformance/vm-driver.test.ts runs one suite
 * against every implementation.
 *
 * A driver starts VMs (`boot` from a root disk, `restore` from a snapshot, `adopt` one that an
 * earlier process started) and answers handles (`Vm`) that take snapshots and fork points, say
 * where a guest port is reachable (`endpoint`), carry the control channel to cocoon-init
 * (`channel`, docs/guest-protocol.md) and end the VM (`kill`). Below a run directory the files
 * are the driver's own: the rest of Cocoon knows only the run directory and the snapshot
 * directories (manifest.json, snapshot.ts), and asks the driver to `sweep` what is left there.
 */
import type { GuestChannel } from './guest-channel.ts';
import type { Phases } from './phases.ts';
import type { Accelerator, AcceleratorChoice, BootOptions, DiskSpec, GuestKernel, MachineShape, RestoreOptions, SnapshotManifest, VmStats } from './types.ts';

/** Where a forwarded guest port is reachable from this host. */
export interface Endpoint {
  host: string;
  port: number;
}

export interface SnapshotOptions {
  /** Punch out zero pages of the memory file, so that restores copy less (worth it for images). */
  compact?: boolean;
  /** fsync memory, disk and state before the snapshot counts as taken (default true). */
  durable?: boolean;
  /**
   * Called once the device state is saved (and the snapshot can be completed by
   * `recoverSnapshot` should this process die), before the VM is ended. For crash tests.
   */
  onStateSaved?: () => Promise<void>;
  /** Filled in with the milliseconds of each step of the snapshot (phases.ts), for benchmarks. */
  phases?: Phases;
  /**
   * A snapshot directory (the image's) whose memory this snapshot's may stand on: the memory is
   * then kept as a diff against it (docs/vmm.md "Memory diffs"), made inside the commit, when
   * the driver can (same memory size, not compacted); else it is whole. The manifest says which.
   */
  memoryBase?: string;
  /**
   * Answer once the snapshot is committed and the VM's process has been told to end, without
   * waiting for its exit (a suspend: ~7 ms less). `exited` turns true a little later
   * (`waitForExit`); the driver's own calls that could race the ending process (a boot, a disk
   * layer rebased, `clearRunFiles`) wait for it. A restore into the same run directory may start
   * at once: after the answer the ending touches nothing of it. Default: the process is gone
   * when the snapshot answers.
   */
  endAfterAnswer?: boolean;
}

/** A disk that a disk layer stands on (`sameContent`: a hard link of the current backing file, so only the header changes). */
export type BackingDisk = DiskSpec & { sameContent?: boolean };

export interface ForkPointOptions {
  /** fsync the copies and the manifest before the fork point counts as taken (default true). */
  durable?: boolean;
  /**
   * Rebase the disk copy onto this file (an ancestor of its backing chain, e.g. the image's
   * disk), so that the fork point does not depend on the layers in between. Done after the VM
   * runs again.
   */
  rebaseOnto?: BackingDisk;
  /**
   * Leave the memory's and disk's checksums out of the manifest (and fsync nothing): the fork
   * point is restored at once with `verifyData: false`; `completeForkPoint` adds them later.
   */
  deferChecksums?: boolean;
  /** For crash tests: awaited while the VM is paused, after the device state and copies are made. */
  onPaused?: () => Promise<void>;
}

export interface ForkPoint {
  manifest: SnapshotManifest;
  /** How long the source's vCPUs were stopped. */
  pausedMs: number;
  /** Milliseconds of each step, for the log. */
  steps: Record<string, number>;
}

export interface SpaceWatchOptions {
  /** A path on the filesystem the VM's files live on (its run directory). */
  path: string;
  /**
   * Free bytes needed before a guest paused on a disk write is continued (default 64 MiB); a
   * guest with a sparse RAM file is stopped below it and continued at twice it.
   */
  minFreeBytes?: number;
  /** How often free space is checked while the guest is paused, or runs with a sparse RAM file (default 2 s). */
  intervalMs?: number;
  /** `disk`: QEMU paused it on a disk write; `memory`: stopped because its sparse RAM file could not grow. */
  onPaused?: (cause: 'disk' | 'memory') => void;
  onContinued?: () => void;
}

export interface AdoptOptions {
  id: string;
  runDir: string;
  serialLogMaxBytes?: number;
  signal?: AbortSignal;
}

/** What `recoverSnapshot` found: a complete snapshot, one it completed, or nothing to complete. */
export type SnapshotRecovery = 'committed' | 'completed' | 'none';

/** One running VM. */
export interface Vm {
  readonly id: string;
  readonly runDir: string;
  readonly shape: MachineShape;
  /** The process that runs the VM (for logs and the runtime record). */
  readonly pid: number;
  /** Guest port → host port on this host's loopback, for every forwarded port. */
  readonly hostPorts: ReadonlyMap<number, number>;
  /**
   * Connections each forwarded port's listener queues for the VMM to accept (its listen()
   * backlog); absent: unknown, take 1 (QEMU's user-mode network, libslirp's `listen(s, 1)`).
   */
  readonly portBacklog?: number;
  /** The control channel to cocoon-init (hello, readiness, hooks, shutdown). */
  readonly channel: GuestChannel;
  /** The unix socket on the host that reaches the guest agent (src/guest/agent/). */
  readonly agentSocketPath: string;
  /** The VM's process has exited (guest power-off, crash or kill). */
  readonly exited: boolean;
  /** Milliseconds of each step of this VM's boot or restore (phases.ts); absent for an adopted VM. */
  readonly startPhases?: Readonly<Phases>;
  waitForExit(): Promise<void>;
  /** Where `guestPort` is reachable; `port_not_forwarded` when it is not forwarded. */
  endpoint(guestPort: number): Endpoint;
  /**
   * Forwards one more guest port while the VM runs and answers where it is reachable (at once
   * when it is forwarded already); the next snapshot records it. Optional: a driver without it
   * forwards only the ports it was started with.
   */
  forwardPort?(guestPort: number): Promise<Endpoint>;
  /**
   * Takes a snapshot into `targetDir` (which must not exist) and ends the VM; the directory
   * appears whole or not at all. A failure before the commit lets the VM run on as before
   * (`details.vmRunning`).
   */
  snapshot(targetDir: string, options?: SnapshotOptions): Promise<SnapshotManifest>;
  /** A complete snapshot of the running VM into `targetDir` after a brief pause; the VM runs on. */
  forkPoint(targetDir: string, options?: ForkPointOptions): Promise<ForkPoint>;
  /** Continues the guest if it is paused (one adopted in the middle of a snapshot, say). */
  ensureRunning(): Promise<void>;
  /**
   * Continues a guest that the VMM paused for lack of disk space once there is room; stops one
   * whose memory is not reserved when the disk is nearly full (and continues it with room again).
   * Answers a stop function.
   */
  watchDiskSpace(options: SpaceWatchOptions): () => void;
  /** Ends the VM at once and waits until its process is gone. Idempotent. */
  kill(): Promise<void>;
  /** Lets go of the VM without stopping it (a later `adopt` re-attaches). */
  detach(): void;
  /** Kills the VM and removes its run directory. */
  destroy(): Promise<void>;
  stats(): VmStats;
  /** The last lines of the serial console, for error messages and logs. */
  serialTail(lines?: number): string;
}

export interface VmDriver {
  /** The VMM's name, as snapshot manifests record it (`qemu`). */
  readonly name: string;
  /** The guest architecture it runs (`x86_64`), as snapshot manifests record it. */
  readonly arch: string;
  /** The accelerator VMs will use for the configured choice (`auto`: what really boots a guest here). */
  chooseAccelerator(choice: AcceleratorChoice, guest: GuestKernel): Promise<Accelerator>;
  /** Boots a fresh VM from kernel + initramfs + root disk; resolves once cocoon-init said hello. */
  boot(options: BootOptions & { bootTimeoutMs?: number }): Promise<Vm>;
  /** Restores a snapshot as a new, independent VM (own memory copy, own disk layer). */
  restore(options: RestoreOptions): Promise<Vm>;
  /** Re-attaches to a VM an earlier process started in `runDir`; `vm_gone` when it is not running. */
  adopt(options: AdoptOptions): Promise<Vm>;
  /** Finishes what a snapshot into `targetDir` left when its process died. */
  recoverSnapshot(targetDir: string, options?: { durable?: boolean }): Promise<SnapshotRecovery>;
  /**
   * Kills every VM process of this driver whose run directory is at or below `dir` (but those
   * in `keep`), and waits until they are gone; answers their pids.
   */
  sweep(dir: string, options?: { keep?: ReadonlySet<number> }): Promise<number[]>;
  /** Pids of this driver's VM processes whose run directory is at or below `dir`. */
  processesUnder(dir: string): number[];
  /** Removes a dead VM's files from its run directory (memory, disk layer, sockets), keeping logs. */
  clearRunFiles(runDir: string): Promise<void>;
  /**
   * Opens this host's pool of VM processes started ahead for restores, in `dir` (on the run
   * directories' filesystem; emptied first). Undefined where the driver keeps none or it is off
   * (QEMU: `COCOON_QEMU_POOL`, src/vmm/qemu/pool.ts). `close` ends every process it holds.
   */
  openPool?(dir: string): Promise<{ close(): Promise<void> } | undefined>;
  /**
   * Resolves once every VM process this driver ended without waiting for its exit (a suspend
   * answers before its process is gone: `SnapshotOptions.endAfterAnswer`) has exited. A host
   * that stops waits for it: a process that exits first leaves a killed VM still dying.
   */
  exitsSettled(): Promise<void>;
  /** A copy-on-write layer at `layer` over `backing`: the VM writes there, the backing file never changes. */
  createDiskLayer(backing: string, backingFormat: DiskSpec['format'], layer: string): Promise<void>;
  /**
   * Points a disk layer at another backing file (only what differs from it is kept).
   * `copiedFrom`: the directory the layer was copied from, where the backing name it carries
   * (relative to the layer's directory) still resolves; the safe rebase reads the old backing.
   */
  rebaseDisk(disk: string, onto: BackingDisk, options?: { copiedFrom?: string }): Promise<void>;
}
