/**
 * What every AWS operation gets: the platform's services (through the server modules, never a
 * second implementation) and the request, already authenticated and parsed.
 */
import type { CocoonConfig } from '../../config/config.ts';
import type { ImageService } from '../../images/image-service.ts';
import type { MicrovmService } from '../../lifecycle/service.ts';
import type { Db } from '../../store/sql.ts';
import type { Tenant } from '../../store/tenants.ts';
import type { Json } from './validate.ts';

export interface AwsServices {
  db: Db;
  config: CocoonConfig;
  images: () => ImageService;
  microvms: () => MicrovmService;
  /** The gateway's bound port (microVM endpoints). */
  gatewayPort: () => number;
}

export interface AwsRequest {
  tenant: Tenant;
  /** Path labels, decoded. */
  params: Record<string, string>;
  query: Record<string, string | string[]>;
  body: Json;
}

export interface AwsAnswer {
  status?: number;
  body?: unknown;
}

export type AwsOperation = (services: AwsServices, request: AwsRequest) => Promise<AwsAnswer>;

/** One operation of the model: its HTTP binding and what serves it. */
export interface OperationRoute {
  name: string;
  method: 'GET' | 'POST' | 'PUT' | 'PATCH' | 'DELETE';
  /** Fastify form of the model's requestUri (`:label`). */
  path: string;
  handler: AwsOperation;
}
