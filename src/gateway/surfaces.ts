/**
 * Gateway surfaces: protocols that other platforms' clients speak to the gateway port and that
 * Cocoon serves itself instead of proxying to the guest (E2B's envd: its requests name the
 * sandbox with `E2b-Sandbox-Id` or the host `<port>-<id>.<domain>`). A surface claims a request
 * by its headers alone, before any Cocoon token check, and then answers it completely (its own
 * credentials, its own error shape). Requests no surface claims take the usual gateway path.
 * The gateway never buffers what a surface writes: it hands over the raw request and response.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';

export interface GatewaySurface {
  /** Whether this request is for this surface (cheap: headers only). */
  claims(req: IncomingMessage): boolean;
  /** Answers the request; must end `res` (or destroy it) in every case. */
  handle(req: IncomingMessage, res: ServerResponse): void;
  /**
   * The microVM a claimed request is for (optional): in a cluster, a request for a microVM
   * another host runs is forwarded to that host's gateway, whose surface answers it.
   */
  microvmOf?(req: IncomingMessage): string | undefined;
}
