/**
 * How a restore starts QEMU (issue 12), as switches so that the vm benchmark can measure the old
 * way beside the new one in one run (`vm.*_sequential_*`). Nothing else changes them.
 *
 * - `overlap`: QEMU starts, and its channels connect, while the snapshot's memory is copied and
 *   checked into its RAM file, and the launch record is written while the channels connect;
 *   off: one step after the other.
 * - `layerTemplate`: disk layers are written from a template (layer-template.ts); off: one
 *   `qemu-img create` each.
 */
export const restoreTuning = { overlap: true, layerTemplate: true };
