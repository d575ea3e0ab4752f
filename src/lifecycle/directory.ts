/**
 * The gateway's directory entries (gateway/types.ts `MicroVMRoute`): built from what the engine
 * holds of a microVM it runs, or from the store's row of one it does not (then no port is
 * forwarded here). The upstream address is this host's (config `hostAddress`), not a constant.
 */
import type { MicroVMRoute } from '../gateway/types.ts';
import type { Microvm } from '../store/microvms.ts';
import type { MicrovmState } from './transitions.ts';

/** What the engine knows of a microVM it runs, as far as the directory needs it. */
export interface LiveRouteSource {
  id: string;
  state: MicrovmState;
  /** A termination was decided: the gateway sees TERMINATING at once (410). */
  terminating: boolean;
  appPort: number;
  hasAppPort: boolean;
  autoResume: boolean;
  /** Guest port → host port of the running VM. */
  ports: ReadonlyMap<number, number>;
  /** The running VM: its forwarded ports' backlog (vmm Vm.portBacklog). */
  vm?: { readonly portBacklog?: number } | undefined;
}

export function liveRoute(
  source: LiveRouteSource,
  hostAddress: string,
  /** Forwards a guest port not forwarded yet (gateway/types.ts `exposePort`). */
  exposePort?: (guestPort: number) => Promise<number | null>,
): MicroVMRoute {
  const ports = source.ports;
  return {
    ...(exposePort ? { exposePort } : {}),
    id: source.id,
    state: source.terminating ? 'TERMINATING' : source.state,
    appPort: source.appPort,
    hasAppPort: source.hasAppPort,
    autoResumeEnabled: source.autoResume,
    upstreamHost: hostAddress,
    upstreamPortFor: (guestPort) => ports.get(guestPort) ?? null,
    ...(source.vm?.portBacklog !== undefined ? { upstreamBacklog: source.vm.portBacklog } : {}),
  };
}

/** The entry of a microVM this process does not run (ended, or another host's): no forwarded ports. */
export function storedRoute(microvm: Microvm, hostAddress: string): MicroVMRoute {
  return {
    id: microvm.id,
    state: microvm.state,
    appPort: microvm.port,
    hasAppPort: microvm.hasAppPort,
    autoResumeEnabled: microvm.idlePolicy.autoResumeEnabled,
    upstreamHost: hostAddress,
    upstreamPortFor: () => null,
  };
}
