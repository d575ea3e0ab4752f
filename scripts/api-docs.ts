/**
 * Regenerates the reference part of docs/api.md from the OpenAPI document of a server with
 * every default module (started on ephemeral ports in a temporary data directory):
 *
 *   node_modules/.bin/node scripts/api-docs.ts          # rewrite docs/api.md
 *   node_modules/.bin/node scripts/api-docs.ts --check  # exit 1 if docs/api.md is stale
 *
 * Only the text between the GENERATED markers is replaced; the rest is written by hand.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { defaultModules } from '../src/modules.ts';
import { startServer } from '../src/server.ts';

type Json = any;

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const target = path.join(root, 'docs/api.md');
export const BEGIN = '<!-- BEGIN GENERATED: node scripts/api-docs.ts -->';
export const END = '<!-- END GENERATED -->';

function deref(doc: Json, schema: Json): Json {
  if (!schema?.$ref) return schema;
  return deref(doc, schema.$ref.slice(2).split('/').reduce((node: Json, key: string) => node?.[key], doc));
}

function typeOf(doc: Json, schema: Json): string {
  const s = deref(doc, schema);
  if (!s) return '';
  if (s.anyOf) return s.anyOf.map((x: Json) => typeOf(doc, x)).join(' | ');
  if (s.const !== undefined) return JSON.stringify(s.const);
  if (s.enum) return s.enum.map((v: unknown) => JSON.stringify(v)).join(' | ');
  if (s.type === 'array') return `${typeOf(doc, s.items)}[]`;
  if (s.type === 'object' && s.title) return s.title;
  let text = Array.isArray(s.type) ? s.type.join(' | ') : s.type ?? 'any';
  const bounds = [];
  if (s.minimum !== undefined) bounds.push(`≥ ${s.minimum}`);
  if (s.maximum !== undefined) bounds.push(`≤ ${s.maximum}`);
  if (s.maxLength !== undefined) bounds.push(`≤ ${s.maxLength} chars`);
  if (s.format) text += ` (${s.format})`;
  if (bounds.length) text += ` ${bounds.join(', ')}`;
  return text;
}

function cell(text: unknown): string {
  return String(text ?? '').replace(/\|/g, '\\|').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/\n/g, ' ');
}

/** Rows for an object schema's fields, nested objects flattened as `a.b`. */
function fieldRows(doc: Json, schema: Json, prefix = '', depth = 0): string[] {
  const s = deref(doc, schema);
  if (!s?.properties || depth > 2) return [];
  const required = new Set<string>(s.required ?? []);
  const rows: string[] = [];
  for (const [name, value] of Object.entries<Json>(s.properties)) {
    const field = deref(doc, value);
    rows.push(`| \`${prefix}${name}\` | ${cell(typeOf(doc, field))} | ${required.has(name) ? 'yes' : ''} | ${cell(field?.description)} |`);
    const inner = field?.anyOf ? field.anyOf.map((x: Json) => deref(doc, x)).find((x: Json) => x?.properties) : field;
    if (inner?.type === 'object' && inner.properties) rows.push(...fieldRows(doc, inner, `${prefix}${name}.`, depth + 1));
  }
  return rows;
}

export function renderReference(doc: Json): string {
  const out: string[] = [BEGIN, '', '## Reference', ''];
  const operations: Array<{ method: string; path: string; op: Json }> = [];
  for (const [p, item] of Object.entries<Json>(doc.paths)) {
    for (const method of ['get', 'post', 'put', 'patch', 'delete']) if (item[method]) operations.push({ method, path: p, op: item[method] });
  }
  out.push('| call | what | auth |', '| --- | --- | --- |');
  for (const { method, path: p, op } of operations) {
    const anchor = `${method}-${p}`.toLowerCase().replace(/[^a-z0-9]+/g, '-').replace(/^-|-$/g, '');
    const auth = Array.isArray(op.security) && op.security.length === 0 ? 'none' : 'API key';
    out.push(`| [\`${method.toUpperCase()} ${p}\`](#${anchor}) | ${cell(op.summary)} | ${auth} |`);
  }
  out.push('');
  for (const { method, path: p, op } of operations) {
    out.push(`### ${method.toUpperCase()} ${p}`, '', op.summary ?? '', '');
    const params = (op.parameters ?? []) as Json[];
    if (params.length) {
      out.push('| parameter | in | type | required | description |', '| --- | --- | --- | --- | --- |');
      for (const param of params) {
        out.push(`| \`${param.name}\` | ${param.in} | ${cell(typeOf(doc, param.schema))} | ${param.required ? 'yes' : ''} | ${cell(param.description ?? param.schema?.description)} |`);
      }
      out.push('');
    }
    const content = op.requestBody?.content ?? {};
    const types = Object.keys(content);
    if (types.includes('application/json')) {
      const rows = fieldRows(doc, content['application/json'].schema);
      out.push('Body (`application/json`):', '');
      if (rows.length) out.push('| field | type | required | description |', '| --- | --- | --- | --- |', ...rows, '');
    } else if (types.length) {
      out.push(`Body: raw bytes as ${types.map((t) => `\`${t}\``).join(', ')}.`, '');
    }
    const answers: string[] = [];
    for (const [status, response] of Object.entries<Json>(op.responses ?? {})) {
      const r = deref(doc, response);
      const kinds = Object.keys(r.content ?? {});
      const schema = deref(doc, r.content?.['application/json']?.schema);
      const isError = schema?.properties?.error;
      answers.push(`\`${status}\`${isError ? ' error' : kinds.includes('text/plain') ? ' text' : schema?.title ? ` ${schema.title}` : ''}`);
    }
    out.push(`Answers: ${answers.join(', ')}.`, '');
    const ok = Object.entries<Json>(op.responses ?? {}).find(([s]) => /^2/.test(s));
    const okSchema = ok && deref(doc, deref(doc, ok[1]).content?.['application/json']?.schema);
    const rows = okSchema ? fieldRows(doc, okSchema.allOf ? { properties: Object.assign({}, ...okSchema.allOf.map((x: Json) => deref(doc, x).properties)) } : okSchema) : [];
    if (rows.length && rows.length <= 40) {
      out.push('<details><summary>Answer fields</summary>', '', '| field | type | required | description |', '| --- | --- | --- | --- |', ...rows, '', '</details>', '');
    }
  }
  out.push(END);
  return out.join('\n');
}

export async function currentDocument(): Promise<Json> {
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'cocoon-apidocs-'));
  try {
    const server = await startServer(
      { dataDir, host: '127.0.0.1', apiPort: 0, gatewayPort: 0, gatewayDomain: 'vm.localhost', region: 'local-1', accel: 'tcg' },
      defaultModules(),
    );
    try {
      return await (await fetch(`${server.apiUrl}/api/v1/openapi.json`)).json();
    } finally {
      await server.close();
    }
  } finally {
    fs.rmSync(dataDir, { recursive: true, force: true });
  }
}

export function splice(markdown: string, generated: string): string {
  const start = markdown.indexOf(BEGIN);
  const end = markdown.indexOf(END);
  if (start < 0 || end < start) return `${markdown.trimEnd()}\n\n${generated}\n`;
  return `${markdown.slice(0, start)}${generated}${markdown.slice(end + END.length)}`;
}

if (import.meta.main) {
  const doc = await currentDocument();
  const before = fs.readFileSync(target, 'utf8');
  const after = splice(before, renderReference(doc));
  if (process.argv.includes('--check')) {
    if (before !== after) {
      console.error('docs/api.md is stale: run node_modules/.bin/node scripts/api-docs.ts');
      process.exit(1);
    }
  } else {
    fs.writeFileSync(target, after);
    console.error(`docs/api.md: ${Object.keys(doc.paths).length} paths`);
  }
}
