/**
 * The OpenAPI document: valid OpenAPI 3.1, and a faithful list of the API — every route the
 * server registers (seen through Fastify's onRoute hook) is in it with its parameters and
 * bodies, every error answer has the one error shape, top-level lists are paginated. Runs on
 * the server with every default module, so the routes of merged modules are checked too.
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { Validator } from '@seriousme/openapi-schema-validator';
import { startTestServer, type TestServer } from './helpers.ts';

type Json = any;

let server: TestServer;
let doc: Json;

before(async () => {
  server = await startTestServer();
  const response = await fetch(`${server.url}/api/v1/openapi.json`);
  assert.equal(response.status, 200);
  assert.match(response.headers.get('content-type') ?? '', /application\/json/);
  doc = await response.json();
});
after(async () => {
  await server?.close();
});

/** Fastify's `/images/:id` is OpenAPI's `/images/{id}`. */
function openapiPath(url: string): string {
  return url.replace(/:([A-Za-z0-9_]+)/g, '{$1}');
}

function resolve(ref: string): Json {
  assert.ok(ref.startsWith('#/'), `only local refs: ${ref}`);
  let node: Json = doc;
  for (const part of ref.slice(2).split('/')) {
    node = node?.[part.replace(/~1/g, '/').replace(/~0/g, '~')];
    assert.ok(node !== undefined, `$ref ${ref} resolves`);
  }
  return node;
}

function deref(schema: Json): Json {
  return schema?.$ref ? deref(resolve(schema.$ref)) : schema;
}

function operations(): Array<{ path: string; method: string; op: Json }> {
  const out: Array<{ path: string; method: string; op: Json }> = [];
  for (const [path, item] of Object.entries<Json>(doc.paths)) {
    for (const method of ['get', 'put', 'post', 'delete', 'patch', 'head', 'options']) {
      if (item[method]) out.push({ path, method, op: item[method] });
    }
  }
  return out;
}

describe('OpenAPI document', () => {
  it('is a valid OpenAPI 3.1 document', async () => {
    assert.equal(doc.openapi, '3.1.0');
    const validator = new Validator();
    const result = await validator.validate(structuredClone(doc));
    assert.equal(result.valid, true, JSON.stringify(result.errors, null, 2));
    assert.equal(validator.version, '3.1');
  });

  it('has every $ref resolvable', () => {
    const walk = (node: Json) => {
      if (Array.isArray(node)) node.forEach(walk);
      else if (node && typeof node === 'object') {
        if (typeof node.$ref === 'string') resolve(node.$ref);
        for (const value of Object.values(node)) walk(value);
      }
    };
    walk(doc);
  });

  it('lists every route the server registers, and nothing it does not', () => {
    const apiRoutes = server.routes.filter((r) => r.url.startsWith('/api/v1/') && r.method !== 'HEAD');
    assert.ok(apiRoutes.length >= 7, `found ${apiRoutes.length} API routes`);
    const missing: string[] = [];
    for (const route of apiRoutes) {
      const item = doc.paths[openapiPath(route.url)];
      if (!item?.[route.method.toLowerCase()]) missing.push(`${route.method} ${route.url}`);
    }
    assert.deepEqual(missing, [], 'every /api/v1 route is in the OpenAPI document');
    const registered = new Set(apiRoutes.map((r) => `${r.method.toLowerCase()} ${openapiPath(r.url)}`));
    const extra = operations().map((o) => `${o.method} ${o.path}`).filter((o) => !registered.has(o));
    assert.deepEqual(extra, [], 'the document names no route the server lacks');
    // Routes outside the API are the dashboard's public assets, hidden from the document, and
    // compatibility surfaces (E2B under /e2b; AWS Lambda MicroVMs under its model's dated
    // prefixes) with their own auth and their own documents.
    const compat = (url: string) => url.startsWith('/e2b/') || url.startsWith('/2025-09-09/') || url.startsWith('/2017-03-31/');
    const outside = server.routes.filter((r) => !r.url.startsWith('/api/v1/') && !compat(r.url) && r.method !== 'HEAD');
    for (const route of server.routes.filter((r) => compat(r.url))) {
      assert.ok(route.hidden, `${route.method} ${route.url} (compatibility surface) is not in Cocoon's own document`);
    }
    for (const route of outside) {
      assert.ok(route.hidden && route.public, `${route.method} ${route.url} is a hidden public asset route`);
    }
    assert.deepEqual(outside.map((r) => r.url).sort(), ['/', '/dashboard/:file', '/sdk/:file', '/vendor/:file']);
  });

  it('describes each operation: summary, path parameters, request bodies, security', () => {
    for (const { path, method, op } of operations()) {
      const name = `${method.toUpperCase()} ${path}`;
      assert.ok(typeof op.summary === 'string' && op.summary.length > 5, `${name} has a summary`);
      for (const param of path.match(/\{[^}]+\}/g) ?? []) {
        const declared = (op.parameters ?? []).find((p: Json) => p.in === 'path' && `{${p.name}}` === param);
        assert.ok(declared?.schema, `${name} declares path parameter ${param} with a schema`);
      }
      if ((method === 'post' || method === 'put' || method === 'patch') && !path.endsWith('/suspend') && !path.endsWith('/resume')) {
        assert.ok(op.requestBody?.content, `${name} declares its request body`);
      }
      const isPublic = Array.isArray(op.security) && op.security.length === 0;
      if (!isPublic) assert.ok(op.responses['401'], `${name} (authenticated) documents 401`);
      const successes = Object.keys(op.responses).filter((s) => /^2|^101$/.test(s)); // 101: a WebSocket upgrade
      assert.ok(successes.length > 0, `${name} documents its success answer`);
    }
    assert.deepEqual(doc.security, [{ apiKey: [] }], 'bearer API key by default');
    assert.equal(doc.components.securitySchemes.apiKey.scheme, 'bearer');
  });

  it('gives every error answer the one error shape', () => {
    let count = 0;
    for (const { path, method, op } of operations()) {
      for (const [status, response] of Object.entries<Json>(op.responses)) {
        if (!/^[45]/.test(status)) continue;
        // The health probe's 503 is a status report ({"status": "starting"}), not an error.
        if (path === '/api/v1/health') continue;
        const schema = deref(deref(response).content?.['application/json']?.schema);
        const name = `${method.toUpperCase()} ${path} ${status}`;
        assert.ok(schema, `${name} has a JSON body`);
        assert.deepEqual(schema.required, ['error'], name);
        const error = deref(schema.properties.error);
        assert.deepEqual([...error.required].sort(), ['code', 'message'], name);
        assert.equal(error.properties.code.type, 'string', name);
        count++;
      }
    }
    assert.ok(count > 10, `checked ${count} error answers`);
  });

  it('paginates the top-level lists (limit, cursor → nextCursor)', () => {
    const lists = operations().filter(({ path, method, op }) => {
      if (method !== 'get' || path.includes('{')) return false;
      const schema = deref(op.responses['200']?.content?.['application/json']?.schema);
      return Boolean(schema?.properties?.items);
    });
    const paths = lists.map((l) => l.path);
    for (const expected of ['/api/v1/tenants', '/api/v1/api-keys']) assert.ok(paths.includes(expected), `${expected} is a list`);
    if (server.has('GET', '/api/v1/images')) assert.ok(paths.includes('/api/v1/images'));
    if (server.has('GET', '/api/v1/microvms')) assert.ok(paths.includes('/api/v1/microvms'));
    for (const { path, op } of lists) {
      const params = (op.parameters ?? []).filter((p: Json) => p.in === 'query').map((p: Json) => p.name);
      assert.ok(params.includes('limit') && params.includes('cursor'), `${path} takes limit and cursor`);
      const schema = deref(op.responses['200'].content['application/json'].schema);
      assert.ok(schema.properties.nextCursor, `${path} answers nextCursor`);
    }
  });

  it('validates requests against the same schemas (400 invalid_request with the error shape)', async () => {
    const call = (method: string, path: string, body?: unknown) =>
      fetch(`${server.url}/api/v1${path}`, {
        method,
        headers: { authorization: `Bearer ${server.adminKey}`, ...(body !== undefined ? { 'content-type': 'application/json' } : {}) },
        ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
      });
    const cases: Array<[string, string, unknown]> = [
      ['POST', '/tenants', { name: 'Not Valid!' }],
      ['POST', '/tenants', { name: 'ok', extra: 1 }],
      ['POST', '/tenants', {}],
      ['GET', '/tenants?limit=0', undefined],
      ['GET', '/api-keys?limit=abc', undefined],
      ['POST', '/api-keys', { name: '' }],
    ];
    if (server.has('POST', '/api/v1/images')) cases.push(['POST', '/images', { name: 'x', bundle: 'cocoon://bundles/x', vcpus: 99 }]);
    if (server.has('POST', '/api/v1/microvms')) cases.push(['POST', '/microvms', { image: 'x', maximumDurationSeconds: 999_999 }]);
    for (const [method, path, body] of cases) {
      const response = await call(method, path, body);
      const answer: Json = await response.json();
      assert.equal(response.status, 400, `${method} ${path} ${JSON.stringify(body)}`);
      assert.equal(answer.error.code, 'invalid_request');
      assert.equal(typeof answer.error.message, 'string');
    }
    const malformed = await fetch(`${server.url}/api/v1/tenants`, {
      method: 'POST',
      headers: { authorization: `Bearer ${server.adminKey}`, 'content-type': 'application/json' },
      body: '{"name": ',
    });
    assert.equal(malformed.status, 400);
    assert.equal(((await malformed.json()) as Json).error.code, 'invalid_request');
    const unknown = await fetch(`${server.url}/api/v1/nope`, { headers: { authorization: `Bearer ${server.adminKey}` } });
    assert.equal(unknown.status, 404);
    assert.equal(((await unknown.json()) as Json).error.code, 'not_found');
  });
});
