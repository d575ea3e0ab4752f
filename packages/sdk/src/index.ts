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
export { Exec, GATEWAY_SHELL_PATH, ProcessHandle, Pty, TOKEN_SUBPROTOCOL_PREFIX, type ExecResult, type OutputCallbacks, type ProcessInfo, type RunOptions } from './exec.ts';
export {
  decodeOutputFrame,
  encodeOutputFrame,
  execBody,
  fromBase64,
  parseExecEvent,
  resizeMessage,
  shellStatus,
  SIGNALS,
  startMessage,
  toBase64,
  type CommandLine,
  type ExecEvent,
  type ExitStatus,
  type ProcessSpec,
  type SessionSpec,
  type SignalName,
} from './exec-protocol.ts';
export { Files, octalMode, type FileData, type FileStat, type ReadFormat, type WatchEvent } from './files.ts';
export {
  ExecSession,
  platformWebSocket,
  webSocketUrl,
  type SessionCallbacks,
  type SessionOptions,
  type WebSocketFactory,
  type WebSocketInit,
  type WebSocketLike,
} from './session.ts';
export { IMAGE_STATES, MICROVM_STATES } from './types.ts';
export type * from './types.ts';
