/**
 * The pure parts of the AWS surface, without a server: SigV4 verification against requests
 * signed by @smithy/signature-v4 as the JS client signs them, the rest-json error mapping, state
 * and identifier mapping, and nextToken handling.
 */
import assert from 'node:assert/strict';
import { createHash, createHmac } from 'node:crypto';
import { test } from 'node:test';
import { SignatureV4 } from '@smithy/signature-v4';
import type { SourceData } from '@smithy/types';
import { CocoonError, type ErrorCode } from '../../src/common/errors.ts';
import { AwsError, fromCocoonError } from '../../src/compat/aws/errors.ts';
import { awsHooksFrom, httpHooksFromAws } from '../../src/compat/aws/hooks.ts';
import { portsFromAws } from '../../src/compat/aws/tokens.ts';
import { decodeNextToken, encodeNextToken, pageOf } from '../../src/compat/aws/pagination.ts';
import { findManagedImage, imageState, microvmState, parseImageIdentifier, versionState } from '../../src/compat/aws/shapes.ts';
import { parseAmzDate, parseQuery, verifySigV4, type ReceivedRequest } from '../../src/compat/aws/sigv4.ts';
import type { Image } from '../../src/store/images.ts';

const SECRET = 'cocoon_ak_secret';
const KEY_ID = 'key-01jdq8w1x7e4k3r9s2tq6v5b0c';
const NOW = new Date('2026-12-05T17:00:00.000Z');

class Sha256 {
  private readonly hash;
  constructor(secret?: SourceData) {
    this.hash = secret === undefined ? createHash('sha256') : createHmac('sha256', typeof secret === 'string' ? secret : Buffer.from(secret as Uint8Array));
  }
  update(data: Uint8Array) {
    this.hash.update(data);
  }
  async digest() {
    return new Uint8Array(this.hash.digest());
  }
  reset() {}
}

/** Signs like the JS client: path already encoded, query decoded, x-amz-content-sha256 added. */
async function signed(o: { method?: string; path?: string; query?: Record<string, string | string[]>; body?: string; region?: string; service?: string; at?: Date; secret?: string; extraHeaders?: Record<string, string> } = {}): Promise<ReceivedRequest> {
  const signer = new SignatureV4({
    service: o.service ?? 'lambda',
    region: o.region ?? 'us-east-1',
    credentials: { accessKeyId: KEY_ID, secretAccessKey: o.secret ?? SECRET },
    sha256: Sha256,
  });
  const query = o.query ?? {};
  const request = await signer.sign(
    {
      method: o.method ?? 'GET',
      protocol: 'http:',
      hostname: '127.0.0.1',
      port: 7070,
      path: o.path ?? '/2025-09-09/microvms',
      query,
      headers: { host: '127.0.0.1:7070', 'content-type': 'application/json', ...o.extraHeaders },
      ...(o.body !== undefined ? { body: o.body } : {}),
    },
    { signingDate: o.at ?? NOW },
  );
  const rawQuery = Object.entries(query)
    .flatMap(([k, v]) => [v].flat().map((x) => `${encodeURIComponent(k)}=${encodeURIComponent(x)}`))
    .join('&');
  const headers: Record<string, string> = {};
  for (const [k, v] of Object.entries(request.headers)) headers[k.toLowerCase()] = v;
  return { method: request.method, rawPath: request.path, rawQuery, headers, body: Buffer.from(o.body ?? '') };
}

const lookup = async (id: string) => {
  if (id !== KEY_ID) throw new AwsError('UnrecognizedClientException', 'unknown');
  return { secret: SECRET, principal: 'tenant-1' };
};

const rejectsWith = (code: string, message?: RegExp) => (e: unknown) => {
  assert.ok(e instanceof AwsError, String(e));
  assert.equal(e.code, code);
  if (message) assert.match(e.message, message);
  return true;
};

test('SigV4: requests signed as the JS client signs them verify, in any region', async () => {
  const request = await signed({ method: 'POST', path: '/2025-09-09/microvms', body: '{"imageIdentifier":"web"}', region: 'eu-west-3' });
  assert.equal((await verifySigV4(request, lookup, NOW)).principal, 'tenant-1');
  // Encoded path labels and query values with spaces, colons, slashes, repeated keys.
  const tricky = await signed({
    method: 'DELETE',
    path: `/2017-03-31/tags/${encodeURIComponent('arn:cocoon:lambda:local-1:123456789012:microvm-image:web')}`,
    query: { tagKeys: ['b key', 'a/key:x'], nextToken: 'a+b=c' },
  });
  assert.equal((await verifySigV4(tricky, lookup, NOW)).auth.region, 'us-east-1');
  // Just inside the 5-minute window, both ways.
  await verifySigV4(await signed({ at: new Date(NOW.getTime() - 4 * 60_000) }), lookup, NOW);
  await verifySigV4(await signed({ at: new Date(NOW.getTime() + 4 * 60_000) }), lookup, NOW);
});

test('SigV4: every tampering is refused with the error AWS gives', async () => {
  const body = '{"imageIdentifier":"web"}';
  const good = await signed({ method: 'POST', body });
  await assert.rejects(verifySigV4({ ...good, body: Buffer.from(body.replace('web', 'bad')) }, lookup, NOW), rejectsWith('InvalidSignatureException', /x-amz-content-sha256/));
  // Without the body-hash header, the body itself is hashed into the signature.
  const noHash = await signed({ method: 'POST', body });
  const { 'x-amz-content-sha256': _dropped, ...headers } = noHash.headers as Record<string, string>;
  await assert.rejects(verifySigV4({ ...noHash, headers, body: Buffer.from(body.replace('web', 'bad')) }, lookup, NOW), rejectsWith('InvalidSignatureException'));
  await assert.rejects(verifySigV4({ ...good, rawPath: '/2025-09-09/microvm-images' }, lookup, NOW), rejectsWith('InvalidSignatureException', /does not match/));
  await assert.rejects(verifySigV4({ ...good, method: 'PUT' }, lookup, NOW), rejectsWith('InvalidSignatureException'));
  await assert.rejects(verifySigV4({ ...good, rawQuery: 'maxResults=1' }, lookup, NOW), rejectsWith('InvalidSignatureException'));
  await assert.rejects(verifySigV4({ ...good, headers: { ...good.headers, host: 'evil:7070' } }, lookup, NOW), rejectsWith('InvalidSignatureException'));
  await assert.rejects(verifySigV4(await signed({ secret: 'wrong' }), lookup, NOW), rejectsWith('InvalidSignatureException'));
  await assert.rejects(verifySigV4(await signed({ service: 's3' }), lookup, NOW), rejectsWith('InvalidSignatureException', /correct service: 'lambda'/));
  await assert.rejects(verifySigV4(await signed({ at: new Date(NOW.getTime() - 6 * 60_000) }), lookup, NOW), rejectsWith('InvalidSignatureException', /^Signature expired: 20261205T165400Z is now earlier than 20261205T165500Z/));
  await assert.rejects(verifySigV4(await signed({ at: new Date(NOW.getTime() + 6 * 60_000) }), lookup, NOW), rejectsWith('InvalidSignatureException', /not yet current/));
  const auth = String(good.headers.authorization);
  const withAuth = (authorization: string | undefined) => ({ ...good, headers: { ...good.headers, authorization } });
  await assert.rejects(verifySigV4(withAuth(undefined), lookup, NOW), rejectsWith('MissingAuthenticationTokenException'));
  await assert.rejects(verifySigV4(withAuth(auth.replace(KEY_ID, 'key-unknown')), lookup, NOW), rejectsWith('UnrecognizedClientException'));
  await assert.rejects(verifySigV4(withAuth(auth.replace('AWS4-HMAC-SHA256', 'AWS4-ECDSA-P256-SHA256')), lookup, NOW), rejectsWith('IncompleteSignatureException'));
  await assert.rejects(verifySigV4(withAuth(auth.replace(/SignedHeaders=[^,]+/, 'SignedHeaders=content-type;x-amz-date')), lookup, NOW), rejectsWith('InvalidSignatureException', /'host' must be a signed header/));
  await assert.rejects(verifySigV4(withAuth(auth.replace(/Signature=.*/, 'Signature=zz')), lookup, NOW), rejectsWith('IncompleteSignatureException'));
  await assert.rejects(verifySigV4(withAuth(auth + ', x'), lookup, NOW), rejectsWith('IncompleteSignatureException'));
  await assert.rejects(verifySigV4(withAuth(`AWS4-HMAC-SHA256 ${'x'.repeat(5000)}`), lookup, NOW), rejectsWith('IncompleteSignatureException'));
  await assert.rejects(verifySigV4({ ...good, headers: { ...good.headers, 'x-amz-date': '20261206T170000Z' } }, lookup, NOW), rejectsWith('InvalidSignatureException', /Credential scope/));
  await assert.rejects(verifySigV4({ ...good, headers: { ...good.headers, 'x-amz-date': 'yesterday' } }, lookup, NOW), rejectsWith('IncompleteSignatureException'));
  await assert.rejects(verifySigV4({ ...good, rawQuery: 'X-Amz-Signature=abc' }, lookup, NOW), rejectsWith('IncompleteSignatureException', /presigned/));
  await assert.rejects(verifySigV4({ ...good, headers: { ...good.headers, 'x-amz-security-token': 't' } }, lookup, NOW), rejectsWith('UnrecognizedClientException', /session tokens/));
});

test('SigV4 helpers: X-Amz-Date and query parsing', () => {
  assert.equal(parseAmzDate('20261205T170000Z')?.toISOString(), '2026-12-05T17:00:00.000Z');
  for (const bad of ['20261305T170000Z', '20260230T000000Z', '2026-12-05T17:00:00Z', '', undefined]) assert.equal(parseAmzDate(bad), undefined, String(bad));
  assert.deepEqual({ ...parseQuery('a=1&b=x%20y&a=2&c') }, { a: ['1', '2'], b: 'x y', c: '' });
  assert.throws(() => parseQuery('a=%zz'), AwsError);
});

test('errors: Cocoon errors map to the model exception of their status, keeping the Cocoon code', () => {
  const cases: Array<[number, string]> = [
    [400, 'ValidationException'], [401, 'UnrecognizedClientException'], [403, 'AccessDeniedException'], [404, 'ResourceNotFoundException'],
    [409, 'ConflictException'], [402, 'ServiceQuotaExceededException'], [507, 'ServiceQuotaExceededException'], [429, 'ThrottlingException'],
    [503, 'InternalServerException'], [500, 'InternalServerException'],
  ];
  for (const [status, code] of cases) {
    const mapped = fromCocoonError(new CocoonError('some_code' as ErrorCode, 'what to do', { status }));
    assert.equal(mapped.code, code, String(status));
    assert.equal(mapped.message, 'some_code: what to do');
  }
  assert.equal(fromCocoonError(new CocoonError('build_queue_full', 'x', { status: 429 })).extra.retryAfterSeconds, 5);
  assert.equal(new AwsError('ServiceQuotaExceededException', 'x').status, 402);
  assert.equal(new AwsError('ThrottlingException', 'x').status, 429);
});

test('shapes: states, identifiers, managed images', () => {
  assert.equal(microvmState('RESUMING'), 'PENDING');
  assert.equal(microvmState('FAILED'), 'TERMINATED');
  assert.equal(microvmState('SUSPENDED'), 'SUSPENDED');
  assert.equal(versionState('SNAPSHOTTING'), 'IN_PROGRESS');
  assert.equal(versionState('READY'), 'SUCCESSFUL');
  const v = (state: Image['state']) => ({ state }) as Image;
  assert.equal(imageState([v('PENDING')]), 'CREATING');
  assert.equal(imageState([v('READY')]), 'CREATED');
  assert.equal(imageState([v('FAILED')]), 'CREATE_FAILED');
  assert.equal(imageState([v('READY'), v('BUILDING')]), 'UPDATING');
  assert.equal(imageState([v('READY'), v('READY')]), 'UPDATED');
  assert.equal(imageState([v('READY'), v('FAILED')]), 'UPDATE_FAILED');
  assert.deepEqual(parseImageIdentifier('web'), { kind: 'name', name: 'web' });
  assert.deepEqual(parseImageIdentifier('arn:cocoon:lambda:local-1:123456789012:microvm-image:web'), { kind: 'name', name: 'web', accountId: '123456789012' });
  assert.deepEqual(parseImageIdentifier('arn:aws:lambda:us-east-1:123456789012:microvm-image:web:3'), { kind: 'name', name: 'web', version: '3', accountId: '123456789012' });
  assert.deepEqual(parseImageIdentifier('arn:cocoon:local-1:123456789012:microvm-image/web:3'), { kind: 'cocoon', idOrArn: 'arn:cocoon:local-1:123456789012:microvm-image/web:3' });
  assert.deepEqual(parseImageIdentifier('img-01jdq8w1x7e4k3r9s2tq6v5b0c'), { kind: 'cocoon', idOrArn: 'img-01jdq8w1x7e4k3r9s2tq6v5b0c' });
  assert.equal(findManagedImage('arn:aws:lambda:us-east-1:aws:microvm-image:busybox')?.name, 'busybox');
  assert.equal(findManagedImage('arn:aws:lambda:us-east-1:aws:microvm-image:al2023-1'), undefined);
  assert.equal(findManagedImage('arn:aws:lambda:us-east-1:123456789012:microvm-image:busybox'), undefined, 'not a managed account');
});

test('pagination: tokens are bound to their operation; pages cover everything once', () => {
  const token = encodeNextToken('ListMicrovmImages', 'web');
  assert.equal(decodeNextToken(token, 'ListMicrovmImages'), 'web');
  assert.throws(() => decodeNextToken(token, 'ListMicrovmImageVersions'), AwsError);
  for (const bad of ['', '!!', 'x'.repeat(2000), Buffer.from('ListMicrovmImages:').toString('base64url')]) {
    assert.throws(() => decodeNextToken(bad, 'ListMicrovmImages'), AwsError);
  }
  const all = Array.from({ length: 7 }, (_, i) => `n${i}`);
  const seen: string[] = [];
  let after: string | undefined;
  for (let pages = 0; pages < 10; pages++) {
    const page = pageOf(all, (x) => x, { maxResults: 3, after }, 'Op');
    seen.push(...page.items);
    if (!page.nextToken) break;
    after = decodeNextToken(page.nextToken, 'Op');
  }
  assert.deepEqual(seen, all);
});

test('hooks: the model\'s Hooks map to image httpHooks and back (ENABLED keys, timeouts, port required)', () => {
  assert.equal(httpHooksFromAws({}), undefined);
  assert.deepEqual(
    httpHooksFromAws({ hooks: { port: 9000, microvmImageHooks: { ready: 'ENABLED', readyTimeoutInSeconds: 120, validate: 'DISABLED', validateTimeoutInSeconds: 5 }, microvmHooks: { run: 'ENABLED', terminate: 'ENABLED', terminateTimeoutInSeconds: 3, suspend: 'DISABLED' } } }),
    { port: 9000, ready: { timeoutSeconds: 120 }, run: {}, terminate: { timeoutSeconds: 3 } },
  );
  assert.throws(() => httpHooksFromAws({ hooks: { microvmHooks: { run: 'ENABLED' } } }), /hooks.port is required/);
  assert.throws(() => httpHooksFromAws({ hooks: { port: 9000, microvmHooks: { run: 'ON' } } }), /enum/);
  assert.throws(() => httpHooksFromAws({ hooks: { port: 9000, microvmHooks: { runTimeoutInSeconds: 61 } } }), /less than or equal to 60/);
  assert.throws(() => httpHooksFromAws({ hooks: { port: 9000, microvmImageHooks: { readyTimeoutInSeconds: 3601 } } }), /3600/);
  assert.throws(() => httpHooksFromAws({ hooks: { port: 9000, microvmHooks: { start: 'ENABLED' } } }), /unknown member 'hooks.microvmHooks.start'/);
  assert.deepEqual(awsHooksFrom({ port: 9000, ready: { timeoutSeconds: 300 }, run: { timeoutSeconds: 10 } }), {
    port: 9000,
    microvmImageHooks: { ready: 'ENABLED', readyTimeoutInSeconds: 300, validate: 'DISABLED' },
    microvmHooks: { run: 'ENABLED', runTimeoutInSeconds: 10, resume: 'DISABLED', suspend: 'DISABLED', terminate: 'DISABLED' },
  });
  assert.equal(awsHooksFrom(null), undefined);
});

test('token ports: port, range and allPorts map to Cocoon port specs', () => {
  assert.deepEqual(portsFromAws({ allowedPorts: [{ port: 8080 }, { range: { startPort: 9000, endPort: 9010 } }] }), [8080, { from: 9000, to: 9010 }]);
  assert.equal(portsFromAws({ allowedPorts: [{ port: 8080 }, { allPorts: {} }] }), null);
  for (const bad of [[], [{}], [{ port: 0 }], [{ port: 8080, allPorts: {} }], [{ range: { startPort: 2, endPort: 1 } }], [{ range: { startPort: 1 } }], ['8080'], Array.from({ length: 65 }, () => ({ port: 1 }))]) {
    assert.throws(() => portsFromAws({ allowedPorts: bad }), AwsError, JSON.stringify(bad).slice(0, 60));
  }
  assert.throws(() => portsFromAws({}), /allowedPorts/);
});
