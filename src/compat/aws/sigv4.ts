/**
 * AWS Signature Version 4 verification by recomputation: the request as received (method, raw
 * path, query, the headers the client says it signed, the body) is signed again with
 * @smithy/signature-v4 (the signer the JS client itself uses) under the secret of the presented
 * access key id, and the two signatures are compared in constant time.
 *
 * Checked before that: the Authorization header's form, the credential scope (service `lambda`,
 * any region, `aws4_request`), `X-Amz-Date` (form, same day as the scope, within
 * MAX_SKEW_MS of the server's clock), that `host` and `x-amz-date` are signed, and that a sent
 * `x-amz-content-sha256` is the body's real hash (the signer would otherwise trust it). Errors
 * are AWS's: the JS client and botocore raise exceptions with these names.
 */
import { createHash, createHmac, timingSafeEqual } from 'node:crypto';
import { SignatureV4 } from '@smithy/signature-v4';
import type { Checksum, SourceData } from '@smithy/types';
import { AwsError } from './errors.ts';

export const SIGNING_SERVICE = 'lambda';
/** AWS refuses requests signed more than 5 minutes before or after its clock. */
export const MAX_SKEW_MS = 5 * 60_000;
const EMPTY_SHA256 = 'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855';
const MAX_AUTHORIZATION_LENGTH = 4096;
const MAX_SIGNED_HEADERS = 64;

export interface ReceivedRequest {
  method: string;
  /** The path as sent (still percent-encoded), without the query. */
  rawPath: string;
  /** The raw query string without '?' ('' when none). */
  rawQuery: string;
  /** Lower-case names, as Node gives them. */
  headers: Record<string, string | string[] | undefined>;
  body: Buffer;
}

export interface ParsedAuthorization {
  accessKeyId: string;
  shortDate: string;
  region: string;
  service: string;
  signedHeaders: string[];
  signature: string;
}

/** What the verifier needs of the key store: the secret of an access key id, or why there is none. */
export type SecretLookup<P> = (accessKeyId: string) => Promise<{ secret: string; principal: P }>;

/** Node's SHA-256 / HMAC-SHA256 in the shape the signer wants (no extra dependency). */
class NodeSha256 implements Checksum {
  private hash;
  constructor(secret?: SourceData) {
    this.hash = secret === undefined ? createHash('sha256') : createHmac('sha256', toBuffer(secret));
  }
  update(data: Uint8Array): void {
    this.hash.update(data);
  }
  async digest(): Promise<Uint8Array> {
    return new Uint8Array(this.hash.digest());
  }
  reset(): void {
    throw new Error('not used by the signer');
  }
}

function toBuffer(data: SourceData): Buffer {
  if (typeof data === 'string') return Buffer.from(data, 'utf8');
  if (ArrayBuffer.isView(data)) return Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  return Buffer.from(data);
}

function header(headers: ReceivedRequest['headers'], name: string): string | undefined {
  const value = headers[name];
  return Array.isArray(value) ? value.join(',') : value;
}

const incomplete = (message: string) => new AwsError('IncompleteSignatureException', message);

/** `AWS4-HMAC-SHA256 Credential=AKID/20250101/us-east-1/lambda/aws4_request, SignedHeaders=a;b, Signature=hex` */
export function parseAuthorization(value: string | undefined): ParsedAuthorization {
  if (value === undefined || value === '') {
    throw new AwsError('MissingAuthenticationTokenException', 'Missing Authentication Token: sign the request with AWS SigV4 (access key id = a Cocoon API key id, secret = the API key)');
  }
  if (value.length > MAX_AUTHORIZATION_LENGTH) throw incomplete('the Authorization header is too long');
  const match = /^AWS4-HMAC-SHA256 (.*)$/.exec(value);
  if (!match) {
    throw incomplete("Authorization header requires the 'AWS4-HMAC-SHA256' algorithm (Cocoon's AWS surface takes SigV4 only; Cocoon's own API takes Bearer keys under /api/v1)");
  }
  const parts = new Map<string, string>();
  for (const part of match[1]!.split(',')) {
    const eq = part.indexOf('=');
    if (eq < 0) throw incomplete(`Authorization header has a malformed part '${part.trim().slice(0, 40)}'`);
    parts.set(part.slice(0, eq).trim(), part.slice(eq + 1).trim());
  }
  const credential = parts.get('Credential');
  const signedHeaders = parts.get('SignedHeaders');
  const signature = parts.get('Signature');
  if (!credential || !signedHeaders || !signature) {
    throw incomplete("Authorization header requires 'Credential', 'SignedHeaders' and 'Signature' parameters");
  }
  const scope = credential.split('/');
  if (scope.length !== 5 || scope[4] !== 'aws4_request') {
    throw incomplete("Credential must be '<access key id>/<yyyymmdd>/<region>/<service>/aws4_request'");
  }
  const [accessKeyId, shortDate, region, service] = scope as [string, string, string, string];
  if (!/^[\x21-\x7e]{1,128}$/.test(accessKeyId)) throw incomplete('the access key id is malformed');
  if (!/^\d{8}$/.test(shortDate)) throw incomplete('the credential date is malformed');
  if (!/^[a-z0-9-]{1,64}$/.test(region)) throw incomplete('the credential region is malformed');
  if (!/^[0-9a-f]{64}$/.test(signature)) throw incomplete('the signature must be 64 lower-case hex digits');
  const headerList = signedHeaders.split(';');
  if (headerList.length > MAX_SIGNED_HEADERS || headerList.some((h) => !/^[a-z0-9!#$%&'*+.^_`|~-]{1,128}$/.test(h))) {
    throw incomplete('SignedHeaders is malformed');
  }
  return { accessKeyId, shortDate, region, service, signedHeaders: headerList, signature };
}

/** `20250101T120000Z` → Date, or undefined. */
export function parseAmzDate(value: string | undefined): Date | undefined {
  const m = value === undefined ? null : /^(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})Z$/.exec(value);
  if (!m) return undefined;
  const date = new Date(Date.UTC(+m[1]!, +m[2]! - 1, +m[3]!, +m[4]!, +m[5]!, +m[6]!));
  return Number.isNaN(date.getTime()) || date.toISOString().slice(0, 19).replace(/[-:]/g, '') !== value!.slice(0, 15) ? undefined : date;
}

function amz(date: Date): string {
  return date.toISOString().replace(/\.\d{3}Z$/, 'Z').replace(/[-:]/g, '');
}

/** The raw query as the signer wants it: decoded keys and values, repeated keys as lists. */
export function parseQuery(raw: string): Record<string, string | string[]> {
  const query: Record<string, string | string[]> = Object.create(null);
  if (raw === '') return query;
  for (const pair of raw.split('&')) {
    if (pair === '') continue;
    const eq = pair.indexOf('=');
    const key = decode(eq < 0 ? pair : pair.slice(0, eq));
    const value = eq < 0 ? '' : decode(pair.slice(eq + 1));
    const existing = query[key];
    query[key] = existing === undefined ? value : Array.isArray(existing) ? [...existing, value] : [existing, value];
  }
  return query;
}

function decode(text: string): string {
  try {
    return decodeURIComponent(text);
  } catch {
    throw incomplete('the query string is not valid percent-encoding');
  }
}

/**
 * Verifies the request's SigV4 signature; answers the principal of the access key, or throws
 * the AWS error a client expects (expired, not yet current, bad signature, unknown key…).
 */
export async function verifySigV4<P>(request: ReceivedRequest, lookup: SecretLookup<P>, now: Date = new Date()): Promise<{ principal: P; auth: ParsedAuthorization }> {
  if (/(^|&)X-Amz-Signature=/i.test(request.rawQuery)) {
    throw incomplete('presigned URLs (query-string SigV4) are not accepted; sign with the Authorization header');
  }
  const auth = parseAuthorization(header(request.headers, 'authorization'));
  if (auth.service !== SIGNING_SERVICE) {
    throw new AwsError('InvalidSignatureException', `Credential should be scoped to correct service: '${SIGNING_SERVICE}'.`);
  }
  const amzDate = header(request.headers, 'x-amz-date');
  const signedAt = parseAmzDate(amzDate);
  if (!signedAt) throw incomplete("the request needs an 'X-Amz-Date' header of the form yyyymmddThhmmssZ");
  if (amzDate!.slice(0, 8) !== auth.shortDate) {
    throw new AwsError('InvalidSignatureException', `Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP: '${auth.shortDate}' != '${amzDate!.slice(0, 8)}'`);
  }
  if (signedAt.getTime() < now.getTime() - MAX_SKEW_MS) {
    throw new AwsError('InvalidSignatureException', `Signature expired: ${amzDate} is now earlier than ${amz(new Date(now.getTime() - MAX_SKEW_MS))} (${amz(now)} - 5 min.)`);
  }
  if (signedAt.getTime() > now.getTime() + MAX_SKEW_MS) {
    throw new AwsError('InvalidSignatureException', `Signature not yet current: ${amzDate} is still later than ${amz(new Date(now.getTime() + MAX_SKEW_MS))} (${amz(now)} + 5 min.)`);
  }
  for (const needed of ['host', 'x-amz-date']) {
    if (!auth.signedHeaders.includes(needed)) throw new AwsError('InvalidSignatureException', `'${needed}' must be a signed header`);
  }
  if (header(request.headers, 'x-amz-security-token') !== undefined) {
    throw new AwsError('UnrecognizedClientException', 'temporary credentials (session tokens) are not accepted: sign with a Cocoon API key id and the API key');
  }
  const { secret, principal } = await lookup(auth.accessKeyId);

  const bodyHash = createHash('sha256').update(request.body).digest('hex');
  const sentHash = header(request.headers, 'x-amz-content-sha256');
  if (sentHash !== undefined && sentHash !== bodyHash) {
    throw new AwsError('InvalidSignatureException', 'The provided x-amz-content-sha256 header does not match what was computed (unsigned payloads are not accepted).');
  }
  const headers: Record<string, string> = {};
  for (const name of auth.signedHeaders) {
    const value = header(request.headers, name);
    if (value === undefined) throw new AwsError('InvalidSignatureException', `the signed header '${name}' is missing from the request`);
    headers[name] = value;
  }
  const signer = new SignatureV4({
    service: SIGNING_SERVICE,
    region: auth.region,
    credentials: { accessKeyId: auth.accessKeyId, secretAccessKey: secret },
    sha256: NodeSha256,
    uriEscapePath: true,
    // Never add x-amz-content-sha256 on our side: it is signed only when the client sent it.
    applyChecksum: false,
  });
  const signed = await signer.sign(
    {
      method: request.method.toUpperCase(),
      protocol: 'http:',
      hostname: headers.host ?? '',
      path: request.rawPath,
      query: parseQuery(request.rawQuery),
      headers,
      body: request.body.length === 0 ? undefined : request.body,
    },
    {
      signingDate: signedAt,
      signingRegion: auth.region,
      signingService: SIGNING_SERVICE,
      // Sign exactly the headers the client named, even those the signer skips by default.
      signableHeaders: new Set(auth.signedHeaders),
    },
  );
  const expected = /Signature=([0-9a-f]{64})$/.exec(String(signed.headers.authorization ?? signed.headers.Authorization))?.[1];
  const given = Buffer.from(auth.signature, 'hex');
  const ours = Buffer.from(expected ?? EMPTY_SHA256, 'hex');
  if (!expected || !timingSafeEqual(given, ours)) {
    throw new AwsError(
      'InvalidSignatureException',
      'The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key (the Cocoon API key) and signing method.',
    );
  }
  return { principal, auth };
}
