/**
 * @cocoon/sdk — a typed client for the Cocoon API (stateful, isolated microVMs).
 * Works in Node 24+ and browsers; uses nothing but the platform's fetch and streams.
 */
export { Cocoon, DEFAULT_API_URL, type CocoonOptions } from './client.ts';
export {
  apiError,
  AuthenticationError,
  CocoonApiError,
  CocoonConnectionError,
  CocoonError,
  CocoonTimeoutError,
  ConflictError,
  errorKind,
  GoneError,
  ImageBuildFailedError,
  InvalidArgumentError,
  InvalidRequestError,
  isCocoonApiError,
  MicroVMStateError,
  NotFoundError,
  PermissionError,
  RateLimitError,
  ServerError,
  UnavailableError,
  type ApiErrorKind,
} from './errors.ts';
export { API_PREFIX, normalizeApiUrl, type CallOptions } from './http.ts';
export type { BundleSource, PushOptions } from './bundles.ts';
export type { LogOptions, WaitOptions } from './images.ts';
export { gatewayTarget, type GatewayRequestInit, type MicroVMWaitOptions } from './microvms.ts';
export { collect, paginate } from './pagination.ts';
export { IMAGE_STATES, MICROVM_STATES } from './types.ts';
export type * from './types.ts';
