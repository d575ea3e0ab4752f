// The front ends (the REST routes in src/api, the E2B and AWS surfaces in src/compat, the
// gateway, the exec service) talk to the lifecycle through its service interfaces
// (src/lifecycle/service.ts: MicrovmService, MicrovmRuntime; the gateway's MicroVMDirectory),
// never to its implementation (the engine facade, the per-host executor, hooks, timers…), so
// that the engine can be split, run on another host or replaced without touching a route.
// Wiring the implementation to the interfaces is src/wiring/'s job. Imports are read with the
// TypeScript compiler's pre-processor (type-only imports count too); pure file reading, fast.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import ts from 'typescript';

const root = path.resolve(import.meta.dirname, '../..');
const src = path.join(root, 'src');
const lifecycle = path.join(src, 'lifecycle');

/** The folders that must see the lifecycle only through its interfaces. */
const FRONT_ENDS = ['api', 'compat', 'gateway', 'exec'];
/** The lifecycle files they may import: the service interfaces. */
const SERVICE_FILES = new Set(['service.ts']);

function sourceFiles(dir: string): string[] {
  return fs.readdirSync(dir, { withFileTypes: true }).flatMap((entry) => {
    const full = path.join(dir, entry.name);
    if (entry.isDirectory()) return sourceFiles(full);
    return /\.(ts|mts|tsx)$/.test(entry.name) && !entry.name.endsWith('.d.ts') ? [full] : [];
  });
}

/** Every relative import of `file` that resolves into src/lifecycle/, as a path inside that folder. */
function lifecycleImports(file: string): string[] {
  const info = ts.preProcessFile(fs.readFileSync(file, 'utf8'), true, true);
  const found: string[] = [];
  for (const { fileName: specifier } of info.importedFiles) {
    if (!specifier.startsWith('.')) continue;
    const target = path.relative(lifecycle, path.resolve(path.dirname(file), specifier));
    if (!target.startsWith('..') && !path.isAbsolute(target)) found.push(target === '' ? 'index.ts' : target);
  }
  return found;
}

test('the API routes, the E2B/AWS surfaces, the gateway and exec import only the lifecycle service interfaces', () => {
  const offending: string[] = [];
  for (const folder of FRONT_ENDS) {
    const dir = path.join(src, folder);
    if (!fs.existsSync(dir)) continue;
    for (const file of sourceFiles(dir)) {
      for (const target of lifecycleImports(file)) {
        if (!SERVICE_FILES.has(target)) offending.push(`${path.relative(root, file)} imports src/lifecycle/${target}`);
      }
    }
  }
  assert.deepEqual(
    offending,
    [],
    'front ends must use the interfaces in src/lifecycle/service.ts (MicrovmService, MicrovmRuntime) or ' +
      "the gateway's MicroVMDirectory, not the engine or its parts; pass the implementation in from src/wiring/",
  );
});

test('the check sees a forbidden import (it reads what it claims to read)', () => {
  const wiring = path.join(src, 'wiring', 'microvms.ts');
  assert.ok(lifecycleImports(wiring).includes('engine.ts'), 'src/wiring/microvms.ts builds the engine and is seen importing it');
});
