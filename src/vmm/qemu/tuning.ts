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
 */
export const restoreTuning = { overlap: true, layerTemplate: true, pool: true };
