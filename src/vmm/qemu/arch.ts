/**
 * The guest architecture the QEMU driver runs: the one place it is named (the driver reports it,
 * snapshot manifests record it, a restore checks it). The guest kernel and cocoon-init are built
 * for it, and KVM needs it to be the host's own. COCOON_QEMU's default binary is
 * `qemu-system-<arch>` (src/common/settings.ts).
 */
export const QEMU_ARCH = 'x86_64';
