/**
 * The cluster as a server module (docs/cluster.md): with a PostgreSQL `COCOON_DATABASE_URL`,
 * once the API listens, this host registers in the `hosts` table with the URLs other hosts
 * reach it at (`COCOON_HOST_ADDRESS` and the bound ports) and its capacity, then heartbeats and
 * sweeps for dead hosts. With SQLite it does nothing at all: one host, behaviour unchanged.
 */
import type { ApiContext } from '../api/app.ts';
import { clusterSettings, type ClusterSettings } from '../cluster/config.ts';
import { placeMicrovm, type PlacementRequest } from '../cluster/placement.ts';
import { HostRegistry } from '../cluster/registry.ts';
import { log } from '../common/log.ts';
import type { Host } from '../store/hosts.ts';
import type { ServerModule } from '../server.ts';
import type { MicrovmModule } from './microvms.ts';

export interface ClusterModule extends ServerModule {
  /** This host's registration (undefined with SQLite, or before the API listens). */
  readonly registry: HostRegistry | undefined;
  readonly settings: ClusterSettings | undefined;
  /** A host with room for a microVM (this one whenever it has room); throws `no_host_capacity`. Only in a cluster. */
  place(request: Omit<PlacementRequest, 'preferHostId'>): Promise<Host>;
}

function urlOf(address: string, port: number): string {
  return `http://${address.includes(':') ? `[${address}]` : address}:${port}`;
}

/** What the cluster needs of the microVM module: this host's id and the gateway's bound port. */
export interface ClusterHostSide {
  /** Its lifecycle: who this host is, and (absent without microVMs) how it stops its VMs when it loses its leases. */
  readonly engine: Pick<MicrovmModule['engine'], 'hostId'> & Partial<Pick<MicrovmModule['engine'], 'fenceAll' | 'settleFenced'>>;
  readonly gatewayPort: number;
}

export function clusterModule(microvms: ClusterHostSide): ClusterModule {
  let registry: HostRegistry | undefined;
  let settings: ClusterSettings | undefined;
  let db: ApiContext['db'] | undefined;
  const logger = log.child({ component: 'cluster' });
  return {
    get registry() {
      return registry;
    },
    get settings() {
      return settings;
    },
    async start(context) {
      // Checked before anything listens: a bad combination stops the start.
      settings = clusterSettings(context.config);
      db = context.db;
    },
    async listening(context, { apiPort }) {
      if (!settings?.enabled) return;
      const address = context.config.hostAddress ?? '127.0.0.1';
      const gatewayPort = microvms.gatewayPort;
      registry = new HostRegistry({
        db: context.db,
        hostId: microvms.engine.hostId,
        settings,
        apiUrl: urlOf(address, apiPort),
        gatewayUrl: gatewayPort > 0 ? urlOf(address, gatewayPort) : null,
        logger,
        hooks: {
          // Every lease this host held is (or is about to be) another's: its VMs must stop.
          onDeclaredDead: async () => { await microvms.engine.fenceAll?.(); },
          onLeaseExpiring: async () => { await microvms.engine.fenceAll?.(); },
          onReconnected: async () => { await microvms.engine.settleFenced?.(); },
        },
      });
      await registry.start();
      logger.info({ host: registry.hostId, api: urlOf(address, apiPort), capacity: settings.capacity }, 'registered in the cluster');
    },
    async stop() {
      await registry?.stop();
    },
    async place(request) {
      if (!settings?.enabled || !db || !registry) throw new Error('placement runs only in a cluster (a PostgreSQL COCOON_DATABASE_URL)');
      return placeMicrovm(db, { ...request, preferHostId: registry.hostId }, { deadAfterMs: settings.deadAfterMs });
    },
  };
}
