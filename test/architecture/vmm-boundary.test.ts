// QEMU stays behind the VM driver interface (src/vmm/driver.ts): no file of src/ outside the
// QEMU driver's folder imports from src/vmm/qemu/ (src/vmm/drivers.ts, which picks the driver,
// is the one exception), and no code outside src/vmm/ names qemu-img or QMP (comments may: they
// explain). Imports are read with the TypeScript pre-processor and code with its scanner, which
// skips comments and sees string literals whole. Pure file reading, no build: fast.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import ts from 'typescript';

const root = path.resolve(import.meta.dirname, '../..');
const src = path.join(root, 'src');
const vmm = path.join(src, 'vmm');
const qemuFolder = path.join(vmm, 'qemu');

/** The one file outside the QEMU driver's folder that may import it. */
const PICKS_THE_DRIVER = path.join(vmm, 'drivers.ts');

/**
 * Files outside src/vmm/ whose code may name QMP, and why: the error registry lists the VMM
 * area's public error codes (`qmp_error`, `qmp_timeout`), which clients see and which stay.
 */
const MAY_NAME_QMP = new Map([[path.join(src, 'common', 'error-codes.ts'), 'public error codes of the VMM area']]);

function sourceFiles(dir: string): string[] {
  return fs.readdirSync(dir, { withFileTypes: true }).flatMap((entry) => {
    const full = path.join(dir, entry.name);
    if (entry.isDirectory()) return sourceFiles(full);
    return /\.(ts|mts|tsx)$/.test(entry.name) && !entry.name.endsWith('.d.ts') ? [full] : [];
  });
}

function inside(file: string, dir: string): boolean {
  const relative = path.relative(dir, file);
  return !relative.startsWith('..') && !path.isAbsolute(relative);
}

/** The imports from src/vmm/qemu/ in `text`, the code of `file` (none for the driver's own files and the one that picks it). */
function qemuImports(file: string, text: string): string[] {
  if (inside(file, qemuFolder) || file === PICKS_THE_DRIVER) return [];
  return ts
    .preProcessFile(text, true, true)
    .importedFiles.map(({ fileName }) => fileName)
    .filter((specifier) => specifier.startsWith('.') && inside(path.resolve(path.dirname(file), specifier), qemuFolder));
}

/** Tokens of `text` that are code (identifiers, strings, templates), comments left out, naming qemu-img or QMP. */
function qemuNamesInCode(text: string): string[] {
  const scanner = ts.createScanner(ts.ScriptTarget.Latest, /* skipTrivia */ true, ts.LanguageVariant.Standard, text);
  const found: string[] = [];
  for (let kind = scanner.scan(); kind !== ts.SyntaxKind.EndOfFileToken; kind = scanner.scan()) {
    // A template's middle and tail are scanned as such only on request after a `}`.
    if (kind === ts.SyntaxKind.CloseBraceToken) kind = scanner.reScanTemplateToken(false);
    const token = scanner.getTokenText();
    if (/qemu-img|qmp/i.test(token)) found.push(token.slice(0, 80));
  }
  return found;
}

test('no file of src/ outside the QEMU driver imports from src/vmm/qemu/ (src/vmm/drivers.ts picks the driver)', () => {
  const found = sourceFiles(src).flatMap((file) => qemuImports(file, fs.readFileSync(file, 'utf8')).map((specifier) => `${path.relative(root, file)} imports ${specifier}`));
  assert.deepEqual(found, []);
});

test('no code outside src/vmm/ names qemu-img or QMP (comments may)', () => {
  const found: string[] = [];
  for (const file of sourceFiles(src)) {
    if (inside(file, vmm) || MAY_NAME_QMP.has(file)) continue;
    for (const token of qemuNamesInCode(fs.readFileSync(file, 'utf8'))) found.push(`${path.relative(root, file)}: ${token}`);
  }
  assert.deepEqual(found, []);
});

test('the checks see what they look for: code, not comments; imports of the QEMU folder, dynamic ones too', () => {
  assert.deepEqual(qemuNamesInCode('// qemu-img here is a comment\n/* QMP too */ const a = 1;'), []);
  assert.deepEqual(qemuNamesInCode("run('qemu-img', ['info']);"), ["'qemu-img'"]);
  assert.deepEqual(qemuNamesInCode('const client = new QmpClient();'), ['QmpClient']);
  assert.deepEqual(qemuNamesInCode('const s = `a ${b} qemu-img ${c}`; // fine'), ['} qemu-img ${']);
  assert.deepEqual(qemuNamesInCode("const url = 'http://x'; // qmp"), []);
  const lifecycleFile = path.join(src, 'lifecycle', 'probe.ts');
  assert.deepEqual(qemuImports(lifecycleFile, "import { QemuVm } from '../vmm/qemu/qemu.ts';"), ['../vmm/qemu/qemu.ts']);
  assert.deepEqual(qemuImports(lifecycleFile, "const m = await import('../vmm/qemu/driver.ts');"), ['../vmm/qemu/driver.ts']);
  assert.deepEqual(qemuImports(lifecycleFile, "import type { Vm } from '../vmm/driver.ts';"), []);
  assert.deepEqual(qemuImports(path.join(vmm, 'guest-channel.ts'), "import { x } from './qemu/qmp.ts';"), ['./qemu/qmp.ts']);
  assert.deepEqual(qemuImports(PICKS_THE_DRIVER, "import { qemuDriver } from './qemu/driver.ts';"), []);
});
