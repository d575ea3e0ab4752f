/**
 * Forwarding between the hosts of a cluster, wired (docs/cluster.md "Forwarding"): with a
 * PostgreSQL `COCOON_DATABASE_URL`, the microVM module's gateway gets the cluster directory
 * (a microVM another live host runs is forwarded to that host's gateway) and the peer
 * authentication, and the API gets the forwarder of requests that must run on the owner. The
 * key that signs requests between hosts is a cluster secret in the database, made by the first
 * host. With SQLite nothing here runs: one host, behaviour unchanged.
 */
import type { ApiContext } from '../api/app.ts';
import { createApiForwarder } from '../cluster/api-forwarding.ts';
import { clusterSettings } from '../cluster/config.ts';
import { clusterDirectory } from '../cluster/directory.ts';
import { OwnerLookup } from '../cluster/owners.ts';
import { PeerAuth } from '../cluster/peer-auth.ts';
import { placeMicrovm } from '../cluster/placement.ts';
import { log } from '../common/log.ts';
import { peerTarget, type PeerGatewayAuth, type PeerTarget } from '../gateway/peer.ts';
import type { MicroVMDirectory } from '../gateway/types.ts';
import { ensureClusterSecret, PEER_HMAC_SECRET } from '../store/cluster-secrets.ts';
import { getMicrovm } from '../store/microvms.ts';

export interface ClusterNet {
  /** This host's directory, wrapped: microVMs other hosts run carry their `peer`. */
  directory(local: MicroVMDirectory): MicroVMDirectory;
  readonly peers: PeerGatewayAuth;
  close(): Promise<void>;
}

/** Sets up forwarding when this host is in a cluster; undefined on one host (SQLite). */
export async function startClusterNet(context: ApiContext, hostId: string): Promise<ClusterNet | undefined> {
  const settings = clusterSettings(context.config);
  if (!settings.enabled) return undefined;
  const { db } = context;
  const auth = new PeerAuth({ hostId, secret: await ensureClusterSecret(db, PEER_HMAC_SECRET) });
  const owners = new OwnerLookup({ db, selfId: hostId, deadAfterMs: settings.deadAfterMs });
  const forwarder = createApiForwarder({
    owners,
    auth,
    logger: log.child({ component: 'cluster-forwarding' }),
    // A launch runs on the host placement picks: this one whenever it has room.
    place: (size) => placeMicrovm(db, { ...size, preferHostId: hostId }, { deadAfterMs: settings.deadAfterMs }),
  });
  context.forwarding = forwarder;
  /** A SUSPENDED microVM that no live host runs wakes where placement picks: here whenever this host has room. */
  async function placeWake(microvmId: string): Promise<PeerTarget | undefined> {
    const owner = await owners.ownerOf(microvmId);
    if (owner === undefined || owner.kind === 'self' || owner.kind === 'peer') return undefined;
    const microvm = await getMicrovm(db, microvmId);
    if (!microvm || microvm.state !== 'SUSPENDED') return undefined;
    const host = await placeMicrovm(
      db,
      { vcpus: microvm.vcpus, memoryMiB: microvm.memoryMiB, diskMiB: microvm.diskMiB, imageId: microvm.imageId, preferHostId: hostId, holderHostId: microvm.hostId },
      { deadAfterMs: settings.deadAfterMs },
    );
    return host.id === hostId ? undefined : peerTarget(host.id, host.gatewayUrl);
  }
  return {
    directory: (local) => clusterDirectory(local, owners, (microvmId) => placeWake(microvmId)),
    peers: auth,
    async close() {
      if (context.forwarding === forwarder) delete context.forwarding;
      await forwarder.close();
    },
  };
}
