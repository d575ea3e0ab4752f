/**
 * The subsystems a default server runs. Each role of DESIGN.md plugs in here with its routes
 * and its start/stop.
 */
import { imagesModule } from './images/module.ts';
import { microvmModule } from './lifecycle/module.ts';
import type { ServerModule } from './server.ts';

export function defaultModules(): ServerModule[] {
  return [imagesModule(), microvmModule()];
}
