/**
 * The microVM subsystem as a server module: the lifecycle engine (with start-up recovery), the
 * gateway on its own port (`config.gatewayPort`, 0 = any free port), and the API routes for
 * microVMs and their tokens.
 */
import type { ApiContext } from '../api/app.ts';
import { execApiRoutes } from '../api/routes/exec.ts';
import { microvmRoutes } from '../api/routes/microvms.ts';
import { CocoonError } from '../common/errors.ts';
import { log } from '../common/log.ts';
import { AgentExecService } from '../exec/service.ts';
import { createShellHandler } from '../exec/shell-handler.ts';
import type { ExecService } from '../exec/types.ts';
import { createGateway, type Gateway, type GatewayOptions } from '../gateway/gateway.ts';
import type { GatewaySurface } from '../gateway/surfaces.ts';
import { createTokenVerifier } from '../gateway/tokens.ts';
import type { ServerModule } from '../server.ts';
import { startClusterNet, type ClusterNet } from './cluster-net.ts';
import { LifecycleEngine, type LifecycleOptions } from '../lifecycle/engine.ts';
import { recoverMicrovms, type RecoveryReport } from '../lifecycle/recovery.ts';
import { engineMicrovmService, type MicrovmService } from '../lifecycle/service.ts';

export interface MicrovmModuleOptions {
  /** Gateway settings (limits, wake timeout…); directory, tokens and domain come from the platform. */
  gateway?: Omit<Partial<GatewayOptions>, 'directory' | 'tokens'>;
  lifecycle?: Omit<Partial<LifecycleOptions>, 'db' | 'dataDir'>;
}

export interface MicrovmModule extends ServerModule {
  /** The gateway's bound port (0 before start). */
  readonly gatewayPort: number;
  /** A microVM's URL through the gateway. */
  urlFor(microvmId: string): string;
  readonly engine: LifecycleEngine;
  /** The lifecycle's operations as the API uses them. */
  readonly microvms: MicrovmService;
  /** Processes and files inside microVMs (the API, the gateway's shell and compatibility surfaces use it). */
  readonly exec: ExecService;
  readonly gateway: Gateway | undefined;
  /** What start-up recovery did (undefined before start). */
  readonly recovery: RecoveryReport | undefined;
  /** Adds a protocol the gateway serves itself (E2B's envd); before or after start. */
  addGatewaySurface(surface: GatewaySurface): void;
}

export function microvmModule(options: MicrovmModuleOptions = {}): MicrovmModule {
  let engine: LifecycleEngine | undefined;
  let service: MicrovmService | undefined;
  let gateway: Gateway | undefined;
  let gatewayPort = 0;
  let domain = 'vm.localhost';
  let recovery: RecoveryReport | undefined;
  let clusterNet: ClusterNet | undefined;
  let exec: ExecService | undefined;
  let shell: ReturnType<typeof createShellHandler> | undefined;
  const surfaces: GatewaySurface[] = [];
  const requireExec = (): ExecService => {
    if (!exec) throw new CocoonError('not_ready', 'the microVM subsystem is not started', { status: 503 });
    return exec;
  };
  const requireEngine = (): LifecycleEngine => {
    if (!engine) throw new CocoonError('not_ready', 'the microVM subsystem is not started', { status: 503 });
    return engine;
  };
  const requireService = (): MicrovmService => {
    if (!service) throw new CocoonError('not_ready', 'the microVM subsystem is not started', { status: 503 });
    return service;
  };
  const module: MicrovmModule = {
    get gatewayPort() {
      return gatewayPort;
    },
    get engine() {
      return requireEngine();
    },
    get microvms() {
      return requireService();
    },
    get gateway() {
      return gateway;
    },
    get exec() {
      return requireExec();
    },
    get recovery() {
      return recovery;
    },
    addGatewaySurface(surface: GatewaySurface): void {
      surfaces.push(surface);
    },
    urlFor(microvmId: string): string {
      return `http://${microvmId}.${domain}:${gatewayPort}`;
    },
    routes: async (app, context) => {
      microvmRoutes(app, context, { microvms: requireService, urlFor: (id) => module.urlFor(id) });
      await execApiRoutes(app, context, requireExec);
    },
    async start(context: ApiContext) {
      const { config, db } = context;
      domain = config.gatewayDomain;
      engine = new LifecycleEngine({
        ...(config.hostId ? { hostId: config.hostId } : {}),
        // Guest ports are forwarded on loopback (QEMU hostfwd 127.0.0.1): this host's gateway
        // reaches them there; other hosts reach this host's gateway at COCOON_HOST_ADDRESS.

        // Hosts sharing a PostgreSQL database are a cluster: microVMs run under leases (docs/cluster.md).
        leases: config.databaseUrl !== undefined && config.databaseUrl !== '',
        ...options.lifecycle,
        snapshots: context.snapshots,
        db,
        dataDir: config.dataDir,
      });
      service = engineMicrovmService(engine, db, config.region);
      exec = new AgentExecService({ db, engine: requireEngine });
      try {
        recovery = await recoverMicrovms(engine, db, config.dataDir, log.child({ component: 'lifecycle' }));
        shell = createShellHandler(db, requireExec);
        // In a cluster: forwarding to the host that runs a microVM (wiring/cluster-net.ts).
        clusterNet = await startClusterNet(context, engine.hostId);
        gateway = createGateway({
          ...options.gateway,
          directory: clusterNet ? clusterNet.directory(engine) : engine,
          ...(clusterNet ? { peers: clusterNet.peers } : {}),
          tokens: createTokenVerifier(db),
          domain: config.gatewayDomain,
          shell: shell.handler,
          surfaces,
        });
        const address = await gateway.listen(config.gatewayPort, config.host);
        gatewayPort = address.port;
        log.info({ gateway: `http://${config.host}:${gatewayPort}`, domain }, 'gateway listening');
      } catch (error) {
        await gateway?.close();
        await clusterNet?.close();
        await exec.close();
        await engine.close();
        throw error;
      }
    },
    async stop() {
      shell?.close();
      await gateway?.close();
      await clusterNet?.close();
      await exec?.close();
      await engine?.close();
    },
  };
  return module;
}
