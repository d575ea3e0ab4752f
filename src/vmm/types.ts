/**
 * The vmm role's vocabulary. The rest of Cocoon speaks to hypervisors only through these types
 * (and the driver in qemu/qemu.ts); nothing outside src/vmm/ builds a QEMU command line.
 */
import type { VmLimits } from '../host/cgroups.ts';

export type Accelerator = 'tcg' | 'kvm';
/** COCOON_ACCEL's values: declared once, with the setting (src/config/config.ts). */
export type { AcceleratorChoice } from '../config/config.ts';

/** Platform limits (docs/design.md): a request outside them is refused with `invalid_resources`. */
export const LIMITS = {
  minVcpus: 1,
  maxVcpus: 16,
  minMemoryMiB: 128,
  maxMemoryMiB: 32 * 1024,
  maxDiskMiB: 32 * 1024,
} as const;

/** What a guest boots: kernel, initramfs, and the kernel command line. */
export interface GuestKernel {
  kernel: string;
  initramfs: string;
  /** Appended to Cocoon's own command line (console, panic behaviour, cocoon.* parameters). */
  extraCmdline?: string;
}

/** The parts of a VM that must be identical between a snapshot and every restore of it. */
export interface MachineShape {
  vcpus: number;
  memoryMiB: number;
  accel: Accelerator;
  guest: GuestKernel;
}

export interface DiskSpec {
  path: string;
  format: 'raw' | 'qcow2';
  readOnly?: boolean;
}

/** A guest TCP port made reachable on the host's loopback. */
export interface PortForward {
  guestPort: number;
  /** A fixed host port; when omitted a free one is picked. */
  hostPort?: number;
}

export interface VmNetwork {
  /** Guest egress is off unless asked for (user-mode networking with restrict=on). */
  egress?: boolean;
  forwards: PortForward[];
}

export interface CommonVmOptions {
  /** Short id, [a-z0-9-], used in file names and the guest hostname. */
  id: string;
  /** A directory owned by this VM: sockets, RAM file, disk layer, serial log. Created if missing. */
  runDir: string;
  network: VmNetwork;
  /** Bound on the serial console log kept on disk (two files of half this size at most). */
  serialLogMaxBytes?: number;
  /** CPU, memory and process limits of the QEMU process (cgroups.ts; defaults from the shape). */
  limits?: VmLimits;
  signal?: AbortSignal;
}

/** Per-VM limits: defined by the host plumbing that enforces them (src/host/cgroups.ts). */
export type { VmLimits };

export interface BootOptions extends CommonVmOptions, MachineShape {
  disk: DiskSpec;
}

export interface RestoreOptions extends CommonVmOptions {
  /** A directory written by `snapshot()`. */
  snapshotDir: string;
  /**
   * Check the memory file and the disk against the manifest's checksums while they are cloned
   * (default true). `'if-present'`: only when the manifest has them; false: not at all — for a
   * fork point this process made moments ago from a running VM (its checksums come later).
   */
  verifyData?: boolean | 'if-present';
  /**
   * The snapshot directory whose memory a diff-form snapshot stands on (its image's snapshot):
   * required to restore one whose manifest's `files.mem.base` is set, ignored otherwise.
   */
  memoryBase?: string;
}

/** A snapshot on disk: `manifest.json`, `state` (device state), `mem` (guest RAM), `disk`. */
export interface SnapshotManifest {
  formatVersion: 1;
  createdAt: string;
  shape: MachineShape;
  /** The kernel command line the guest booted with; every restore passes the same. */
  cmdline: string;
  /** File names inside the snapshot directory. */
  files: {
    state: { name: string; sizeBytes: number; sha256: string };
    /** `checksum` is filled in when the manifest is written, and required by every restore. */
    mem: {
      name: string;
      sizeBytes: number;
      checksum?: DataChecksum;
      /**
       * Present when the file is a memory diff (docs/vmm.md "Memory diffs"): the checksum and
       * size of the base memory it stands on (the image snapshot's `mem`, given to a restore as
       * `RestoreOptions.memoryBase`); `checksum` is then the diff file's, `memoryChecksum` the
       * whole memory's.
       */
      base?: { checksum: DataChecksum; sizeBytes: number };
      memoryChecksum?: DataChecksum;
    };
    disk: { name: string; format: 'raw' | 'qcow2'; sizeBytes: number; checksum?: DataChecksum };
  };
  /** Guest ports the VM forwarded when it was snapshotted (a restore forwards the same by default). */
  guestPorts: number[];
  /**
   * Who made it: the VMM (driver name and its version), the guest architecture, and the
   * protocol version cocoon-init said hello with. Absent in manifests written before these
   * were recorded: such snapshots restore as before, unchecked. Present, a restore refuses a
   * snapshot of another VMM or architecture (`snapshot_incompatible`) and a guest protocol this
   * host does not speak (`guest_protocol_unsupported`).
   */
  vmm?: { name: string; version: string };
  arch?: string;
  guestProtocol?: number;
}

/**
 * A checksum of a big, sparse file's content (guest RAM, disk), cheap enough for every suspend
 * and restore: XXH64 over its non-zero pages with their offsets (src/vmm/native/cocoon-sparse.c).
 * It detects corruption (truncation, torn or misplaced writes, bit flips); it is not a defence
 * against someone who can rewrite the snapshot's files, who could rewrite the manifest too.
 */
export interface DataChecksum {
  algorithm: 'xxh64-pages';
  /** 16 hex digits. */
  value: string;
}

export interface VmStats {
  pid: number;
  /** Resident memory of the QEMU process, bytes. */
  rssBytes: number;
  /** CPU time used by the QEMU process since it started, milliseconds. */
  cpuMs: number;
}
