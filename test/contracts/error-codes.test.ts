/**
 * The error registry is the contract (src/common/error-codes.ts): every code src/ throws, answers
 * or compares against is registered, statuses written at throw sites are ones the registry lists,
 * the guest agent's codes are registered, and docs/errors.md is what the registry renders.
 * No QEMU: this reads source files. (The TypeScript types do the same for typed positions:
 * `new CocoonError(code: ErrorCode, …)` does not compile with an unregistered code.)
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { describe, test } from 'node:test';
import { ERRORS_DOC, renderErrorsDoc } from '../../scripts/errors-doc.ts';
import { ERROR_CODES, isErrorCode } from '../../src/common/error-codes.ts';
import { GUEST_CODES } from '../../src/guest/agent/client.ts';
import { errorCodeUses, guestAgentCodes, read, sourceFiles, type Use } from './source-scan.ts';

function show(uses: Use[]): string {
  return uses.map((u) => `  ${u.file}:${u.line} ${u.name} (${u.how}${u.status === undefined ? '' : `, status ${u.status}`})`).join('\n');
}

let scanned: Use[] | undefined;
function allUses(): Use[] {
  if (scanned) return scanned;
  const uses: Use[] = [];
  for (const file of sourceFiles('src', ['.ts'])) {
    uses.push(...errorCodeUses(file, read(file), !file.startsWith('src/compat/')));
  }
  for (const file of sourceFiles('src/guest/init', ['.c'])) uses.push(...guestAgentCodes(file, read(file)));
  scanned = uses;
  return uses;
}

describe('error registry', () => {
  test('the scan finds every way a code is written (unregistered ones included)', () => {
    const sample = `
      class MyError extends CocoonError { constructor() { super('c_super', 'm'); } }
      throw new CocoonError('c_new', 'm', { status: 418 });
      throw new CocoonError(flag ? 'c_cond_a' : 'c_cond_b', 'm');
      throw new CocoonError(options.errorCode ?? 'c_default', 'm');
      reply.send(errorBody('c_body', 'm'));
      if (isCocoonError(e, 'c_is')) {}
      return reject(409, 'c_reject', 'm');
      return fail(400, 'c_fail', 'm');
      const FAILS = { x: { status: 401, code: 'c_prop', message: 'm' } };
      exec('mkfs', [], { errorCode: 'c_option' });
      if (error.code === 'c_compare') {}
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') {}
      const timeout = { code: 'ETIMEDOUT' };
      fail(id, 'a sentence about why is no code');
      image.error = \`c_reason: the server restarted \${x}\`;
      // new CocoonError('c_comment', 'a comment does not count')
    `;
    const found = errorCodeUses('sample.ts', sample);
    const names = found.map((u) => u.name).sort();
    assert.deepEqual(names, [
      'c_body', 'c_compare', 'c_cond_a', 'c_cond_b', 'c_default', 'c_fail', 'c_is', 'c_new', 'c_option', 'c_prop', 'c_reason', 'c_reject', 'c_super',
    ]);
    assert.equal(found.find((u) => u.name === 'c_new')?.status, 418);
    assert.equal(found.find((u) => u.name === 'c_reject')?.status, 409);
    assert.equal(found.find((u) => u.name === 'c_prop')?.status, 401);
    // Compatibility surfaces: their protocol's `code:` properties are theirs; CocoonErrors still count.
    const compat = errorCodeUses('compat.ts', `new ConnectError('invalid_argument'); x = { code: 'not_found' }; new CocoonError('c_new', 'm');`, false);
    assert.deepEqual(compat.map((u) => u.name), ['c_new']);
    const guest = guestAgentCodes('agent.c', 'send_error(id, "c_guest", "m %d", 1);\n  case ENOENT: return "c_errno";\n');
    assert.deepEqual(guest.map((u) => u.name), ['c_guest', 'c_errno']);
  });

  test('every code thrown, answered or compared in src/ is registered', () => {
    const uses = allUses();
    assert.ok(uses.length > 200, `the scan found only ${uses.length} uses: is it still reading src/?`);
    const missing = uses.filter((u) => !isErrorCode(u.name));
    assert.equal(missing.length, 0, `codes used in src/ but missing from src/common/error-codes.ts (add them, then run node scripts/errors-doc.ts):\n${show(missing)}`);
  });

  test('every code the guest agent sends passes through to clients (not turned into guest_error)', () => {
    const guest = sourceFiles('src/guest/init', ['.c']).flatMap((file) => guestAgentCodes(file, read(file)));
    assert.ok(guest.length > 10, 'no guest agent codes found');
    const dropped = guest.filter((u) => !isErrorCode(u.name) || !GUEST_CODES.has(u.name));
    assert.equal(dropped.length, 0, `guest agent codes that src/guest/agent/client.ts would turn into guest_error:\n${show(dropped)}`);
  });

  test('a status written beside a code is one the registry lists for it', () => {
    const wrong = allUses().filter((u) => {
      if (u.status === undefined || !isErrorCode(u.name)) return false;
      const spec = ERROR_CODES[u.name];
      return u.status !== spec.status && !(('also' in spec ? spec.also : []) as readonly number[]).includes(u.status);
    });
    assert.equal(wrong.length, 0, `statuses that the registry does not list for their code (fix the site, or add it to 'also' and say when in the meaning):\n${show(wrong)}`);
  });

  test('codes are snake_case and each entry says what it means', () => {
    for (const [code, spec] of Object.entries(ERROR_CODES)) {
      assert.match(code, /^[a-z][a-z0-9]*(_[a-z0-9]+)*$/, code);
      assert.ok(spec.status >= 400 && spec.status <= 599, `${code}: status ${spec.status}`);
      assert.ok(spec.meaning.length >= 10, `${code}: say what it means`);
    }
  });

  test('docs/errors.md is what the registry renders', () => {
    const current = fs.existsSync(ERRORS_DOC) ? fs.readFileSync(ERRORS_DOC, 'utf8') : '';
    assert.ok(current === renderErrorsDoc(), 'docs/errors.md differs from src/common/error-codes.ts: run node scripts/errors-doc.ts');
    for (const code of Object.keys(ERROR_CODES)) assert.ok(current.includes(`| \`${code}\` |`), `${code} missing from docs/errors.md`);
  });
});

test('the status tables of docs/api.md and docs/gateway.md agree with the registry', () => {
  const wrong: string[] = [];
  let checked = 0;
  for (const file of ['docs/api.md', 'docs/gateway.md']) {
    read(file).split('\n').forEach((line, i) => {
      const cells = line.split('|').map((c) => c.trim());
      if (cells.length < 4 || !/^\d{3}\b/.test(cells[1]!)) return;
      const statuses = [...cells[1]!.matchAll(/\d{3}/g)].map((m) => Number(m[0]));
      for (const m of cells[2]!.matchAll(/`([a-z][a-z0-9_]*)`/g)) {
        const code = m[1]!;
        checked++;
        if (!isErrorCode(code)) wrong.push(`${file}:${i + 1} ${code} is not in the registry`);
        else if (!statuses.includes(ERROR_CODES[code].status) && !(('also' in ERROR_CODES[code] ? ERROR_CODES[code].also : []) as readonly number[]).some((s) => statuses.includes(s))) {
          wrong.push(`${file}:${i + 1} ${code} under ${statuses.join(', ')}, the registry says ${ERROR_CODES[code].status}`);
        }
      }
    });
  }
  assert.ok(checked > 30, `only ${checked} codes found in the tables`);
  assert.deepEqual(wrong, []);
});
