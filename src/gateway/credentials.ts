/**
 * Where a token travels besides the X-Cocoon-Token header: the `cocoon_token` query parameter
 * (opened once by a browser) and the HttpOnly cookie the gateway sets in exchange.
 */

export const TOKEN_HEADER = 'x-cocoon-token';
export const PORT_HEADER = 'x-cocoon-port';
export const MICROVM_HEADER = 'x-cocoon-microvm';
export const TOKEN_QUERY_PARAM = 'cocoon_token';
export const TOKEN_COOKIE = 'cocoon_token';

/** Most cookie values with our name that one request may make the gateway try. */
export const MAX_COOKIE_CANDIDATES = 4;

export interface QueryTokenExtraction {
  /** Values of the parameter, in order (usually zero or one). */
  readonly tokens: string[];
  /** The request target without the parameter (other parameters byte for byte as they were). */
  readonly target: string;
}

function decodeComponent(s: string): string | undefined {
  try {
    return decodeURIComponent(s.replace(/\+/g, ' '));
  } catch {
    return undefined;
  }
}

/** Finds and removes `cocoon_token` parameters from an origin-form request target. */
export function extractQueryToken(target: string, param = TOKEN_QUERY_PARAM): QueryTokenExtraction {
  const q = target.indexOf('?');
  if (q < 0) return { tokens: [], target };
  // Fast path; '%' and '+' may hide an encoded parameter name, so they take the slow one.
  if (!target.includes(param, q) && !target.includes('%', q) && !target.includes('+', q)) return { tokens: [], target };
  const path = target.slice(0, q);
  const kept: string[] = [];
  const tokens: string[] = [];
  for (const part of target.slice(q + 1).split('&')) {
    const eq = part.indexOf('=');
    const rawName = eq < 0 ? part : part.slice(0, eq);
    if (decodeComponent(rawName) === param) {
      tokens.push(eq < 0 ? '' : (decodeComponent(part.slice(eq + 1)) ?? ''));
    } else {
      kept.push(part);
    }
  }
  if (tokens.length === 0) return { tokens, target };
  const rest = kept.join('&');
  return { tokens, target: rest === '' ? path : `${path}?${rest}` };
}

/** Values of every cookie named `name` in a Cookie header, in order. */
export function readCookies(header: string | undefined, name = TOKEN_COOKIE): string[] {
  if (header === undefined || !header.includes(name)) return [];
  const values: string[] = [];
  for (const pair of header.split(';')) {
    const eq = pair.indexOf('=');
    if (eq < 0) continue;
    if (pair.slice(0, eq).trim() !== name) continue;
    let value = pair.slice(eq + 1).trim();
    if (value.length >= 2 && value.startsWith('"') && value.endsWith('"')) value = value.slice(1, -1);
    values.push(value);
  }
  return values;
}

/**
 * The Cookie header without our cookie; other cookies keep their order and bytes.
 * Undefined when nothing is left.
 */
export function stripCookie(header: string | undefined, name = TOKEN_COOKIE): string | undefined {
  if (header === undefined) return undefined;
  if (!header.includes(name)) return header;
  const kept = header
    .split(';')
    .filter((pair) => {
      const eq = pair.indexOf('=');
      const n = (eq < 0 ? pair : pair.slice(0, eq)).trim();
      return n !== name && pair.trim() !== '';
    })
    .map((p) => p.trim());
  return kept.length === 0 ? undefined : kept.join('; ');
}

/** Set-Cookie for the gateway's token cookie: host-only (no Domain), so scoped to this microVM's host. */
export function tokenCookie(value: string, maxAgeSeconds: number, secure: boolean, name = TOKEN_COOKIE): string {
  const maxAge = Math.max(0, Math.floor(maxAgeSeconds));
  return `${name}=${value}; Max-Age=${maxAge}; Path=/; HttpOnly; SameSite=Lax${secure ? '; Secure' : ''}`;
}

/** Set-Cookie that deletes the gateway's token cookie. */
export function clearTokenCookie(secure: boolean, name = TOKEN_COOKIE): string {
  return tokenCookie('', 0, secure, name);
}

/**
 * Guest Set-Cookie headers made safe: a cookie named like the gateway's is dropped (a guest
 * must not plant or overwrite a visitor's token), and a `Domain` attribute is removed so a
 * hostile guest cannot toss cookies onto sibling microVMs' hosts under the shared domain
 * (the cookie becomes host-only, which is what a guest app on its own host meant anyway).
 */
export function filterGuestSetCookies(values: readonly string[], name = TOKEN_COOKIE): string[] {
  const out: string[] = [];
  for (const v of values) {
    const first = v.split(';', 1)[0]!;
    const eq = first.indexOf('=');
    const cookieName = (eq < 0 ? first : first.slice(0, eq)).trim();
    if (cookieName.toLowerCase() === name.toLowerCase()) continue;
    if (!/;\s*domain\s*=/i.test(v)) {
      out.push(v);
      continue;
    }
    out.push(
      v
        .split(';')
        .filter((attr, i) => i === 0 || !/^\s*domain\s*=/i.test(attr))
        .join(';'),
    );
  }
  return out;
}
