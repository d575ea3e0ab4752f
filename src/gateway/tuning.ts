/**
 * How the gateway spends its CPU per request (issue 12: with an app that closes every
 * connection, busybox httpd, the gateway's CPU per request competes with the TCG guest on a
 * small host), as switches so that the gateway benchmark can measure the old way beside the new
 * one in one run (`gateway.close_before_*`, bench/gateway-apps.ts). Nothing else changes them.
 *
 * - `rememberTokens`: a token the store accepted is remembered by this process (tokens.ts
 *   `TokenMemory`), so that its next requests cost one SHA-256 and a constant-time compare, not a
 *   database read and two SHA-256s; a revocation written by this process forgets every remembered
 *   verdict at once. Only where this process is the store's one writer (SQLite). Off: the
 *   database is read on every request.
 * - `plainConnect`: a connection of its own for one exchange (upstream.ts OneShotUpstreamClient,
 *   for an app that closes every connection) is opened with a bare `net.connect`, without undici's
 *   connector and its TCP keep-alive and no-delay socket options. Off: undici's connector.
 * - `directWrite`: a node:http exchange (one-shot, or the `node` client) writes the guest's body
 *   to the client from a 'data' listener, pausing the guest while the client is full, instead of
 *   `pipe` and its listeners and bookkeeping per request. Off: `pipe`.
 */
export const gatewayTuning = { rememberTokens: true, plainConnect: true, directWrite: true };
