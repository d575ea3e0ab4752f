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
import { placeMicrovm, type PlacementRequest } from '../cluster/placement.ts';
import { isCocoonError } from '../common/errors.ts';
import { log } from '../common/log.ts';
import { peerTarget, type PeerGatewayAuth } from '../gateway/peer.ts';
import type { MicroVMDirectory } from '../gateway/types.ts';
import { ensureClusterSecret, PEER_HMAC_SECRET } from '../store/cluster-secrets.ts';
import type { Host } from '../store/hosts.ts';
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
  /** Where a SUSPENDED microVM that no live host runs wakes: placement's pick, this host whenever it has room. */
  async function placeWake(microvmId: string): Promise<Host | undefined> {
    const owner = await owners.ownerOf(microvmId);
    if (owner === undefined || owner.kind === 'self' || owner.kind === 'peer') return undefined;
    const microvm = await getMicrovm(db, microvmId);
    if (!microvm || microvm.state !== 'SUSPENDED') return undefined;
    return place({ vcpus: microvm.vcpus, memoryMiB: microvm.memoryMiB, diskMiB: microvm.diskMiB, imageId: microvm.imageId, preferHostId: hostId, holderHostId: microvm.hostId });
  }
  /**
   * Placement's pick, or undefined (here) while no host is registered as live: the registry
   * registers a host only once its API listens, and a host without the cluster module never
   * does; placement cannot judge then, and this host runs what it was sent.
   */
  async function place(request: PlacementRequest): Promise<Host | undefined> {
    try {
      return await placeMicrovm(db, request, { deadAfterMs: settings.deadAfterMs });
    } catch (error) {
      if (isCocoonError(error, 'no_host_capacity') && error.details?.liveHosts === 0) return undefined;
      throw error;
    }
  }  const forwarder = createApiForwarder({
    owners,
    auth,
    logger: log.child({ component: 'cluster-forwarding' }),
    // A launch runs on the host placement picks: this one whenever it has room.
    place: async (size) => (await place({ ...size, preferHostId: hostId })) ?? { id: hostId, apiUrl: null },
    // A resume of a SUSPENDED microVM no live host runs, likewise (and the gateway's wakes, below).
    placeWake,
  });
  context.forwarding = forwarder;


  return {
    directory: (local) => clusterDirectory(local, owners, async (microvmId) => {
      const host = await placeWake(microvmId);
      return host && host.id !== hostId ? peerTarget(host.id, host.gatewayUrl) : undefined;
    }),
    peers: auth,
    async close() {
      if (context.forwarding === forwarder) delete context.forwarding;
      await forwarder.close();
    },
  };
}
