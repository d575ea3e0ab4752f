/**
 * The reference docs cover what exists: every API operation of the running server is in
 * docs/api.md (whose reference part is generated from the OpenAPI document), every CLI command
 * in docs/cli.md, every SDK method in docs/sdk.md; the README links them.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { describe, it } from 'node:test';
import type { Command } from 'commander';
import { Cocoon } from '../../packages/sdk/src/index.ts';
import { currentDocument, renderReference } from '../../scripts/api-docs.ts';
import { buildCli } from '../../src/cli/main.ts';
import { repo } from './helpers.ts';

const read = (file: string) => fs.readFileSync(path.join(repo, file), 'utf8');

describe('docs', () => {
  it('docs/api.md documents every operation of the OpenAPI document', async () => {
    const doc = await currentDocument();
    const api = read('docs/api.md');
    const missing: string[] = [];
    for (const [p, item] of Object.entries<Record<string, unknown>>(doc.paths)) {
      for (const method of ['get', 'post', 'put', 'patch', 'delete']) {
        if (item[method] && !api.includes(`### ${method.toUpperCase()} ${p}\n`)) missing.push(`${method.toUpperCase()} ${p}`);
      }
    }
    assert.deepEqual(missing, [], 'regenerate with: node_modules/.bin/node scripts/api-docs.ts');
    // The generator renders what the document says (spot check).
    const reference = renderReference(doc);
    assert.match(reference, /### POST \/api\/v1\/tenants\n\nCreate a tenant/);
    assert.match(api, /\/api\/v1\/openapi\.json/);
  });

  it('docs/cli.md names every command and the exit codes', () => {
    const cli = read('docs/cli.md');
    const names: string[] = [];
    const walk = (command: Command, prefix: string[]) => {
      for (const sub of command.commands) {
        const name = [...prefix, sub.name()];
        if (sub.commands.length) walk(sub, name);
        else names.push(name.join(' '));
      }
    };
    walk(buildCli(), ['cocoon']);
    assert.ok(names.length >= 20, names.join(', '));
    const missing = names.filter((n) => !cli.includes(`\`${n}`));
    assert.deepEqual(missing, []);
    for (const code of [0, 1, 2, 3, 4, 5, 6, 7]) assert.match(cli, new RegExp(`^\\| ${code} \\| `, 'm'));
  });

  it('docs/sdk.md names every public SDK method', () => {
    const sdk = read('docs/sdk.md');
    const client = new Cocoon({ apiUrl: 'http://127.0.0.1:1' });
    const missing: string[] = [];
    for (const name of Object.getOwnPropertyNames(Cocoon.prototype).filter((n) => n !== 'constructor' && n !== 'apiUrl')) {
      if (!sdk.includes(`cocoon.${name}(`)) missing.push(name);
    }
    for (const resource of ['bundles', 'images', 'microvms', 'tokens', 'tenants', 'apiKeys', 'exec', 'files', 'pty'] as const) {
      const proto = Object.getPrototypeOf(client[resource]);
      for (const method of Object.getOwnPropertyNames(proto).filter((n) => n !== 'constructor')) {
        const inTable = sdk.includes(`cocoon.${resource}.${method}(`) || new RegExp(`cocoon\\.${resource}\\.[a-zA-Z]+\\([^)]*\\)[^|]*\\b${method}\\(`).test(sdk);
        if (!inTable) missing.push(`${resource}.${method}`);
      }
    }
    assert.deepEqual(missing, []);
  });

  it('the README has the quickstart, the tutorial, and links the references', () => {
    const readme = read('README.md');
    for (const needle of ['npm start', 'npm test', 'Five minutes', 'cocoon image create hello ./hello --wait', 'X-Cocoon-Token', 'docs/api.md', 'docs/cli.md', 'docs/sdk.md', 'http://127.0.0.1:7070/']) {
      assert.ok(readme.includes(needle), needle);
    }
    assert.ok(fs.existsSync(path.join(repo, 'packages/sdk/README.md')));
    assert.equal(JSON.parse(read('packages/sdk/package.json')).name, '@cocoon/sdk');
  });
});
