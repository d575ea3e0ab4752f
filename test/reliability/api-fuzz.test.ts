/**
 * Bad input against the real API server (every default module, in process, ephemeral ports,
 * a temp data directory): property-based request bodies, query strings, headers and path
 * parameters, plus hand-written raw-byte requests. For every request: a 4xx (2xx only where
 * the input is valid), never a 5xx, the one error shape of src/api/errors.ts, no row added to
 * images, microVMs, tokens (nor tenants, API keys, bundles) by a refused request, and a server
 * that still answers a normal request afterwards; at the end, no file outside the data directory.
 *
 * Nothing here can start a build or a VM: the admin tenant (whose key most requests use) has
 * no bundle and no image, so a valid POST /images is a 404 bundle_not_found and a valid
 * POST /microvms a 404 image_not_found. Token issuing runs against a microVM row (a READY
 * image and a microVM made in the store, never launched) of another tenant; suspend, resume
 * and terminate are sent to that row only with bodies the JSON parser refuses.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import fc from 'fast-check';
import { createApiKey } from '../../src/store/api-keys.ts';
import { createMicrovm } from '../../src/store/microvms.ts';
import { createTenant } from '../../src/store/tenants.ts';
import { readyImage } from '../store/helpers.ts';
import { startTestServer, type TestServer } from '../surfaces/helpers.ts';

const RUNS = 60;
/** Marks every name a request could try to create as a file, to look for it afterwards. */
const MARK = `fuzzmark${randomBytes(4).toString('hex')}`;

interface Raw {
  /** 0: no status line came back (the server closed the connection, or the exchange timed out). */
  status: number;
  headers: Record<string, string>;
  body: string;
  raw: string;
}

/**
 * Sends exact bytes on a fresh connection and reads until the server closes. `halfClose` ends
 * the sending side at once (a server may then drop an answer not yet written: Node aborts a
 * request whose client half-closed, unless httpAllowHalfOpen).
 */
function rawExchange(port: number, data: string | Buffer, timeoutMs = 5000, halfClose = false): Promise<Raw> {
  return new Promise((resolve) => {
    const socket = net.connect(port, '127.0.0.1');
    const chunks: Buffer[] = [];
    const finish = () => {
      clearTimeout(timer);
      resolve(parseResponse(Buffer.concat(chunks).toString('latin1')));
    };
    const timer = setTimeout(() => {
      socket.destroy();
      finish();
    }, timeoutMs);
    socket.on('data', (c: Buffer) => chunks.push(c));
    socket.on('error', () => {});
    socket.on('close', finish);
    socket.write(data, () => {
      if (halfClose) socket.end();
    });
  });
}

function parseResponse(raw: string): Raw {
  const m = /^HTTP\/1\.1 (\d{3})[^\r\n]*\r\n/.exec(raw);
  if (!m) return { status: 0, headers: {}, body: '', raw };
  const end = raw.indexOf('\r\n\r\n');
  const headers: Record<string, string> = {};
  for (const line of raw.slice(m[0].length, end).split('\r\n')) {
    const colon = line.indexOf(':');
    if (colon > 0) headers[line.slice(0, colon).trim().toLowerCase()] = line.slice(colon + 1).trim();
  }
  let body = raw.slice(end + 4);
  if (headers['content-length'] !== undefined) body = body.slice(0, Number(headers['content-length']));
  else if (/chunked/i.test(headers['transfer-encoding'] ?? '')) {
    let out = '';
    let rest = body;
    for (;;) {
      const nl = rest.indexOf('\r\n');
      const size = parseInt(rest.slice(0, nl), 16);
      if (!(size > 0)) break;
      out += rest.slice(nl + 2, nl + 2 + size);
      rest = rest.slice(nl + 2 + size + 2);
    }
    body = out;
  }
  return { status: Number(m[1]), headers, body: Buffer.from(body, 'latin1').toString('utf8'), raw };
}

/** A request with Connection: close and a correct Content-Length, the headers exactly as given. */
function http1(method: string, target: string, headers: Array<[string, string]>, body?: string | Buffer): Buffer {
  const bytes = body === undefined ? undefined : Buffer.from(body);
  const lines = [`${method} ${target} HTTP/1.1`, 'Host: 127.0.0.1', 'Connection: close', ...headers.map(([k, v]) => `${k}: ${v}`)];
  if (bytes !== undefined) lines.push(`Content-Length: ${bytes.length}`);
  return Buffer.concat([Buffer.from(lines.join('\r\n') + '\r\n\r\n', 'latin1'), bytes ?? Buffer.alloc(0)]);
}

function isErrorShape(body: string): boolean {
  try {
    const parsed = JSON.parse(body) as unknown;
    if (typeof parsed !== 'object' || parsed === null || Object.keys(parsed).join() !== 'error') return false;
    const error = (parsed as { error: unknown }).error;
    return typeof error === 'object' && error !== null && Object.keys(error).sort().join() === 'code,message'
      && typeof (error as { code: unknown }).code === 'string' && typeof (error as { message: unknown }).message === 'string';
  } catch {
    return false;
  }
}

/** Every table a request could wrongly add a row to. */
const TABLES = ['images', 'microvms', 'tokens', 'tenants', 'api_keys', 'bundles'] as const;

/** Paths under `dir` (relative), not following links. */
function listTree(dir: string, depth = 6): string[] {
  const out: string[] = [];
  const walk = (d: string, rel: string, left: number) => {
    let entries: fs.Dirent[];
    try {
      entries = fs.readdirSync(d, { withFileTypes: true });
    } catch {
      return;
    }
    for (const e of entries) {
      const r = rel ? `${rel}/${e.name}` : e.name;
      out.push(r);
      if (e.isDirectory() && left > 0) walk(path.join(d, e.name), r, left - 1);
    }
  };
  walk(dir, '', depth);
  return out;
}

// ---- generators ----------------------------------------------------------------------------

const pollutionKey = fc.constantFrom('__proto__', 'constructor', 'prototype', 'hasOwnProperty', 'toString', '__defineGetter__');
const hostileString = fc.oneof(
  fc.string({ maxLength: 40 }),
  fc.string({ unit: 'grapheme', maxLength: 40 }),
  fc.string({ unit: 'binary', maxLength: 40 }),
  fc.constantFrom('', ' ', 'NaN', '-1', '1e309', 'Infinity', '0x10', '１２', '\u0000', '\ud800', '../../etc/passwd', `..%2f${MARK}`, 'arn:cocoon:local-1:000000000000:microvm-image/x:1'),
  fc.nat({ max: 3 }).map((k) => ['a', '\u00e9', '\u{1f600}', '\u0000'][k]!.repeat(70_000)),
);
const hostileNumber = fc.oneof(
  fc.integer(),
  fc.double(),
  fc.constantFrom(0, -1, -0, 1.5, 2 ** 31, 2 ** 53 + 1, 1e308, Number.MAX_SAFE_INTEGER, Number.MIN_SAFE_INTEGER),
  fc.bigInt({ min: -(10n ** 40n), max: 10n ** 40n }).map((n) => ({ __raw: n.toString() })),
);
/** A scalar: a string, a hostile number, a boolean, null, an empty array or object. */
const scalar = fc.oneof(hostileString, hostileNumber, fc.boolean(), fc.constant(null), fc.constant([]), fc.constant({}));

/** Nested values whose keys include prototype-pollution names; numbers may be raw literals. */
const hostileValue: fc.Arbitrary<unknown> = fc.letrec((tie) => ({
  value: fc.oneof({ depthSize: 'small', withCrossShrink: true }, scalar, tie('array'), tie('object')),
  array: fc.array(tie('value'), { maxLength: 4 }),
  object: fc.dictionary(fc.oneof(fc.string({ maxLength: 12 }), pollutionKey), tie('value'), { maxKeys: 5 }),
})).value;

/** JSON text for a value, with raw number literals (huge integers) and literal "__proto__" keys. */
function toJson(value: unknown): string {
  if (value !== null && typeof value === 'object' && '__raw' in value && Object.keys(value).length === 1) return String((value as { __raw: string }).__raw);
  if (Array.isArray(value)) return `[${value.map(toJson).join(',')}]`;
  if (value !== null && typeof value === 'object') {
    return `{${Object.entries(value).map(([k, v]) => `${JSON.stringify(k)}:${toJson(v)}`).join(',')}}`;
  }
  if (typeof value === 'number' && !Number.isFinite(value)) return 'null';
  return JSON.stringify(value) ?? 'null';
}

/** Fields of `valid` replaced, removed or joined by hostile ones; nested levels too. */
function mutated(valid: Record<string, unknown>): fc.Arbitrary<Record<string, unknown>> {
  const keys = Object.keys(valid);
  return fc.record({
    replace: fc.dictionary(fc.constantFrom(...keys), hostileValue, { maxKeys: 3 }),
    extra: fc.dictionary(fc.oneof(pollutionKey, fc.string({ maxLength: 10 })), hostileValue, { maxKeys: 2 }),
    drop: fc.subarray(keys),
  }).map(({ replace, extra, drop }) => {
    const out: Record<string, unknown> = {};
    for (const k of keys) if (!drop.includes(k)) out[k] = valid[k];
    for (const [k, v] of Object.entries(replace)) out[k] = v;
    for (const [k, v] of Object.entries(extra)) Object.defineProperty(out, k, { value: v, enumerable: true, writable: true, configurable: true });
    return out;
  });
}

/** Bodies that are not JSON at all, or JSON that must be refused before any handler. */
const brokenJson = fc.oneof(
  fc.string({ maxLength: 60 }),
  fc.constantFrom('', '{', '}', '{"a":}', '{"name": "x",}', "{'name':'x'}", 'null', 'NaN', '[', '{"__proto__": {"isAdmin": true}}',
    '{"constructor": {"prototype": {"isAdmin": true}}}', '\u0000', '\ufeff{}', '{"a": 1e999999}', '{"a": "\\ud800"}', '{"a":1}{"b":2}'),
  fc.integer({ min: 1, max: 3 }).map((k) => '['.repeat(10 ** (k + 2)) + ']'.repeat(10 ** (k + 2))),
  fc.integer({ min: 1, max: 3 }).map((k) => '{"a":'.repeat(10 ** (k + 1)) + '1' + '}'.repeat(10 ** (k + 1))),
);

/**
 * A JSON text that the server's parser refuses, so that it can never reach a handler (that
 * parser, like RFC 8259 allows, skips a leading byte order mark).
 */
const unparseable = brokenJson.filter((s) => {
  try {
    JSON.parse(s.replace(/^\ufeff/, ''));
    return false;
  } catch {
    return true;
  }
});

const contentType = fc.oneof(
  fc.constant('application/json'),
  fc.constantFrom('application/json; charset=utf-8', 'application/json; charset=latin1', 'APPLICATION/JSON', 'text/plain', 'application/x-www-form-urlencoded',
    'multipart/form-data; boundary=x', 'application/json, text/plain', 'application/jsonx', ';', 'application/gzip', ''),
  fc.string({ maxLength: 30 }).filter((s) => /^[\x20-\x7e]*$/.test(s)),
);

// ---- the suite -------------------------------------------------------------------------------

describe('bad input at the API', () => {
  let s: TestServer;
  let port = 0;
  let ownerKey = '';
  let microvmId = '';
  let dataTree: Set<string>;
  let tmpBefore: Set<string>;
  let checked = 0;

  before(async () => {
    tmpBefore = new Set(fs.readdirSync(os.tmpdir()));
    s = await startTestServer({ dataDir: undefined });
    port = Number(new URL(s.url).port);
    const db = s.server.db;
    // Another tenant with a microVM row (never launched) to issue tokens for.
    const owner = await createTenant(db, { name: 'fuzz-owner' });
    ownerKey = (await createApiKey(db, owner.id, { name: 'fuzz' })).secret;
    const image = await readyImage(db, owner.id, { name: 'fuzz-image' });
    microvmId = (await createMicrovm(db, {
      tenantId: owner.id, region: 'local-1', imageId: image.id, maximumDurationSeconds: 3600,
      idlePolicy: { autoResumeEnabled: false, maxIdleDurationSeconds: 3600, suspendedDurationSeconds: null },
    })).microvm.id;
    dataTree = new Set(listTree(s.dataDir));
  });
  after(async () => {
    await s?.close();
  });

  async function counts(): Promise<Record<string, number>> {
    const out: Record<string, number> = {};
    for (const table of TABLES) out[table] = (await s.server.db.get<{ n: number }>(`SELECT count(*) AS n FROM ${table}`))!.n;
    return out;
  }

  /**
   * Sends one request and checks every property; `created` names the table a 2xx may add a row
   * to (then exactly one row), `allowed` the 2xx statuses that mean the input was valid.
   */
  async function check(label: string, bytes: Buffer, o: { allowed?: number[]; created?: (typeof TABLES)[number]; noAnswerOk?: boolean; halfClose?: boolean } = {}): Promise<Raw> {
    const before = await counts();
    const answer = await rawExchange(port, bytes, 5000, o.halfClose);
    const detail = `${label}: ${answer.status} ${answer.raw.slice(0, 300)}`;
    if (answer.status === 0) assert.ok(o.noAnswerOk, `${detail}: no answer`);
    else {
      assert.ok(answer.status < 500, `${detail}: a client mistake must not be a 5xx`);
      if (answer.status >= 400) {
        assert.ok(answer.status < 500, detail);
        assert.ok(isErrorShape(answer.body), `${detail}: not the one error shape`);
        assert.match(answer.headers['content-type'] ?? '', /^application\/json/, detail);
      } else {
        assert.ok((o.allowed ?? []).includes(answer.status), `${detail}: accepted`);
      }
    }
    const after = await counts();
    const expected = { ...before };
    if (answer.status >= 200 && answer.status < 300 && o.created) expected[o.created]! += 1;
    assert.deepEqual(after, expected, `${detail}: rows changed`);
    checked++;
    return answer;
  }

  const auth = (key = s.adminKey): [string, string] => ['Authorization', `Bearer ${key}`];
  const json = (body: unknown) => toJson(body);

  async function stillServes(): Promise<void> {
    const ok = await rawExchange(port, http1('GET', '/api/v1/images', [auth()]));
    assert.equal(ok.status, 200, ok.raw.slice(0, 300));
    assert.deepEqual(JSON.parse(ok.body), { items: [], nextCursor: null });
  }

  test('POST /images: mutated and hostile bodies are 4xx, never an image (nor a build)', async () => {
    const valid = { name: 'web', bundle: `cocoon://bundles/${'0'.repeat(64)}.tar.gz`, port: 8080, vcpus: 1, memoryMiB: 256, diskMiB: 1024,
      readiness: { httpPath: '/health', timeoutSeconds: 30 }, networkEgress: false, hooks: { run: { command: 'true' } } };
    await fc.assert(fc.asyncProperty(fc.oneof(mutated(valid).map(json), hostileValue.map(json), brokenJson), contentType, async (body, type) => {
      const a = await check(`POST /images ${type} ${body.slice(0, 120)}`, http1('POST', '/api/v1/images', [auth(), ['Content-Type', type]], body));
      assert.ok(a.status !== 202, 'no bundle exists: nothing can be built');
    }), { numRuns: RUNS * 2 });
    await stillServes();
  });

  test('POST /microvms: mutated and hostile bodies are 4xx, never a microVM', async () => {
    const valid = { image: 'img-00000000000000000000000000', idlePolicy: { autoResumeEnabled: true, maxIdleDurationSeconds: 60, suspendedDurationSeconds: null },
      maximumDurationSeconds: 600, clientToken: 'abc' };
    const nested = fc.record({ idlePolicy: mutated(valid.idlePolicy) }).map((p) => ({ ...valid, ...p }));
    await fc.assert(fc.asyncProperty(fc.oneof(mutated(valid).map(json), nested.map(json), hostileValue.map(json), brokenJson), contentType, async (body, type) => {
      await check(`POST /microvms ${type} ${body.slice(0, 120)}`, http1('POST', '/api/v1/microvms', [auth(), ['Content-Type', type]], body));
    }), { numRuns: RUNS * 2 });
    await stillServes();
  });

  test('POST /microvms/{id}/tokens: a token only for a valid body; anything else is a 4xx and no token', async () => {
    const valid = { expirationMinutes: 5, allowedPorts: [8080] };
    let issued = 0;
    await fc.assert(fc.asyncProperty(fc.oneof(mutated(valid).map(json), hostileValue.map(json), brokenJson), contentType, async (body, type) => {
      const a = await check(`POST tokens ${type} ${body.slice(0, 120)}`,
        http1('POST', `/api/v1/microvms/${microvmId}/tokens`, [auth(ownerKey), ['Content-Type', type]], body), { allowed: [201], created: 'tokens' });
      if (a.status === 201) {
        issued++;
        const sent = JSON.parse(body.replace(/^\ufeff/, '')) as { expirationMinutes?: unknown; allowedPorts?: unknown };
        const got = JSON.parse(a.body) as { allowedPorts: unknown };
        assert.deepEqual(got.allowedPorts, sent.allowedPorts ?? null, 'the token allows exactly the ports asked for');
      }
    }), { numRuns: RUNS * 2 });
    // The same bodies for another tenant's microVM, or none: 404 whatever the body.
    await fc.assert(fc.asyncProperty(fc.oneof(mutated(valid).map(json), brokenJson), async (body) => {
      const a = await check(`POST tokens (other tenant) ${body.slice(0, 120)}`,
        http1('POST', `/api/v1/microvms/${microvmId}/tokens`, [auth(), ['Content-Type', 'application/json']], body));
      assert.ok(a.status === 400 || a.status === 404, `${a.status}`);
    }), { numRuns: RUNS });
    assert.ok(issued >= 0);
    await stillServes();
  });

  test('suspend, resume, terminate: bodies the parser refuses, hostile ids; the microVM is untouched', async () => {
    const route = fc.constantFrom('suspend', 'resume', 'terminate');
    await fc.assert(fc.asyncProperty(route, unparseable, fc.constantFrom('application/json', 'application/json; charset=utf-8'), async (op, body, type) => {
      const [method, target] = op === 'terminate' ? ['DELETE', `/api/v1/microvms/${microvmId}`] : ['POST', `/api/v1/microvms/${microvmId}/${op}`];
      const a = await check(`${op} ${body.slice(0, 80)}`, http1(method, target, [auth(ownerKey), ['Content-Type', type]], body));
      assert.equal(a.status, 400);
    }), { numRuns: RUNS });
    const id = fc.oneof(hostileString.filter((x) => x.length < 2000), fc.constantFrom(`mvm-${'0'.repeat(26)}`, microvmId.toUpperCase(), `${microvmId}/`, `${microvmId}%00`));
    await fc.assert(fc.asyncProperty(route, id, fc.oneof(fc.constant(undefined), hostileValue.map(json)), async (op, raw, body) => {
      const enc = encodeURIComponent(raw.replace(/[\ud800-\udfff]/g, '?'));
      const [method, target] = op === 'terminate' ? ['DELETE', `/api/v1/microvms/${enc}`] : ['POST', `/api/v1/microvms/${enc}/${op}`];
      const headers: Array<[string, string]> = [auth(ownerKey)];
      if (body !== undefined) headers.push(['Content-Type', 'application/json']);
      const a = await check(`${op} ${target.slice(0, 120)}`, http1(method, target, headers, body));
      assert.ok(a.status >= 400, `${a.status}`);
    }), { numRuns: RUNS });
    const row = await s.server.db.get<{ state: string; terminated_at: string | null }>('SELECT state, terminated_at FROM microvms WHERE id = ?', [microvmId]);
    assert.equal(row?.terminated_at, null, 'the microVM was not terminated');
    await stillServes();
  });

  test('list endpoints: arbitrary query strings are 200 or 400, never more', async () => {
    const value = fc.oneof(hostileString.filter((x) => x.length < 3000), fc.integer().map(String), fc.constantFrom('RUNNING', 'READY', 'SUSPENDED', 'FAILED', '1', '0', '1000', '1001', '1e3', '-0', '0x1', ' 5', '5 '));
    const pair = fc.tuple(fc.constantFrom('limit', 'cursor', 'state', 'name', 'image', 'follow', '__proto__', 'constructor', 'state[]', 'limit[0]', ''), value);
    await fc.assert(fc.asyncProperty(fc.constantFrom('/api/v1/images', '/api/v1/microvms', '/api/v1/tenants', '/api/v1/api-keys'), fc.array(pair, { maxLength: 6 }), async (route, pairs) => {
      const query = pairs.map(([k, v]) => `${encodeURIComponent(k)}=${encodeURIComponent(v.replace(/[\ud800-\udfff]/g, '?'))}`).join('&');
      const a = await check(`GET ${route}?${query.slice(0, 200)}`, http1('GET', `${route}?${query}`, [auth()]), { allowed: [200] });
      assert.ok(a.status === 200 || a.status === 400 || a.status === 404, `${a.status}`);
    }), { numRuns: RUNS * 2 });
    // Cursors: made-up ones, and real ones with a byte changed.
    await fc.assert(fc.asyncProperty(fc.oneof(fc.base64String({ maxLength: 80 }), fc.string({ maxLength: 80 }), fc.constant(Buffer.from('tnt-00000000000000000000000000').toString('base64url'))), async (cursor) => {
      const a = await check(`cursor ${cursor}`, http1('GET', `/api/v1/microvms?cursor=${encodeURIComponent(cursor)}`, [auth()]), { allowed: [200] });
      assert.ok(a.status === 200 || a.status === 400);
    }), { numRuns: RUNS });
    await stillServes();
  });

  test('headers: Authorization shapes, content types and long values are 4xx; no key is ever guessed', async () => {
    const authValue = fc.oneof(
      fc.string({ maxLength: 60 }).filter((x) => /^[\x20-\x7e]*$/.test(x)),
      fc.constantFrom('Bearer', 'Bearer ', 'bearer x', 'Basic YWRtaW46YWRtaW4=', `Bearer ${'a'.repeat(201)}`, 'Bearer\tx', 'Bearer  x', 'Bearer x y', 'Bearer cocoon_ak_', 'Token x'),
      fc.constant(null).map(() => `Bearer ${s.adminKey.slice(0, -1)}${s.adminKey.endsWith('a') ? 'b' : 'a'}`),
      fc.constant(null).map(() => `Bearer  ${s.adminKey}`),
      fc.constant(null).map(() => `Bearer ${s.adminKey}\u0000`),
      fc.constant(null).map(() => `Bearer ${s.adminKey.toUpperCase()}`),
      fc.nat({ max: 2 }).map((k) => `Bearer ${'x'.repeat([1000, 8000, 15000][k]!)}`),
    );
    await fc.assert(fc.asyncProperty(authValue, fc.constantFrom('GET /api/v1/images', 'GET /api/v1/microvms', 'POST /api/v1/microvms', 'GET /api/v1/tenants'), async (value, line) => {
      const [method, target] = line.split(' ') as [string, string];
      const a = await check(`${line} Authorization: ${value.slice(0, 60)}`, http1(method, target, [['Authorization', value], ['Content-Type', 'application/json']], method === 'POST' ? '{}' : undefined));
      assert.ok(a.status === 401 || a.status === 431 || a.status === 400, `${a.status}`);
    }), { numRuns: RUNS });
    // Two Authorization headers, one of them good: refused, not "the first/last wins".
    const twice = await check('two Authorization headers', http1('GET', '/api/v1/images', [['Authorization', 'Bearer nope'], auth()]));
    assert.ok(twice.status === 401 || twice.status === 400, `${twice.status}`);
    // Very long header values of any name.
    await fc.assert(fc.asyncProperty(fc.constantFrom('X-Long', 'Cookie', 'User-Agent', 'Accept', 'Content-Type'), fc.integer({ min: 4000, max: 40_000 }), async (name, n) => {
      await check(`${name} × ${n}`, http1('POST', '/api/v1/microvms', [auth(), [name, 'x'.repeat(n)], ...(name === 'Content-Type' ? [] : [['Content-Type', 'application/json'] as [string, string]])], '{}'));
    }), { numRuns: 10 });
    await stillServes();
  });

  test('path parameters: traversal, encoded NUL, very long ids are 4xx and create nothing', async () => {
    const id = fc.oneof(
      fc.constantFrom(`..%2f..%2f${MARK}`, `..%2F..%2F..%2Ftmp%2F${MARK}`, `%2e%2e%2f${MARK}`, `..%5c${MARK}`, `${MARK}%00`, '%00', '%', '%zz', '%c0%ae%c0%ae%2f', '..', '.', '%2e', '~', 'a%2fb',
        `arn%3Acocoon%3Alocal-1%3A000000000000%3Amicrovm-image%2F..%2F${MARK}%3A1`),
      fc.integer({ min: 250, max: 5000 }).map((n) => `${MARK}${'a'.repeat(n)}`),
      fc.string({ maxLength: 30 }).map((x) => encodeURIComponent(x.replace(/[\ud800-\udfff]/g, '?'))),
    );
    const route = fc.constantFrom(
      'GET /api/v1/images/:id', 'GET /api/v1/images/:id/logs', 'DELETE /api/v1/images/:id', 'GET /api/v1/microvms/:id', 'GET /api/v1/microvms/:id/logs',
      'POST /api/v1/microvms/:id/tokens', 'GET /api/v1/microvms/:id/tokens', 'DELETE /api/v1/microvms/:id/tokens/:id', 'GET /dashboard/:id', 'GET /sdk/:id',
      'DELETE /api/v1/api-keys/:id', 'POST /api/v1/tenants/:id/api-keys',
    );
    await fc.assert(fc.asyncProperty(route, id, async (r, raw) => {
      const [method, pattern] = r.split(' ') as [string, string];
      const target = pattern.replaceAll(':id', raw);
      const body = method === 'POST' ? '{}' : undefined;
      const a = await check(`${method} ${target.slice(0, 200)}`, http1(method, target, [auth(), ...(body ? [['Content-Type', 'application/json'] as [string, string]] : [])], body));
      assert.ok(a.status >= 400, `${a.status}`);
    }), { numRuns: RUNS * 2 });
    await stillServes();
  });

  test('raw bytes: broken request lines and headers, content-length mismatches, NUL and CR in values', async () => {
    const key = s.adminKey;
    const cases: Array<[string, string | Buffer, { noAnswerOk?: boolean; halfClose?: boolean }?]> = [
      ['no Host', `GET /api/v1/images HTTP/1.1\r\nAuthorization: Bearer ${key}\r\nConnection: close\r\n\r\n`],
      ['two Content-Length', `POST /api/v1/microvms HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${key}\r\nContent-Type: application/json\r\nContent-Length: 2\r\nContent-Length: 3\r\nConnection: close\r\n\r\n{}`],
      ['CL and TE', `POST /api/v1/microvms HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${key}\r\nContent-Type: application/json\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n2\r\n{}\r\n0\r\n\r\n`],
      ['CL shorter than body', `POST /api/v1/microvms HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${key}\r\nContent-Type: application/json\r\nContent-Length: 1\r\nConnection: close\r\n\r\n{"image":"x"}`],
      ['CL longer than body', `POST /api/v1/microvms HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${key}\r\nContent-Type: application/json\r\nContent-Length: 50\r\nConnection: close\r\n\r\n{}`, { noAnswerOk: true, halfClose: true }],
      ['negative CL', `POST /api/v1/microvms HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${key}\r\nContent-Type: application/json\r\nContent-Length: -1\r\nConnection: close\r\n\r\n{}`],
      ['huge CL', `POST /api/v1/microvms HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${key}\r\nContent-Type: application/json\r\nContent-Length: 99999999999999999999\r\nConnection: close\r\n\r\n{}`],
      ['CL over the body limit', `POST /api/v1/microvms HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${key}\r\nContent-Type: application/json\r\nContent-Length: 5000000\r\nConnection: close\r\n\r\n{}`],
      ['bad chunk size', `POST /api/v1/microvms HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${key}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\nzz\r\n{}\r\n0\r\n\r\n`],
      ['xchunked', `POST /api/v1/microvms HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${key}\r\nContent-Type: application/json\r\nTransfer-Encoding: xchunked\r\nConnection: close\r\n\r\n2\r\n{}\r\n0\r\n\r\n`],
      ['NUL in a header value', Buffer.from(`GET /api/v1/images HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${key}\r\nX-A: a\u0000b\r\nConnection: close\r\n\r\n`, 'latin1')],
      ['CR in a header value', `GET /api/v1/images HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${key}\r\nX-A: a\rb\r\nConnection: close\r\n\r\n`],
      ['obs-fold', `GET /api/v1/images HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer\r\n ${key}\r\nConnection: close\r\n\r\n`],
      ['space before colon', `GET /api/v1/images HTTP/1.1\r\nHost: x\r\nAuthorization : Bearer ${key}\r\nConnection: close\r\n\r\n`],
      ['garbage', '\u0016\u0003\u0001\u0002\u0000\u0001\u0000\u01fc\u0003\u0003 not http\r\n\r\n'],
      ['HTTP/0.9', 'GET /api/v1/images\r\n\r\n', { noAnswerOk: true, halfClose: true }],
      ['HTTP/2 preface', 'PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n'],
      ['bad method', `G@T /api/v1/images HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`],
      ['bad percent-encoding in the path', `GET /api/v1/images/%zz HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${key}\r\nConnection: close\r\n\r\n`],
      ['raw UTF-8 in the path', Buffer.from(`GET /api/v1/images/\u00e9\u{1f600} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${key}\r\nConnection: close\r\n\r\n`, 'utf8')],
      ['a 12 KiB path', `GET /api/v1/microvms/${'a'.repeat(12_000)} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${key}\r\nConnection: close\r\n\r\n`],
      ['a 20 KiB header block', `GET /api/v1/images HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${key}\r\n${Array.from({ length: 400 }, (_, i) => `X-H${i}: ${'v'.repeat(50)}`).join('\r\n')}\r\nConnection: close\r\n\r\n`],
      ['a bundle upload with a JSON body', `POST /api/v1/bundles HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${key}\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}`],
      ['a bundle upload that is not a bundle', `POST /api/v1/bundles HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${key}\r\nContent-Type: application/gzip\r\nContent-Length: 13\r\nConnection: close\r\n\r\nFROM busybox\n`],
      ['a pipelined second request after a refused one', `POST /api/v1/microvms HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${key}\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}POST /api/v1/tenants HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 15\r\nConnection: close\r\n\r\n{"name":"evil"}`],
    ];
    for (const [name, bytes, o] of cases) {
      const a = await check(name, Buffer.isBuffer(bytes) ? bytes : Buffer.from(bytes, 'latin1'), o);
      assert.ok(a.status === 0 || a.status >= 400, `${name}: ${a.status}`);
    }
    // The absolute form is valid HTTP/1.1 (RFC 9112 §3.2.2): routed by its path, with the same key check.
    const absolute = await check('absolute-form with a key', Buffer.from(`GET http://evil.example/api/v1/images HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${key}\r\nConnection: close\r\n\r\n`), { allowed: [200] });
    assert.equal(absolute.status, 200);
    const absoluteNoKey = await check('absolute-form without a key', Buffer.from('GET http://127.0.0.1/api/v1/images HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n'));
    assert.equal(absoluteNoKey.status, 401);
    await stillServes();
  });

  test('DNS rebinding: auth is a header only; a foreign Host or a cookie without a key gets 401 and nothing else', async () => {
    for (const host of ['evil.example', 'attacker.test:80', '127.0.0.1.nip.io', `localhost.${MARK}.com`]) {
      for (const [method, target, body] of [['GET', '/api/v1/images', undefined], ['GET', '/api/v1/tenants', undefined], ['POST', '/api/v1/tenants', '{"name":"rebound"}'],
        ['POST', '/api/v1/microvms', '{"image":"x"}'], ['GET', '/api/v1/microvms/x/logs', undefined]] as const) {
        const headers = [`${method} ${target} HTTP/1.1`, `Host: ${host}`, 'Origin: http://' + host, 'Cookie: session=1; apiKey=' + s.adminKey + '; cocoon_token=x',
          'Connection: close'];
        if (body) headers.push('Content-Type: application/json', `Content-Length: ${body.length}`);
        const a = await check(`${method} ${target} Host ${host}`, Buffer.from(headers.join('\r\n') + '\r\n\r\n' + (body ?? ''), 'latin1'));
        assert.equal(a.status, 401, `${method} ${target} Host ${host}: ${a.raw.slice(0, 200)}`);
        assert.equal(JSON.parse(a.body).error.code, 'unauthenticated');
        assert.equal(a.headers['set-cookie'], undefined, 'no cookie is ever set');
        assert.equal(a.headers['access-control-allow-origin'], undefined, 'no CORS grant');
        assert.equal(a.headers['access-control-allow-credentials'], undefined);
      }
    }
    // The public routes answer a foreign Host, but with nothing a key would protect.
    for (const target of ['/api/v1/info', '/api/v1/health', '/api/v1/openapi.json']) {
      const a = await rawExchange(port, Buffer.from(`GET ${target} HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n`));
      assert.ok(a.status === 200 || a.status === 503, `${target}: ${a.status}`);
      assert.ok(!a.body.includes(s.adminKey) && !a.body.includes(microvmId) && !a.body.includes('fuzz-owner'), `${target} tells nothing of the tenants`);
    }
    // A CORS preflight grants nothing either.
    const preflight = await rawExchange(port, Buffer.from('OPTIONS /api/v1/tenants HTTP/1.1\r\nHost: evil.example\r\nOrigin: http://evil.example\r\nAccess-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: authorization\r\nConnection: close\r\n\r\n'));
    assert.ok(preflight.status >= 400 && preflight.status < 500, preflight.raw.slice(0, 200));
    assert.equal(preflight.headers['access-control-allow-origin'], undefined);
    // The dashboard page asks for the key; it sets no cookie and is not frameable.
    const page = await rawExchange(port, Buffer.from('GET / HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n'));
    assert.equal(page.status, 200);
    assert.equal(page.headers['set-cookie'], undefined);
    assert.match(page.headers['content-security-policy'] ?? '', /frame-ancestors 'none'/);
    await stillServes();
  });

  test('afterwards: nothing outside the data directory, nothing new inside it, and the server answers', async () => {
    assert.ok(checked > 500, `${checked} requests checked`);
    // (The bundle upload's working directory may appear, empty.)
    const added = listTree(s.dataDir).filter((p) => !dataTree.has(p) && !/\.db-(wal|shm|journal)$/.test(p) && !fs.statSync(path.join(s.dataDir, p)).isDirectory());
    assert.deepEqual(added, [], 'no new file in the data directory');
    const newInTmp = fs.readdirSync(os.tmpdir()).filter((n) => !tmpBefore.has(n) && n.includes(MARK));
    assert.deepEqual(newInTmp, []);
    const marked = [...listTree(os.tmpdir(), 2), ...listTree(path.resolve('.'), 1)].filter((p) => p.includes(MARK));
    assert.deepEqual(marked, [], 'no file named by a request exists');
    await stillServes();
  });
});


