/**
 * Which microVM a request is for: from `Host: <id>.<domain>` or `X-Cocoon-MicroVM: <id>`.
 * Pure functions, strict on purpose: anything ambiguous is refused before any backend is asked.
 */

import type { ErrorCode } from '../common/error-codes.ts';

export const DEFAULT_GATEWAY_DOMAIN = 'vm.localhost';

/**
 * A microVM id is one lowercase DNS label: 1-63 of [a-z0-9-], not starting or ending with '-'.
 * That keeps `<id>.<domain>` a valid host name and makes ids case-free.
 */
export const MICROVM_ID_PATTERN = /^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$/;

export function isValidMicroVMId(id: string): boolean {
  return MICROVM_ID_PATTERN.test(id);
}

const LABEL = /^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$/;
/** host name (letters, digits, hyphens, dots, one optional trailing dot) or [IPv6], then :port. */
const HOST_SYNTAX = /^(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.?|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$/;

/** Lowercases the domain, drops one trailing dot and checks it is a host name. */
export function normalizeDomain(domain: string): string {
  let d = domain.trim().toLowerCase();
  if (d.endsWith('.')) d = d.slice(0, -1);
  if (d === '' || d.length > 200 || !d.split('.').every((l) => LABEL.test(l))) {
    throw new Error(`gateway domain ${JSON.stringify(domain)} is not a valid host name`);
  }
  return d;
}

export type RouteResolution =
  | { ok: true; microvmId: string; via: 'host' | 'header'; hostPort?: number }
  | { ok: false; status: 400 | 404; code: ErrorCode; message: string };

function fail(status: 400 | 404, code: ErrorCode, message: string): RouteResolution {
  return { ok: false, status, code, message };
}

/**
 * @param host           the Host header as received (undefined when absent)
 * @param hostCount      how many Host header lines the request had (rawHeaders); >1 is refused
 * @param microvmHeader  the X-Cocoon-MicroVM header (Node joins repeated ones with ", ")
 * @param domain         a domain from normalizeDomain
 */
export function resolveMicroVM(
  host: string | undefined,
  hostCount: number,
  microvmHeader: string | undefined,
  domain: string,
): RouteResolution {
  if (hostCount > 1) return fail(400, 'invalid_host', 'the request has more than one Host header');

  let fromHost: string | undefined;
  let hostPort: number | undefined;
  if (host !== undefined && host !== '') {
    if (host.length > 300 || !HOST_SYNTAX.test(host)) {
      return fail(400, 'invalid_host', 'the Host header is not a valid host name');
    }
    let name = host.toLowerCase();
    if (name.startsWith('[')) {
      name = name.slice(0, name.indexOf(']') + 1);
    } else {
      const colon = name.indexOf(':');
      if (colon >= 0) name = name.slice(0, colon);
      if (name.endsWith('.')) name = name.slice(0, -1);
    }
    const suffix = `.${domain}`;
    if (name.endsWith(suffix)) {
      const label = name.slice(0, -suffix.length);
      if (label.includes('.')) {
        return fail(400, 'invalid_microvm_id', `the Host header must be <microvm id>.${domain}, with the id a single label`);
      }
      if (!isValidMicroVMId(label)) {
        return fail(400, 'invalid_microvm_id', 'the microVM id in the Host header is not valid (1-63 of a-z, 0-9, "-")');
      }
      // E2B's getHost form `<port>-<id>.<domain>`: the digits before the first dash name the
      // guest port (ids never start with digits and a dash).
      const portForm = /^([1-9][0-9]{0,4})-([a-z].*)$/.exec(label);
      if (portForm && Number(portForm[1]) <= 65535) {
        hostPort = Number(portForm[1]);
        fromHost = portForm[2];
      } else {
        fromHost = label;
      }
    }
  } else if (microvmHeader === undefined) {
    return fail(400, 'invalid_host', 'the request has no Host header');
  }

  let fromHeader: string | undefined;
  if (microvmHeader !== undefined) {
    if (!isValidMicroVMId(microvmHeader)) {
      return fail(400, 'invalid_microvm_id', 'X-Cocoon-MicroVM must hold one microVM id (1-63 of a-z, 0-9, "-")');
    }
    fromHeader = microvmHeader;
  }

  if (fromHost !== undefined && fromHeader !== undefined && fromHost !== fromHeader) {
    return fail(400, 'microvm_mismatch', 'the Host header and X-Cocoon-MicroVM name different microVMs');
  }
  if (fromHost !== undefined) return { ok: true, microvmId: fromHost, via: 'host', ...(hostPort !== undefined ? { hostPort } : {}) };
  if (fromHeader !== undefined) return { ok: true, microvmId: fromHeader, via: 'header' };
  return fail(404, 'microvm_not_specified', `name a microVM with Host: <microvm id>.${domain} or the header X-Cocoon-MicroVM`);
}

/**
 * The X-Cocoon-Port header: undefined when absent, a port 1-65535, or null when malformed
 * (not plain decimal digits, leading zero, out of range, repeated).
 */
export function parsePortHeader(value: string | undefined): number | null | undefined {
  if (value === undefined) return undefined;
  if (!/^[1-9][0-9]{0,4}$/.test(value)) return null;
  const port = Number(value);
  return port <= 65535 ? port : null;
}
