/**
 * The images role as a server module: routes for bundles and images, and the build queue
 * started (after recovering what a previous process left in flight) and stopped with the server.
 */
import { bundleRoutes } from '../api/routes/bundles.ts';
import { imageRoutes } from '../api/routes/images.ts';
import type { ApiContext } from '../api/app.ts';
import { CocoonError } from '../common/errors.ts';
import type { ServerModule } from '../server.ts';
import { ImageService, imageServiceOptionsFromEnv, type ImageServiceOptions } from '../images/image-service.ts';

export interface ImagesModule extends ServerModule {
  /** The running service (after start), for tests, benchmarks and other modules. */
  readonly service: ImageService | undefined;
}

export function imagesModule(options: Partial<ImageServiceOptions> = {}): ImagesModule {
  const resolved = { ...imageServiceOptionsFromEnv(), ...options };
  let service: ImageService | undefined;
  const ensure = (context: ApiContext): ImageService => {
    service ??= new ImageService({ config: context.config, db: context.db, objects: context.objects, snapshots: context.snapshots }, resolved);
    return service;
  };
  const current = (): ImageService => {
    if (!service) throw new CocoonError('unavailable', 'the image service is starting', { status: 503 });
    return service;
  };
  return {
    get service() {
      return service;
    },
    async routes(app, context) {
      await bundleRoutes({ limits: () => resolved.bundleLimits })(app, context);
      await imageRoutes(current)(app, context);
    },
    async start(context) {
      await ensure(context).start();
    },
    async stop() {
      await service?.stop();
    },
  };
}
