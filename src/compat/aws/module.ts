/**
 * The AWS Lambda MicroVMs surface as a server module: the model's routes at the root of the API
 * port (routes.ts), on Cocoon's image service and microVM service through their modules.
 * See docs/aws.md.
 */
import type { ApiContext } from '../../api/app.ts';
import { CocoonError } from '../../common/errors.ts';
import type { ImagesModule } from '../../wiring/images.ts';
import type { MicrovmModule } from '../../wiring/microvms.ts';
import type { ServerModule } from '../../server.ts';
import { sealerForDataDir } from '../../store/sealed-secrets.ts';
import type { AwsServices } from './context.ts';
import { awsRoutes } from './routes.ts';

export function awsModule(images: ImagesModule, microvms: MicrovmModule): ServerModule {
  return {
    rootRoutes: (app, context: ApiContext) => {
      const services: AwsServices = {
        db: context.db,
        config: context.config,
        images: () => {
          const service = images.service;
          if (!service) throw new CocoonError('unavailable', 'the image service is starting', { status: 503 });
          return service;
        },
        microvms: () => microvms.microvms,
        gatewayPort: () => microvms.gatewayPort,
      };
      awsRoutes(app, services, () => sealerForDataDir(context.config.dataDir));
    },
  };
}
