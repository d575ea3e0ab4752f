/**
 * How a restore starts QEMU (issue 12), as switches so that the vm benchmark can measure the old
 * way beside the new one in one run (`vm.*_sequential_*`). Nothing else changes them.
 *
 * - `overlap`: QEMU starts, and its channels connect, while the snapshot's memory is copied and
 *   checked into its RAM file, and the launch record is written while the channels connect;
 *   off: one step after the other.
 * - `layerTemplate`: disk layers are written from a template (layer-template.ts); off: one
 *   `qemu-img create` each.
 * - `pool`: a restore takes a QEMU started ahead from the open pool (pool.ts) when one of its
 *   machine waits there; off: it always starts its own.
 * - `pooledInline` (a restore into a pooled QEMU, pooled-restore.ts): the files given to the
 *   QEMU's uid with each call made at once (host/sandbox.ts `inlineFs`), not one after the
 *   other through libuv's thread pool while the memory copy keeps it and the cores busy; the
 *   disk's three QMP commands and the port forwards sent at once, answered together; the device
 *   state sent to a migration the pooled QEMU listens for already, read in one call; and the
 *   guest's clock/RNG message written before `cont`, so that it waits in the guest channel when
 *   the vCPUs start (the restore still resolves only on the guest's answer). Off: as before,
 *   step by step.
 * - `overlapExits`: a restore (its disk layer included) does not wait for the QEMUs that a
 *   suspend ended in the background (exits.ts) to be gone: the resume right after a suspend
 *   waited ~120 ms for the QEMU it replaces. Nothing of the ending process is in its way: its
 *   disk was inactivated when its device state was saved (a completed migration gives up the
 *   image's write lock, so the layer over it opens), the ending touches no name in the run
 *   directory after the answer, and the space ledger's promise of its RAM file ends at the
 *   answer (qemu.ts `snapshot`); a restore's QEMU never meets its sockets or pid file (the pool
 *   replaces the directory, `launch` removes the names first). Off: it waits for every exit in
 *   flight first, as before.
 */
export const restoreTuning = { overlap: true, layerTemplate: true, pool: true, pooledInline: true, overlapExits: true };

/**
 * How a snapshot given `memoryBase` (a suspend) keeps its memory (issue 12), as a switch so that
 * the vm benchmark can measure the old way beside the new one in one run (`vm.suspend_*`).
 *
 * - `diffInCommit`: the memory diff against the base is made inside the snapshot's commit,
 *   straight from the paused VM's RAM file while the device state is saved; only the diff is
 *   written and synced (mem-diff.ts `prepareMemoryDiff`). Off: the whole RAM file is
 *   checksummed, synced and committed, and the caller diffs it afterwards (`diffSnapshotMemory`).
 * - `narrowCompare` (issue 12, the suspend's compare): only the RAM file's pages that may hold
 *   data are compared (its written extents and the pages dirty or under writeback, not every
 *   cached page SEEK_DATA reports), and where the base holds zeros the base is not read
 *   (cocoon-sparse.c `mark_written`). Off: every page SEEK_DATA finds, base and RAM file read.
 * - `diffServer`: the diff is a job of one long-lived helper per process (native/diff-server.ts),
 *   not a helper started for each suspend (its start was most of the `prepare` phase). Off: a
 *   helper per suspend.
 *   With it, the disk layer's checksum and fsync are a held job of that helper too, not a
 *   helper started (this process forked: ~10 ms of a busy event loop) after the pause.
 * - `compareThreads`: threads the compare runs on. 1: on the 2-core TCG host a second thread
 *   took the core QEMU's migration and this process need (measured interleaved: suspend p50 76
 *   ms with 2 against 68 with 1, device_state_save 26 against 16).
 */
export const suspendTuning = { diffInCommit: true, narrowCompare: true, diffServer: true, compareThreads: 1 };
