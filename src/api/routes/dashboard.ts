/**
 * The web dashboard, served by the API server: `GET /` is its page, `/dashboard/*` its assets
 * (plain ES modules and CSS, no build step), `/sdk/*` the TypeScript SDK's modules with their
 * types stripped (Node's own `stripTypeScriptTypes`), so the dashboard uses the same SDK as the
 * CLI. Everything here is public: the API key is typed in by the user and kept in the
 * browser's sessionStorage; the API checks it on every call.
 *
 * Files are read once, at start-up, and answered from memory.
 */
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import { createRequire, stripTypeScriptTypes } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { Type, type Static } from 'typebox';
import type { ApiContext } from '../app.ts';
import { errorBody } from '../errors.ts';

const here = path.dirname(fileURLToPath(import.meta.url));
export const DASHBOARD_DIR = path.resolve(here, '../../dashboard');
export const SDK_DIR = path.resolve(here, '../../../packages/sdk/src');

/**
 * Third-party browser modules the dashboard loads, served from node_modules by this server
 * (never from a CDN): the terminal (xterm.js) and its fit addon. Name → file in a package.
 */
const require = createRequire(import.meta.url);
export const VENDOR_FILES: Record<string, { pkg: string; file: string }> = {
  'xterm.mjs': { pkg: '@xterm/xterm', file: 'lib/xterm.mjs' },
  'xterm.css': { pkg: '@xterm/xterm', file: 'css/xterm.css' },
  'addon-fit.mjs': { pkg: '@xterm/addon-fit', file: 'lib/addon-fit.mjs' },
};

function loadVendor(): Map<string, Asset> {
  const out = new Map<string, Asset>();
  for (const [name, { pkg, file }] of Object.entries(VENDOR_FILES)) {
    const root = path.dirname(require.resolve(`${pkg}/package.json`));
    // The source map comment points at a file not served; browsers only fetch it with devtools open.
    const text = fs.readFileSync(path.join(root, file), 'utf8').replace(/\n\/\/# sourceMappingURL=\S+\s*$/, '\n');
    out.set(name, asset(text, name));
  }
  return out;
}

/** Node-only SDK modules the browser never loads. */
const NODE_ONLY = new Set(['node-source.ts']);

const TYPES: Record<string, string> = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.mjs': 'text/javascript; charset=utf-8',
  '.ts': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.svg': 'image/svg+xml',
};

/**
 * No inline script, nothing from elsewhere; the API (and its exec WebSocket) is same-origin.
 * Inline styles are allowed: the terminal (xterm.js) writes its theme and cell metrics into
 * <style> elements it creates; every text the dashboard shows goes in with textContent, so no
 * markup (and no style) comes from data.
 */
export const DASHBOARD_CSP = [
  "default-src 'self'",
  "script-src 'self'",
  "style-src 'self' 'unsafe-inline'",
  "img-src 'self' data:",
  "connect-src 'self'",
  "form-action 'self'",
  "base-uri 'none'",
  "frame-ancestors 'none'",
  "object-src 'none'",
].join('; ');

interface Asset {
  body: Buffer;
  type: string;
  etag: string;
}

function asset(body: Buffer | string, file: string): Asset {
  const bytes = typeof body === 'string' ? Buffer.from(body) : body;
  return { body: bytes, type: TYPES[path.extname(file)] ?? 'application/octet-stream', etag: `"${createHash('sha256').update(bytes).digest('base64url').slice(0, 22)}"` };
}

function loadDir(dir: string, accept: (name: string) => boolean, transform: (text: Buffer, name: string) => Buffer | string = (b) => b): Map<string, Asset> {
  const out = new Map<string, Asset>();
  for (const name of fs.readdirSync(dir).sort()) {
    if (!accept(name) || !fs.statSync(path.join(dir, name)).isFile()) continue;
    out.set(name, asset(transform(fs.readFileSync(path.join(dir, name)), name), name));
  }
  return out;
}

function send(request: FastifyRequest, reply: FastifyReply, file: Asset | undefined) {
  if (!file) return reply.status(404).send(errorBody('not_found', `no file ${request.url.split('?')[0]}`));
  reply
    .header('content-type', file.type)
    .header('etag', file.etag)
    .header('cache-control', 'no-cache')
    .header('x-content-type-options', 'nosniff')
    .header('referrer-policy', 'no-referrer');
  if (file.type.startsWith('text/html')) reply.header('content-security-policy', DASHBOARD_CSP).header('x-frame-options', 'DENY');
  if (request.headers['if-none-match'] === file.etag) return reply.status(304).send();
  return reply.send(file.body);
}

const FileParams = Type.Object({ file: Type.String({ pattern: '^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$' }) });

export function dashboardRoutes(app: FastifyInstance, _context: ApiContext): void {
  const assets = loadDir(DASHBOARD_DIR, (name) => /\.(html|js|css|svg)$/.test(name));
  const sdk = loadDir(SDK_DIR, (name) => name.endsWith('.ts') && !NODE_ONLY.has(name), (text, name) =>
    `${stripTypeScriptTypes(text.toString('utf8'), { mode: 'strip', sourceUrl: `sdk/${name}` })}`);
  const vendor = loadVendor();
  const page = assets.get('index.html');
  const common = { config: { public: true }, schema: { hide: true } } as const;

  app.get('/', common, async (request, reply) => send(request, reply, page));
  app.get<{ Params: Static<typeof FileParams> }>(
    '/dashboard/:file',
    { ...common, schema: { hide: true, params: FileParams } },
    async (request, reply) => send(request, reply, request.params.file === 'index.html' ? page : assets.get(request.params.file)),
  );
  app.get<{ Params: Static<typeof FileParams> }>(
    '/vendor/:file',
    { ...common, schema: { hide: true, params: FileParams } },
    async (request, reply) => send(request, reply, vendor.get(request.params.file)),
  );
  app.get<{ Params: Static<typeof FileParams> }>(
    '/sdk/:file',
    { ...common, schema: { hide: true, params: FileParams } },
    async (request, reply) => send(request, reply, sdk.get(request.params.file)),
  );
}
