/**
 * What a guest with egress on must still not reach. User-mode networking (slirp) makes the
 * guest's connections from the QEMU process itself, and maps the guest's 10.0.2.2 to the host's
 * 127.0.0.1 when egress is on (measured: test/reliability/hostile-guests.test.ts): without a
 * guard a guest could talk to the API, the gateway and every loopback service of the host.
 *
 * Since every QEMU runs with a uid from Cocoon's range (src/host/sandbox.ts), the host firewall can tell
 * QEMU's traffic apart. A chain `COCOON-QEMU`, jumped to first from OUTPUT (iptables and, where
 * present, ip6tables), rejects for those uids:
 *
 * - new TCP connections and UDP to loopback (the host's own services, all its addresses),
 * - link-local addresses (169.254.0.0/16: cloud metadata; fe80::/10),
 * - private ranges (10/8, 172.16/12, 192.168/16, 100.64/10; fc00::/7),
 *
 * and lets DNS (port 53) through, which slirp forwards to the host's resolver for the guest.
 * Replies of forwarded ports (host to guest) are not new connections and pass. With egress
 * off (the default) slirp's `restrict=on` drops all of it inside QEMU already.
 *
 * The rules are put in place once per process, when the first VM starts, and stay (they match
 * Cocoon's QEMU uids only). They hold for every QEMU: slirp's `restrict=on` is QEMU's own
 * policy, and a QEMU that escaped its guest would not keep to it. Where they cannot be put in
 * place (no iptables, not root), a VM with egress is refused (`egress_unguarded`) unless
 * `COCOON_EGRESS_GUARD=off`; one without egress starts, relying on `restrict=on` alone.
 */
import { CocoonError, errorMessage } from '../common/errors.ts';
import { log } from '../common/log.ts';
import { type IptablesBinary, iptables } from './iptables.ts';
import { type VmIdentity, VM_UID_BASE, VM_UID_COUNT } from '../host/sandbox.ts';
import { setting } from '../common/settings.ts';

export const EGRESS_CHAIN = 'COCOON-QEMU';

function rules(family: 4 | 6, uids: string): string[][] {
  const owner = ['-m', 'owner', '--uid-owner', uids];
  const reject = (proto: 'tcp' | 'udp' | 'all') =>
    proto === 'tcp' ? ['-j', 'REJECT', '--reject-with', 'tcp-reset'] : ['-j', 'REJECT'];
  const blocked = family === 4 ? ['169.254.0.0/16', '10.0.0.0/8', '172.16.0.0/12', '192.168.0.0/16', '100.64.0.0/10'] : ['fe80::/10', 'fc00::/7'];
  return [
    [...owner, '-p', 'udp', '--dport', '53', '-j', 'RETURN'],
    [...owner, '-p', 'tcp', '--dport', '53', '-j', 'RETURN'],
    [...owner, '-o', 'lo', '-p', 'tcp', '--syn', ...reject('tcp')],
    [...owner, '-o', 'lo', '-p', 'udp', ...reject('udp')],
    ...blocked.flatMap((net) => [
      [...owner, '-d', net, '-p', 'tcp', '--syn', ...reject('tcp')],
      [...owner, '-d', net, '-p', 'udp', ...reject('udp')],
    ]),
  ];
}

async function install(binary: IptablesBinary, family: 4 | 6, owners: string[]): Promise<void> {
  const ipt = (...args: string[]) => iptables(args, { binary });
  await ipt('-N', EGRESS_CHAIN).catch(() => undefined); // exists already
  // Added where missing, never flushed: other Cocoon processes' VMs stay guarded meanwhile.
  for (const uids of owners) {
    for (const rule of rules(family, uids)) {
      const present = await ipt('-C', EGRESS_CHAIN, ...rule).then(
        () => true,
        () => false,
      );
      if (!present) await ipt('-A', EGRESS_CHAIN, ...rule);
    }
  }
  const jumps = await ipt('-C', 'OUTPUT', '-j', EGRESS_CHAIN).then(
    () => true,
    () => false,
  );
  if (!jumps) await ipt('-I', 'OUTPUT', '1', '-j', EGRESS_CHAIN);
}

let guarded: Promise<void> | undefined;
let failedOnce = false;

/**
 * Puts the guard in place (once per process) for QEMU running as `identity`; throws
 * `egress_unguarded` where it cannot be (no iptables; QEMU not running as a Cocoon uid).
 */
export function ensureEgressGuard(identity: VmIdentity | undefined, options: { bestEffort?: boolean } = {}): Promise<void> {
  if (!setting('COCOON_EGRESS_GUARD')) return Promise.resolve();
  if (options.bestEffort) {
    // For VMs without egress: tried once in the background, a failure logged once, never in the way.
    if (!failedOnce && identity) {
      ensureEgressGuard(identity).catch((error: unknown) => {
        failedOnce = true;
        log.warn({ error: errorMessage(error) }, 'no egress guard: a QEMU that escaped its guest could reach the host\'s services');
      });
    }
    return Promise.resolve();
  }
  if (!identity) {
    return Promise.reject(
      new CocoonError(
        'egress_unguarded',
        'a VM with egress needs QEMU to run as its own user so that the host firewall can keep it from the host\'s own services; ' +
          'run Cocoon as root (without COCOON_QEMU_USER=root), or set COCOON_EGRESS_GUARD=off to accept the risk',
        { status: 503 },
      ),
    );
  }
  const range = `${VM_UID_BASE}-${VM_UID_BASE + VM_UID_COUNT - 1}`;
  const owners = identity.uid >= VM_UID_BASE && identity.uid < VM_UID_BASE + VM_UID_COUNT ? [range] : [range, String(identity.uid)];
  guarded ??= (async () => {
    try {
      await install('iptables', 4, owners);
    } catch (error) {
      throw new CocoonError(
        'egress_unguarded',
        `a VM with egress needs the host firewall to keep it from the host's own services (iptables: ${errorMessage(error)}); ` +
          'install iptables and run Cocoon as root, or set COCOON_EGRESS_GUARD=off to accept the risk',
        { status: 503, cause: error },
      );
    }
    await install('ip6tables', 6, owners).catch((error: unknown) =>
      log.warn({ error: errorMessage(error) }, 'no IPv6 egress guard (ip6tables failed); guests with egress may reach the host over IPv6'),
    );
    log.info({ chain: EGRESS_CHAIN }, 'egress guard in place: QEMU cannot reach loopback, link-local or private addresses');
  })().catch((error: unknown) => {
    guarded = undefined;
    throw error;
  });
  return guarded;
}
