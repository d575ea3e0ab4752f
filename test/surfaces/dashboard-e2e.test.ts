/**
 * The dashboard end to end in real headless Chromium, on a real server (real buildah and
 * QEMU): sign in, upload the busybox app's .tar.gz, watch the build log live until READY,
 * start a microVM with a lifecycle form, copy a token, open the app in a new tab through the
 * gateway's cookie flow and see its page; open a terminal on it (typing `echo $((6*7))` shows
 * 42) and move a file up and down; suspend, resume, terminate. Screenshots of every
 * step go to test-artifacts/dashboard-e2e/. The upload needs the images module, the rest also
 * the microvms module.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import type { Browser, BrowserContext, Page } from 'playwright-core';
import { Cocoon } from '../../packages/sdk/src/index.ts';
import { artifactDir, busyboxTarGz, imageRoutesMissing, launchBrowser, repo, startTestServer, tempDir, vmRoutesMissing, type TestServer } from './helpers.ts';

declare const document: any;
declare const sessionStorage: any;

let server: TestServer | undefined;
let browser: Browser | undefined;
let noImages: string | undefined;
let noVms: string | undefined;
/** The signed-in page the first test leaves for the second. */
let session: { context: BrowserContext; page: Page; errors: string[]; apiKey: string } | undefined;
const shots = artifactDir('dashboard-e2e');
const scratch = tempDir();

before(async () => {
  server = await startTestServer();
  noImages = imageRoutesMissing(server);
  noVms = vmRoutesMissing(server);
});
after(async () => {
  await browser?.close().catch(() => undefined);
  if (server && !noVms) {
    const admin = new Cocoon({ apiUrl: server.url, apiKey: server.adminKey });
    for await (const vm of admin.microvms.iterate({ state: ['PENDING', 'RUNNING', 'SUSPENDING', 'SUSPENDED', 'RESUMING'] })) {
      await admin.microvms.terminate(vm.id).catch(() => undefined);
    }
  }
  await server?.close();
  fs.rmSync(scratch, { recursive: true, force: true });
});

const LONG = 15 * 60_000;

describe('dashboard end to end', { timeout: 60 * 60_000 }, () => {
  it('signs in, uploads a bundle and watches the build log live until the image is READY', async (t) => {
    if (noImages) return t.skip(noImages);
    const bundle = path.join(scratch, 'busybox-app.tar.gz');
    fs.writeFileSync(bundle, await busyboxTarGz());
    // A tenant of its own, as a user would get from `cocoon tenant create`.
    const tenant = await new Cocoon({ apiUrl: server!.url, apiKey: server!.adminKey }).tenants.create({ name: 'dashboard-user' });

    browser = await launchBrowser();
    const context = await browser.newContext({ viewport: { width: 1280, height: 1000 } });
    await context.grantPermissions(['clipboard-read', 'clipboard-write'], { origin: server!.url });
    const page = await context.newPage();
    const errors: string[] = [];
    page.on('pageerror', (error) => errors.push(error.message));
    const shot = (name: string) => page.screenshot({ path: path.join(shots, `${name}.png`), fullPage: true });

    // 1. Sign in.
    await page.goto(`${server!.url}/`);
    await page.getByLabel('API key').fill(tenant.apiKey);
    await page.getByRole('button', { name: 'Sign in' }).click();
    await page.getByRole('heading', { name: 'Images' }).waitFor();
    await shot('01-signed-in');

    // 2. Upload the bundle and create the image; the build log follows live.
    await page.getByLabel('Name').fill('dash-web');
    await page.getByLabel(/^Bundle/).setInputFiles(bundle);
    await page.getByRole('button', { name: 'Create image' }).click();
    const log = page.getByRole('log');
    await log.waitFor({ state: 'visible', timeout: 60_000 });
    await page.locator('#image-status').filter({ hasText: 'Building dash-web:1' }).waitFor({ timeout: 60_000 });
    // Lines arrive while the build runs (before it is READY).
    await page.waitForFunction(() => (document.getElementById('build-log')?.textContent ?? '').split('\n').length > 3, null, { timeout: LONG });
    const row = page.getByRole('row', { name: /dash-web/ });
    await row.waitFor();
    const during = await row.locator('.badge').innerText();
    await shot('02-building');
    await log.filter({ hasText: 'Build finished: dash-web:1 is READY' }).waitFor({ timeout: LONG });
    assert.equal(await row.locator('.badge').innerText(), 'READY', 'the list updated itself');
    assert.ok(['PENDING', 'BUILDING', 'BOOTING', 'SNAPSHOTTING', 'READY'].includes(during), during);
    await shot('03-image-ready');
    session = { context, page, errors, apiKey: tenant.apiKey };
  });

  it('starts a microVM with a lifecycle form, copies a token, opens the app in a new tab, suspends, resumes, terminates', async (t) => {
    if (noImages || noVms) return t.skip(noImages ?? noVms);
    assert.ok(session, 'the upload test ran first');
    const { context, page, errors } = session;
    const tenant = { apiKey: session.apiKey };
    const shot = (name: string) => page.screenshot({ path: path.join(shots, `${name}.png`), fullPage: true });

    // 3. Start a microVM with the lifecycle form.
    const imagePicker = page.getByLabel('Image', { exact: true });
    await page.waitForFunction(() => (document.getElementById('vm-image') as { value: string }).value.startsWith('arn:'), null, { timeout: 30_000 });
    assert.match(await imagePicker.inputValue(), /^arn:cocoon:local-1:\d{12}:microvm-image\/dash-web:1$/);
    await page.getByLabel('Suspend after idle (seconds)').fill('1200');
    await page.getByLabel('Session length (seconds)').fill('3600');
    await page.getByLabel('Terminate after suspended (seconds)').fill('1800');
    await page.getByRole('button', { name: 'Start microVM' }).click();
    await page.locator('#vm-status').filter({ hasText: 'is RUNNING' }).waitFor({ timeout: LONG });
    const newest = page.locator('#vms-table tbody tr').first();
    await newest.locator('.badge', { hasText: 'RUNNING' }).waitFor();
    const vmId = await newest.getAttribute('data-id');
    assert.match(vmId ?? '', /^mvm-/);
    // Its row by id (a fork made below is newer and comes first).
    const vmRow = page.locator(`#vms-table tbody tr[data-id="${vmId}"]`);
    assert.match(await vmRow.innerText(), /suspend after 1200s idle, wakes on request/);
    const api = new Cocoon({ apiUrl: server!.url, apiKey: tenant.apiKey });
    const started = await api.microvms.get(vmId!);
    assert.deepEqual(started.idlePolicy, { autoResumeEnabled: true, maxIdleDurationSeconds: 1200, suspendedDurationSeconds: 1800 });
    assert.equal(started.maximumDurationSeconds, 3600);
    await shot('04-microvm-running');

    // 4. Copy a token: it lands on the clipboard and in the token box, and works at the gateway.
    await vmRow.getByRole('button', { name: `Copy a token for ${vmId}` }).click();
    await page.locator('#toast').filter({ hasText: 'copied' }).waitFor();
    const token = await page.getByLabel(/Gateway token for/).inputValue();
    assert.ok(token.length > 20);
    assert.equal(await page.evaluate(() => (globalThis as unknown as { navigator: { clipboard: { readText(): Promise<string> } } }).navigator.clipboard.readText()), token);
    const gatewayPort = new URL(started.url).port;
    const direct = await fetch(`http://127.0.0.1:${gatewayPort}/`, { headers: { 'x-cocoon-token': token, 'x-cocoon-microvm': vmId! } });
    assert.equal(direct.status, 200);
    await shot('05-token');

    // 5. Open the app in a new tab through the cookie flow, and see its page.
    const [appPage] = await Promise.all([
      context.waitForEvent('page'),
      vmRow.getByRole('button', { name: `Open the app of ${vmId}` }).click(),
    ]);
    await appPage.waitForURL(new RegExp(`^http://${vmId}\\.vm\\.localhost:${gatewayPort}/`), { timeout: 60_000 });
    await appPage.getByRole('heading', { name: 'Hello from a Cocoon microVM' }).waitFor({ timeout: 60_000 });
    await appPage.screenshot({ path: path.join(shots, '06-app-in-new-tab.png') });
    // The cookie now carries the token: a plain reload (no ?cocoon_token) still gets in, and scripts cannot read it.
    await appPage.goto(`http://${vmId}.vm.localhost:${gatewayPort}/cgi-bin/hello`);
    assert.match(await appPage.locator('body').innerText(), /hello from cocoon/);
    assert.equal(await appPage.evaluate(() => document.cookie), '', 'the gateway cookie is HttpOnly');
    await appPage.close();

    // 6. A terminal on the microVM (xterm.js over the exec WebSocket): typing `echo $((6*7))`
    // shows 42. Then a file goes up through the upload form and comes back down.
    if (server!.has('POST', '/api/v1/microvms/:id/exec')) {
      await vmRow.getByRole('button', { name: `Open a terminal on ${vmId}` }).click();
      const panel = page.locator('#terminal-panel');
      await panel.locator('#terminal-state', { hasText: 'connected' }).waitFor({ timeout: 120_000 });
      await page.locator('#terminal .xterm').click();
      await page.keyboard.type('echo $((6*7))');
      await page.keyboard.press('Enter');
      await page.waitForFunction(() => /^42\s*$/m.test(document.querySelector('#terminal .xterm-rows')?.innerText ?? ''), null, { timeout: 60_000 });
      const rows: string = await page.locator('#terminal .xterm-rows').innerText();
      assert.match(rows, /echo \$\(\(6\*7\)\)/, 'the typed line echoes');
      const terminalShot = path.join(shots, '06b-terminal.png');
      await panel.screenshot({ path: terminalShot });
      // The screenshot the docs show (docs/img/), refreshed on request only: a test run leaves the checkout clean.
      if (process.env.COCOON_UPDATE_SCREENSHOTS) fs.copyFileSync(terminalShot, path.join(repo, 'docs/img/dashboard-terminal.png'));

      await page.getByLabel('Upload a file').setInputFiles({ name: 'note.txt', mimeType: 'text/plain', buffer: Buffer.from('from the browser\n') });
      await page.getByLabel('into the folder').fill('/tmp');
      await page.getByRole('button', { name: 'Upload', exact: true }).click();
      await page.locator('#files-status').filter({ hasText: 'Uploaded /tmp/note.txt' }).waitFor({ timeout: 60_000 });
      assert.equal(await api.files.read(vmId!, '/tmp/note.txt'), 'from the browser\n');
      await page.getByLabel('Download the file').fill('/tmp/note.txt');
      const [download] = await Promise.all([
        page.waitForEvent('download', { timeout: 60_000 }),
        page.getByRole('button', { name: 'Download', exact: true }).click(),
      ]);
      assert.equal(download.suggestedFilename(), 'note.txt');
      assert.equal(fs.readFileSync(await download.path()!, 'utf8'), 'from the browser\n');
      await page.getByRole('button', { name: 'Close terminal' }).click();
      assert.equal(await panel.isHidden(), true);
    }

    // 7. Suspend, resume, terminate from the table; the states update without a reload.
    await vmRow.getByRole('button', { name: `Suspend ${vmId}` }).click();
    await vmRow.locator('.badge', { hasText: 'SUSPENDED' }).waitFor({ timeout: LONG });
    await shot('07-suspended');
    await vmRow.getByRole('button', { name: `Resume ${vmId}` }).click();
    await vmRow.locator('.badge', { hasText: 'RUNNING' }).waitFor({ timeout: LONG });
    // Fork: a new row, RUNNING, its token shown; checkpoint: a new READY image version.
    await vmRow.getByRole('button', { name: `Fork ${vmId}` }).click();
    await page.locator('#vm-status').filter({ hasText: `Forked ${vmId} into` }).waitFor({ timeout: LONG });
    const forkId = /into (mvm-[0-9a-z]+)/.exec(await page.locator('#vm-status').innerText())![1]!;
    assert.equal(await page.locator('#token-vm').innerText(), forkId, "the fork's token is shown");
    const forkRow = page.locator(`#vms-table tbody tr[data-id="${forkId}"]`);
    await forkRow.locator('.badge', { hasText: 'RUNNING' }).waitFor({ timeout: LONG });
    await vmRow.getByRole('button', { name: `Checkpoint ${vmId}` }).click();
    await page.locator('#vm-status').filter({ hasText: 'is READY' }).waitFor({ timeout: LONG });
    await shot('07b-forked-and-checkpointed');
    assert.equal((await api.microvms.get(forkId)).state, 'RUNNING');
    await api.microvms.terminate(forkId);
    const terminate = vmRow.getByRole('button', { name: `Terminate ${vmId}` });
    await terminate.click();
    assert.equal(await terminate.innerText(), 'Confirm', 'a destructive action asks once more');
    await terminate.click();
    await vmRow.locator('.badge', { hasText: 'TERMINATED' }).waitFor({ timeout: LONG });
    await shot('08-terminated');
    assert.equal((await api.microvms.get(vmId!)).state, 'TERMINATED');
    assert.equal(await page.evaluate(() => sessionStorage.getItem('cocoon.apiKey')), tenant.apiKey);
    assert.deepEqual(errors, [], 'no script errors');
    await context.close();
  });
});
