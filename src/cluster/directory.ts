/**
 * The gateway's directory in a cluster: this host's (the lifecycle's) directory, plus where
 * other hosts run microVMs. A microVM this host runs answers at once, with no database read
 * (the lifecycle's lookup is synchronous then: the hot path stays as on one host). For any
 * other, its lease says who owns it (owners.ts): another live host → the route carries `peer`
 * and the gateway forwards the request to that host's gateway; none, this host, or a lost one
 * → served here, or woken on the host placement picks when this one lacks room. A host that loses
 * the race to wake a microVM (another host took its lease first) forwards to the winner.
 */
import { isPromiseLike, type MicroVMDirectory, type MicroVMRoute } from '../gateway/types.ts';
import { peerTarget, type PeerTarget } from '../gateway/peer.ts';
import type { OwnerLookup } from './owners.ts';

/**
 * Where placement would wake a SUSPENDED microVM that no live host runs: another host's
 * gateway, or undefined for this host (it has room, or the microVM is not such a one). Throws
 * `no_host_capacity` when no host has room.
 */
export type WakePlacement = (microvmId: string) => Promise<PeerTarget | undefined>;

export function clusterDirectory(local: MicroVMDirectory, owners: Pick<OwnerLookup, 'ownerOf'>, placeWake?: WakePlacement): MicroVMDirectory {
  async function elsewhere(route: MicroVMRoute): Promise<MicroVMRoute> {
    const owner = await owners.ownerOf(route.id);
    if (owner?.kind !== 'peer') return route;
    const peer = peerTarget(owner.host.hostId, owner.host.gatewayUrl);
    return peer ? { ...route, peer } : route;
  }
  /** The microVM's route with `peer` set when another live host owns it now, else undefined. */
  async function peerRoute(microvmId: string): Promise<MicroVMRoute | undefined> {
    const owner = await owners.ownerOf(microvmId);
    if (owner?.kind !== 'peer') return undefined;
    const peer = peerTarget(owner.host.hostId, owner.host.gatewayUrl);
    if (!peer) return undefined;
    const found = local.lookup(microvmId);
    const route = isPromiseLike(found) ? await found : found;
    return route ? { ...route, peer } : undefined;
  }
  return {
    lookup(microvmId) {
      const found = local.lookup(microvmId);
      if (!isPromiseLike(found)) return found; // held by this host's lifecycle
      return found.then((route) => (route === null ? null : elsewhere(route)));
    },
    async ensureRunning(microvmId, signal) {
      const forwarded = await peerRoute(microvmId);
      if (forwarded) return forwarded;
      // No live host runs it: placement picks where it wakes (this host whenever it has room).
      // The chosen host's gateway wakes it there; a request forwarded to it is never placed again.
      const placed = placeWake ? await placeWake(microvmId) : undefined;
      if (placed) {
        const found = local.lookup(microvmId);
        const route = isPromiseLike(found) ? await found : found;
        if (route) return { ...route, peer: placed };
      }
      try {
        return await local.ensureRunning(microvmId, signal);
      } catch (error) {
        // Another host won the race to wake it (its lease): forward there instead.
        const winner = await peerRoute(microvmId).catch(() => undefined);
        if (winner) return winner;
        throw error;
      }
    },
    requestStarted: (id) => local.requestStarted(id),
    requestFinished: (id) => local.requestFinished(id),
    webSocketOpened: (id) => local.webSocketOpened(id),
    webSocketClosed: (id) => local.webSocketClosed(id),
  };
}
