/**
 * The subsystems a default server runs. Each role of docs/design.md plugs in here with its routes
 * and its start/stop.
 */
import { awsModule } from './compat/aws/module.ts';
import { e2bModule } from './compat/e2b/module.ts';
import { clusterModule } from './wiring/cluster.ts';
import { imagesModule } from './wiring/images.ts';
import { microvmModule } from './wiring/microvms.ts';
import type { ServerModule } from './server.ts';

export function defaultModules(): ServerModule[] {
  const images = imagesModule();
  const microvms = microvmModule();
  // After the microVM module: it starts the gateway and the engine the E2B and AWS surfaces use.
  // Last: it registers this host once the API and the gateway listen (only in a cluster).
  return [images, microvms, e2bModule(microvms), awsModule(images, microvms), clusterModule(microvms)];
}
