/**
 * Source scans for the contract tests: where src/ writes an error code, where it reads a
 * COCOON_* setting. TypeScript's own parser reads the files (comments and strings are told
 * apart properly); the guest agent's C source is read with a regular expression.
 */
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import ts from 'typescript';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

export interface Use {
  /** Path relative to the repository root. */
  file: string;
  line: number;
  /** The error code or setting name. */
  name: string;
  /** How it was written (for messages). */
  how: string;
  /** For error codes: the status written beside it at this site, if it is a literal. */
  status?: number;
}

/** Every file under `dir` (relative to the root) whose name ends with one of `exts`. */
export function sourceFiles(dir: string, exts: readonly string[]): string[] {
  const out: string[] = [];
  const walk = (d: string): void => {
    for (const entry of fs.readdirSync(path.join(ROOT, d), { withFileTypes: true })) {
      const rel = path.join(d, entry.name);
      if (entry.isDirectory()) {
        if (entry.name !== 'node_modules') walk(rel);
      } else if (exts.some((ext) => entry.name.endsWith(ext))) {
        out.push(rel);
      }
    }
  };
  walk(dir);
  return out.sort();
}

function parse(file: string, text: string): ts.SourceFile {
  return ts.createSourceFile(file, text, ts.ScriptTarget.Latest, true, file.endsWith('.js') ? ts.ScriptKind.JS : ts.ScriptKind.TS);
}

function lineOf(sf: ts.SourceFile, node: ts.Node): number {
  return sf.getLineAndCharacterOfPosition(node.getStart(sf)).line + 1;
}

/** The string literals an expression can evaluate to: through `?:`, `??`, `||`, `( )`, `as`, `satisfies`. */
function literalsOf(node: ts.Expression): ts.StringLiteralLike[] {
  if (ts.isStringLiteralLike(node)) return [node];
  if (ts.isParenthesizedExpression(node) || ts.isAsExpression(node) || ts.isSatisfiesExpression(node)) return literalsOf(node.expression);
  if (ts.isConditionalExpression(node)) return [...literalsOf(node.whenTrue), ...literalsOf(node.whenFalse)];
  if (ts.isBinaryExpression(node) && [ts.SyntaxKind.QuestionQuestionToken, ts.SyntaxKind.BarBarToken].includes(node.operatorToken.kind)) {
    return [...literalsOf(node.left), ...literalsOf(node.right)];
  }
  return [];
}

function literalStatus(node: ts.Expression | undefined): number | undefined {
  if (!node) return undefined;
  if (ts.isNumericLiteral(node)) return Number(node.text);
  if (ts.isObjectLiteralExpression(node)) {
    for (const p of node.properties) {
      if (ts.isPropertyAssignment(p) && p.name.getText() === 'status' && ts.isNumericLiteral(p.initializer)) return Number(p.initializer.text);
    }
  }
  return undefined;
}

/** Calls whose argument at this index is an error code. */
const CODE_ARGUMENTS: Record<string, { code: number; status?: number }> = {
  errorBody: { code: 0 },
  isCocoonError: { code: 1 },
  // the gateway's rejections and the router's failures: (status, code, message)
  reject: { code: 1, status: 0 },
  fail: { code: 1, status: 0 },
};

const CODE_SHAPE = /^[a-z][a-z0-9]*(?:_[a-z0-9]+)*$/;

/** A failure reason written as `<code>: <message>` (images and microVMs that FAILED). */
const REASON_PREFIX = /^([a-z][a-z0-9]*(?:_[a-z0-9]+)+): /;

/**
 * Where a TypeScript file writes an error code: `new CocoonError('code', …, {status})`, `super('code')`
 * in a class that extends CocoonError, `errorBody('code')`, `isCocoonError(e, 'code')`,
 * `reject(status, 'code')` / `fail(status, 'code')`, `code: 'x'` and `errorCode: 'x'` properties,
 * `x.code === 'code'`, and reasons written as `'code: message'`; in each place through `?:`, `??`
 * and `||`. `protocolCodes`: false for files that speak an outside protocol's codes
 * (src/compat/), where only the CocoonError forms count.
 */
export function errorCodeUses(file: string, text: string, protocolCodes = true): Use[] {
  const sf = parse(file, text);
  const uses: Use[] = [];
  const add = (expr: ts.Expression | undefined, how: string, status?: number): void => {
    if (!expr) return;
    for (const lit of literalsOf(expr)) {
      // Outside CocoonError's own arguments only code-shaped strings count: `code: 'ETIMEDOUT'`
      // is Node's, and `fail(id, 'a sentence')` in another module is not the router's fail().
      if (!how.includes('CocoonError') && !CODE_SHAPE.test(lit.text)) continue;
      uses.push({ file, line: lineOf(sf, lit), name: lit.text, how, ...(status === undefined ? {} : { status }) });
    }
  };
  const extendsCocoonError = new Set<ts.Node>();
  const visit = (node: ts.Node): void => {
    if (ts.isClassLike(node) && node.heritageClauses?.some((h) => h.types.some((t) => t.expression.getText(sf) === 'CocoonError'))) {
      extendsCocoonError.add(node);
    }
    if (ts.isNewExpression(node) && node.expression.getText(sf) === 'CocoonError' && node.arguments?.length) {
      add(node.arguments[0], 'new CocoonError', literalStatus(node.arguments[2]));
    } else if (ts.isCallExpression(node)) {
      const callee = node.expression.getText(sf);
      if (node.expression.kind === ts.SyntaxKind.SuperKeyword) {
        let up: ts.Node | undefined = node.parent;
        while (up && !ts.isClassLike(up)) up = up.parent;
        if (up && extendsCocoonError.has(up)) add(node.arguments[0], 'super() of a CocoonError', literalStatus(node.arguments[2]));
      } else if (Object.hasOwn(CODE_ARGUMENTS, callee) && (protocolCodes || callee === 'isCocoonError')) {
        const spec = CODE_ARGUMENTS[callee]!;
        add(node.arguments[spec.code], `${callee}()`, spec.status === undefined ? undefined : literalStatus(node.arguments[spec.status]));
      }
    } else if (protocolCodes && ts.isPropertyAssignment(node) && ['code', 'errorCode'].includes(node.name.getText(sf))) {
      let status: number | undefined;
      if (ts.isObjectLiteralExpression(node.parent)) {
        const sibling = node.parent.properties.find((p) => ts.isPropertyAssignment(p) && p.name.getText(sf) === 'status');
        if (sibling && ts.isPropertyAssignment(sibling)) status = literalStatus(sibling.initializer);
      }
      add(node.initializer, `${node.name.getText(sf)}: property`, status);
    } else if (
      protocolCodes &&
      ts.isBinaryExpression(node) &&
      [ts.SyntaxKind.EqualsEqualsEqualsToken, ts.SyntaxKind.ExclamationEqualsEqualsToken].includes(node.operatorToken.kind)
    ) {
      for (const [side, other] of [[node.left, node.right], [node.right, node.left]] as const) {
        if (ts.isPropertyAccessExpression(side) && side.name.text === 'code' && ts.isStringLiteralLike(other) && !/^E[A-Z]|^[A-Z]/.test(other.text)) {
          add(other, '.code comparison');
        }
      }
    }
    if (protocolCodes && (ts.isStringLiteralLike(node) || ts.isTemplateHead(node))) {
      const m = REASON_PREFIX.exec(node.text);
      if (m) uses.push({ file, line: lineOf(sf, node), name: m[1]!, how: "'code: message' reason" });
    }
    ts.forEachChild(node, visit);
  };
  visit(sf);
  return uses;
}

/** The codes the guest agent sends: `send_error(stream, "code", …)` and `return "code";` (errno_code). */
export function guestAgentCodes(file: string, text: string): Use[] {
  const uses: Use[] = [];
  const lines = text.split('\n');
  lines.forEach((line, i) => {
    for (const m of line.matchAll(/send_error\([^,]+,\s*"([a-z_]+)"|return "([a-z_]+)";/g)) {
      uses.push({ file, line: i + 1, name: (m[1] ?? m[2])!, how: m[1] ? 'send_error()' : 'errno_code()' });
    }
  });
  return uses;
}

/**
 * Where a file reads a COCOON_* variable: `process.env.COCOON_X`, `env.COCOON_X`,
 * `env['COCOON_X']`, destructuring `{ COCOON_X } = process.env`, and a `'COCOON_X'` string
 * handed to anything (a helper that reads the variable by name); `setting('COCOON_X')` (the
 * settings module's reader) is marked as such. Comments and sentences that name a variable do
 * not count.
 */
export function settingReads(file: string, text: string): Use[] {
  const sf = parse(file, text);
  const uses: Use[] = [];
  const visit = (node: ts.Node): void => {
    if (ts.isPropertyAccessExpression(node) && node.name.text.startsWith('COCOON_')) {
      uses.push({ file, line: lineOf(sf, node), name: node.name.text, how: `${node.expression.getText(sf)}.${node.name.text}` });
    } else if (ts.isElementAccessExpression(node) && ts.isStringLiteralLike(node.argumentExpression) && node.argumentExpression.text.startsWith('COCOON_')) {
      uses.push({ file, line: lineOf(sf, node), name: node.argumentExpression.text, how: 'element access' });
    } else if (ts.isBindingElement(node)) {
      const name = (node.propertyName ?? node.name).getText(sf);
      if (name.startsWith('COCOON_')) uses.push({ file, line: lineOf(sf, node), name, how: 'destructuring' });
    } else if (ts.isStringLiteralLike(node) && /^COCOON_[A-Z0-9_]+$/.test(node.text) && !ts.isElementAccessExpression(node.parent) && !ts.isLiteralTypeNode(node.parent)) {
      const viaSetting = ts.isCallExpression(node.parent) && node.parent.expression.getText(sf) === 'setting' && node.parent.arguments[0] === node;
      uses.push({ file, line: lineOf(sf, node), name: node.text, how: viaSetting ? 'setting()' : 'name as a string' });
    }
    ts.forEachChild(node, visit);
  };
  visit(sf);
  return uses;
}

export function read(file: string): string {
  return fs.readFileSync(path.join(ROOT, file), 'utf8');
}
