/**
 * Placement: which host of a cluster runs a microVM that launches or resumes. A host qualifies
 * when it is LIVE (heartbeat within the dead-after bound) and has room: the vCPUs and memory of
 * its running microVMs plus this one stay within its capacity, and so does the disk of every
 * microVM it holds (SUSPENDED ones too). Among those, in order: the host that received the
 * request (no forwarding), then a host that has held a microVM of the image (its snapshot is
 * most likely in that host's cache), then the one with the most memory left. The choice is
 * advice: the lease (src/store/leases.ts) still decides who runs it.
 */
import { CocoonError } from '../common/errors.ts';
import { listHostsWithImage, listHostUsage, listLiveHosts, type Host, type HostUsage } from '../store/hosts.ts';
import type { Db } from '../store/sql.ts';

export interface PlacementRequest {
  vcpus: number;
  memoryMiB: number;
  diskMiB: number;
  /** Hosts that held a microVM of this image are preferred. */
  imageId?: string | null;
  /** The host that received the request: chosen whenever it has room. */
  preferHostId?: string;
  /** The host that holds the microVM's files now (a SUSPENDED one): its disk is counted there already. */
  holderHostId?: string | null;
}

export interface Candidate {
  host: Host;
  usage: HostUsage;
}

function room(candidate: Candidate, request: PlacementRequest): { fits: boolean; memoryLeft: number } {
  const { capacity } = candidate.host;
  const { usage } = candidate;
  const disk = candidate.host.id === request.holderHostId ? 0 : request.diskMiB;
  const fits = usage.vcpus + request.vcpus <= capacity.vcpus
    && usage.memoryMiB + request.memoryMiB <= capacity.memoryMiB
    && usage.diskMiB + disk <= capacity.diskMiB;
  return { fits, memoryLeft: capacity.memoryMiB - usage.memoryMiB - request.memoryMiB };
}

/** The pure choice (see the file's comment); undefined when no candidate has room. */
export function choosePlacement(candidates: readonly Candidate[], request: PlacementRequest, cachedOn: ReadonlySet<string> = new Set()): Host | undefined {
  const fitting = candidates
    .map((c) => ({ c, r: room(c, request) }))
    .filter(({ r }) => r.fits);
  if (fitting.length === 0) return undefined;
  const preferred = fitting.find(({ c }) => c.host.id === request.preferHostId);
  if (preferred) return preferred.c.host;
  const rank = (x: { c: Candidate; r: { memoryLeft: number } }): [number, number] => [cachedOn.has(x.c.host.id) ? 0 : 1, -x.r.memoryLeft];
  fitting.sort((a, b) => {
    const [ca, ma] = rank(a);
    const [cb, mb] = rank(b);
    return ca - cb || ma - mb || (a.c.host.id < b.c.host.id ? -1 : 1);
  });
  return fitting[0]?.c.host;
}

/** Picks a host from the store (throws `no_host_capacity` when none has room). */
export async function placeMicrovm(db: Db, request: PlacementRequest, options: { deadAfterMs: number; now?: Date }): Promise<Host> {
  const now = options.now ?? new Date();
  const [hosts, usage, cached] = await Promise.all([
    listLiveHosts(db, new Date(now.getTime() - options.deadAfterMs)),
    listHostUsage(db),
    request.imageId ? listHostsWithImage(db, request.imageId) : Promise.resolve([]),
  ]);
  const usageOf = new Map(usage.map((u) => [u.hostId, u]));
  const candidates = hosts.map((host) => ({ host, usage: usageOf.get(host.id) ?? { hostId: host.id, vcpus: 0, memoryMiB: 0, diskMiB: 0, running: 0 } }));
  const chosen = choosePlacement(candidates, request, new Set(cached));
  if (chosen === undefined) {
    throw new CocoonError(
      'no_host_capacity',
      `no live host has room for ${request.vcpus} vCPUs, ${request.memoryMiB} MiB of memory and ${request.diskMiB} MiB of disk ` +
        `(${hosts.length} live host${hosts.length === 1 ? '' : 's'}); retry once others were suspended or terminated, or add a host`,
      { details: { liveHosts: hosts.length } },
    );
  }
  return chosen;
}
