export { createGateway, type Gateway, type GatewayOptions, type GatewayStats } from './gateway.ts';
export type {
  AllowedPorts,
  GatewayActivity,
  MaybePromise,
  MicroVMDirectory,
  MicroVMRoute,
  MicrovmState,
  TokenFailureReason,
  TokenVerification,
  TokenVerifier,
} from './types.ts';
export { createTokenVerifier, hashToken, parseToken, type TokenVerifierOptions } from './tokens.ts';
export { DEFAULT_GATEWAY_DOMAIN, MICROVM_ID_PATTERN, isValidMicroVMId } from './routing.ts';
export { TOKEN_COOKIE, TOKEN_HEADER, PORT_HEADER, MICROVM_HEADER, TOKEN_QUERY_PARAM } from './credentials.ts';
