/**
 * Every COCOON_* setting is read in one module (src/common/settings.ts, through `setting()`),
 * except the CLI's client settings, which only their declared reader (src/cli/context.ts) reads;
 * each is listed in docs/configuration.md, which is what the table renders; a bad value stops
 * the server at start with a message naming the setting. No QEMU.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, test } from 'node:test';
import { CONFIGURATION_DOC, renderConfigurationDoc } from '../../scripts/configuration-doc.ts';
import { isCocoonError } from '../../src/common/errors.ts';
import { SETTINGS, checkSettings, setting, type SettingName } from '../../src/common/settings.ts';
import { loadConfig } from '../../src/config/config.ts';
import { ROOT, read, settingReads, sourceFiles, type Use } from './source-scan.ts';

const MODULE = 'src/common/settings.ts';

function show(uses: Use[]): string {
  return uses.map((u) => `  ${u.file}:${u.line} ${u.name} (${u.how})`).join('\n');
}

function isSetting(name: string): name is SettingName {
  return Object.hasOwn(SETTINGS, name);
}

/** A read is allowed in the module, through `setting('COCOON_…')`, or by a setting's declared reader. */
function allowed(use: Use): boolean {
  if (use.file === MODULE) return true;
  if (use.how === 'setting()') return isSetting(use.name);
  if (!isSetting(use.name)) return false;
  const reader = (SETTINGS[use.name] as { reader?: string }).reader;
  return reader === use.file;
}

describe('settings', () => {
  test('the scan finds every way a variable is read', () => {
    const sample = `
      const a = process.env.COCOON_A;
      const b = env.COCOON_B ?? 'x';
      const c = process.env['COCOON_C'];
      const { COCOON_D } = process.env;
      const e = int('COCOON_E', 1, 0, 9);
      const f = setting('COCOON_F');
      // process.env.COCOON_COMMENT does not count, nor a sentence naming COCOON_G in a string:
      const message = 'set COCOON_G to fix this';
    `;
    const found = settingReads('sample.ts', sample);
    assert.deepEqual(found.map((u) => `${u.name}:${u.how === 'setting()' ? 'setting' : 'direct'}`).sort(), [
      'COCOON_A:direct', 'COCOON_B:direct', 'COCOON_C:direct', 'COCOON_D:direct', 'COCOON_E:direct', 'COCOON_F:setting',
    ]);
  });

  test('src/ reads COCOON_* only through the settings module (the CLI its declared client settings)', () => {
    const uses = sourceFiles('src', ['.ts']).flatMap((file) => settingReads(file, read(file)));
    assert.ok(uses.some((u) => u.how === 'setting()'), 'the scan found no setting() call: is it still reading src/?');
    const outside = uses.filter((u) => !allowed(u));
    assert.equal(outside.length, 0, `COCOON_* read outside ${MODULE} (register it there and read it with setting()):\n${show(outside)}`);
  });

  test('docs/configuration.md is what the settings table renders, and lists every setting', () => {
    const current = fs.existsSync(CONFIGURATION_DOC) ? fs.readFileSync(CONFIGURATION_DOC, 'utf8') : '';
    assert.ok(current === renderConfigurationDoc(), 'docs/configuration.md differs from src/common/settings.ts: run node scripts/configuration-doc.ts');
    for (const name of Object.keys(SETTINGS)) assert.ok(current.includes(`| \`${name}\` |`), `${name} missing from docs/configuration.md`);
  });

  test('defaults hold when nothing is set, and bad values are refused naming the setting', () => {
    const config = loadConfig({ NODE_ENV: 'test' });
    assert.equal(config.apiPort, 7070);
    assert.equal(config.gatewayPort, 7071);
    assert.equal(config.host, '127.0.0.1');
    assert.equal(config.gatewayDomain, 'vm.localhost');
    assert.equal(config.region, 'local-1');
    assert.equal(config.accel, 'auto');
    assert.equal(setting('COCOON_ACCEL', { COCOON_ACCEL: 'TCG' }), 'tcg');
    assert.equal(setting('COCOON_IMAGE_BUILDS', { COCOON_IMAGE_BUILDS: '' }), 1);
    const bad: Array<[SettingName, string]> = [
      ['COCOON_API_PORT', '70700'], ['COCOON_GATEWAY_PORT', 'x'], ['COCOON_REGION', 'Bad Region'], ['COCOON_ACCEL', 'hvf'],
      ['COCOON_IMAGE_BUILDS', '0'], ['COCOON_IMAGE_QUEUE_MAX', '1.5'], ['COCOON_BUNDLE_MAX_BYTES', '-1'], ['COCOON_LOG_LEVEL', 'loud'],
      ['COCOON_BUILD_NETWORK', 'bridge'], ['COCOON_QEMU_USER', 'Not A User'], ['COCOON_QEMU_UIDS', 'many'], ['COCOON_EGRESS_GUARD', 'maybe'],
      ['COCOON_VM_CGROUPS', 'no'], ['COCOON_QEMU_SANDBOX', 'off'], ['COCOON_S3_ENDPOINT', 'not a url'], ['COCOON_GATEWAY_DOMAIN', 'a b'],
    ];
    for (const [name, value] of bad) {
      assert.throws(() => setting(name, { [name]: value }), (e) => isCocoonError(e, 'invalid_config') && e.message.startsWith(`${name} `) && e.message.includes(JSON.stringify(value)), name);
    }
    // A secret's value is never echoed (a database URL holds a password).
    assert.throws(
      () => setting('COCOON_DATABASE_URL', { COCOON_DATABASE_URL: 'mysql://cocoon:hunter2@db/cocoon' }),
      (e) => isCocoonError(e, 'invalid_config') && e.message.startsWith('COCOON_DATABASE_URL ') && !e.message.includes('hunter2'),
    );
    // At start every problem is reported at once.
    assert.throws(
      () => checkSettings({ COCOON_API_PORT: 'x', COCOON_ACCEL: 'hvf', COCOON_S3_ACCESS_KEY_ID: 'id' }),
      (e) => isCocoonError(e, 'invalid_config') && /COCOON_API_PORT/.test(e.message) && /COCOON_ACCEL/.test(e.message) && /COCOON_S3_SECRET_ACCESS_KEY/.test(e.message),
    );
  });

  test('`cocoon serve` with a bad setting refuses to start and says which and why', () => {
    const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'cocoon-settings-'));
    try {
      const result = spawnSync(process.execPath, [path.join(ROOT, 'src/cli/main.ts'), 'serve'], {
        env: { ...process.env, COCOON_DATA_DIR: dataDir, COCOON_API_PORT: 'seventy', COCOON_GATEWAY_PORT: '0' },
        encoding: 'utf8',
        timeout: 60_000,
      });
      assert.equal(result.status, 1, result.stderr);
      assert.match(result.stderr, /COCOON_API_PORT must be a TCP port \(0-65535\), got "seventy"/);
      assert.deepEqual(fs.readdirSync(dataDir), [], 'nothing was started or written');
    } finally {
      fs.rmSync(dataDir, { recursive: true, force: true });
    }
  });
});
