/**
 * The E2B compatibility surface as a server module: the control plane under `/e2b` on the API
 * port (control.ts) and envd on the gateway port (envd.ts), both on Cocoon's own services
 * (the microVM service, exec service) through the microVM module. See docs/e2b.md.
 */
import type { ApiContext } from '../../api/app.ts';
import { CocoonError } from '../../common/errors.ts';
import type { MicrovmModule } from '../../wiring/microvms.ts';
import type { ServerModule } from '../../server.ts';
import { e2bControlRoutes } from './control.ts';
import { createEnvdSurface } from './envd.ts';
import { E2bSandboxes } from './sandboxes.ts';

export interface E2bModule extends ServerModule {
  readonly sandboxes: E2bSandboxes;
}

export function e2bModule(microvms: MicrovmModule): E2bModule {
  let sandboxes: E2bSandboxes | undefined;
  let domain = 'vm.localhost';
  const requireSandboxes = (): E2bSandboxes => {
    if (!sandboxes) throw new CocoonError('not_ready', 'the E2B surface is not started', { status: 503 });
    return sandboxes;
  };
  const envd = createEnvdSurface({ sandboxes: requireSandboxes, exec: () => microvms.exec, domain: () => domain });
  microvms.addGatewaySurface(envd);
  return {
    get sandboxes() {
      return requireSandboxes();
    },
    rootRoutes: (app, context) => e2bControlRoutes(app, context, requireSandboxes),
    async start(context: ApiContext) {
      domain = context.config.gatewayDomain;
      sandboxes = new E2bSandboxes({ db: context.db, microvms: () => microvms.microvms, region: context.config.region, dataDir: context.config.dataDir });
      await sandboxes.start();
    },
    async stop() {
      envd.close();
      sandboxes?.stop();
    },
  };
}
