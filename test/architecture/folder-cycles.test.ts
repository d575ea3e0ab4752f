// No import cycle between the top-level folders of src/ (the roles): a role may use another only
// if that one does not use it back, directly or through others. Imports are read with the
// TypeScript compiler's own pre-processor (every `import`, `import type`, `export … from` and
// dynamic `import()`), so a type-only import counts too: it is a dependency of the design even
// when it is erased at run time. Pure file reading, no build: fast.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import ts from 'typescript';

const root = path.resolve(import.meta.dirname, '../..');
const src = path.join(root, 'src');

function sourceFiles(dir: string): string[] {
  return fs.readdirSync(dir, { withFileTypes: true }).flatMap((entry) => {
    const full = path.join(dir, entry.name);
    if (entry.isDirectory()) return sourceFiles(full);
    return /\.(ts|mts|tsx)$/.test(entry.name) && !entry.name.endsWith('.d.ts') ? [full] : [];
  });
}

/** The role a file belongs to: its top-level folder under src/, or the file itself for src/*.ts (the composition root). */
function roleOf(file: string): string | undefined {
  const relative = path.relative(src, file);
  if (relative.startsWith('..') || path.isAbsolute(relative)) return undefined;
  const [first, ...rest] = relative.split(path.sep);
  return rest.length === 0 ? first : `${first}/`;
}

interface Edge { from: string; to: string; file: string; specifier: string }

function folderEdges(): Edge[] {
  const edges: Edge[] = [];
  for (const file of sourceFiles(src)) {
    const info = ts.preProcessFile(fs.readFileSync(file, 'utf8'), true, true);
    const from = roleOf(file)!;
    for (const { fileName: specifier } of info.importedFiles) {
      if (!specifier.startsWith('.')) continue; // packages and node: built-ins
      const to = roleOf(path.resolve(path.dirname(file), specifier));
      if (to === undefined || to === from) continue;
      edges.push({ from, to, file: path.relative(root, file), specifier });
    }
  }
  return edges;
}

/** Strongly connected components with more than one member (Tarjan). */
function cycles(nodes: Set<string>, next: Map<string, Set<string>>): string[][] {
  let index = 0;
  const indexOf = new Map<string, number>();
  const low = new Map<string, number>();
  const stack: string[] = [];
  const onStack = new Set<string>();
  const found: string[][] = [];
  const visit = (node: string): void => {
    indexOf.set(node, index);
    low.set(node, index++);
    stack.push(node);
    onStack.add(node);
    for (const to of next.get(node) ?? []) {
      if (!indexOf.has(to)) {
        visit(to);
        low.set(node, Math.min(low.get(node)!, low.get(to)!));
      } else if (onStack.has(to)) {
        low.set(node, Math.min(low.get(node)!, indexOf.get(to)!));
      }
    }
    if (low.get(node) === indexOf.get(node)) {
      const component: string[] = [];
      let member: string;
      do {
        member = stack.pop()!;
        onStack.delete(member);
        component.push(member);
      } while (member !== node);
      if (component.length > 1) found.push(component.sort());
    }
  };
  for (const node of [...nodes].sort()) if (!indexOf.has(node)) visit(node);
  return found;
}

test('no import cycle between the folders of src/', () => {
  const edges = folderEdges();
  assert.ok(edges.length > 20, 'the scan sees the imports between folders');
  const nodes = new Set(edges.flatMap((e) => [e.from, e.to]));
  const next = new Map<string, Set<string>>();
  for (const e of edges) next.set(e.from, (next.get(e.from) ?? new Set()).add(e.to));
  const found = cycles(nodes, next);
  const explain = found.map((component) => {
    const inside = edges.filter((e) => component.includes(e.from) && component.includes(e.to));
    const lines = [...new Set(inside.map((e) => `  ${e.from} → ${e.to}: ${e.file} imports ${e.specifier}`))];
    return `cycle between ${component.join(', ')}:\n${lines.join('\n')}`;
  });
  assert.deepEqual(explain, [], `folders that import each other (move the shared type or interface to the role that owns it):\n${explain.join('\n')}`);
});

test('the scan finds a cycle when there is one', () => {
  const next = new Map([['a/', new Set(['b/'])], ['b/', new Set(['c/'])], ['c/', new Set(['a/'])], ['d/', new Set(['a/'])]]);
  assert.deepEqual(cycles(new Set(['a/', 'b/', 'c/', 'd/']), next), [['a/', 'b/', 'c/']]);
  assert.deepEqual(cycles(new Set(['a/', 'b/']), new Map([['a/', new Set(['b/'])]])), []);
});
