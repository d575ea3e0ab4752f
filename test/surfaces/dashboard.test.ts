/**
 * The dashboard as served (assets, headers, the SDK's type-stripped modules) and in real
 * headless Chromium: signing in and out with the keyboard, a wrong key, the key kept in
 * sessionStorage across a reload, labels on every control, no script errors. The full flow
 * (upload, build, start, open the app) is dashboard-e2e.test.ts.
 */
import assert from 'node:assert/strict';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import type { Browser, Page } from 'playwright-core';
import { artifactDir, launchBrowser, startTestServer, type TestServer } from './helpers.ts';

// Code passed to page.evaluate runs in the browser; these stand in for the DOM's types here.
declare const document: any;
declare const sessionStorage: any;
declare const localStorage: any;
type HTMLInputElement = any;

let server: TestServer;
let browser: Browser | undefined;
const shots = artifactDir('dashboard');

before(async () => {
  server = await startTestServer();
});
after(async () => {
  await browser?.close();
  await server?.close();
});

describe('dashboard assets', () => {
  it('serves the page with a strict CSP and its assets with the right types', async () => {
    const page = await fetch(`${server.url}/`);
    assert.equal(page.status, 200);
    assert.equal(page.headers.get('content-type'), 'text/html; charset=utf-8');
    const csp = page.headers.get('content-security-policy') ?? '';
    assert.match(csp, /default-src 'self'/);
    assert.match(csp, /script-src 'self'(;|$)/, 'no inline scripts');
    assert.match(csp, /frame-ancestors 'none'/);
    assert.equal(page.headers.get('x-content-type-options'), 'nosniff');
    const html = await page.text();
    assert.match(html, /<script type="module" src="\/dashboard\/app\.js"><\/script>/);
    assert.doesNotMatch(html, /<script>(?!<)/, 'no inline script');

    const files: Array<[string, string]> = [['/dashboard/app.js', 'text/javascript'], ['/dashboard/style.css', 'text/css'], ['/sdk/index.ts', 'text/javascript'], ['/sdk/http.ts', 'text/javascript'],
      ['/dashboard/terminal.js', 'text/javascript'], ['/vendor/xterm.mjs', 'text/javascript'], ['/vendor/addon-fit.mjs', 'text/javascript'], ['/vendor/xterm.css', 'text/css']];
    for (const [file, type] of files) {
      const response = await fetch(`${server.url}${file}`);
      assert.equal(response.status, 200, file);
      assert.match(response.headers.get('content-type') ?? '', new RegExp(type), file);
      const etag = response.headers.get('etag');
      assert.ok(etag, file);
      const again = await fetch(`${server.url}${file}`, { headers: { 'if-none-match': etag } });
      assert.equal(again.status, 304, `${file} revalidates`);
    }
    // The SDK's modules arrive as JavaScript: TypeScript's annotations are gone.
    const http = await (await fetch(`${server.url}/sdk/http.ts`)).text();
    assert.match(http, /export class Transport/);
    assert.doesNotMatch(http, /export interface|: Promise<Response>|readonly options: TransportOptions/);
  });

  it('answers missing files and odd names with the error shape, and never serves Node-only or outside files', async () => {
    for (const [file, status] of [
      ['/dashboard/nope.js', 404], ['/sdk/node-source.ts', 404], ['/sdk/..%2F..%2Fsrc%2Fserver.ts', 400],
      ['/dashboard/.hidden', 400], ['/sdk/tar.ts', 200], ['/vendor/xterm.mjs', 200], ['/vendor/nope.mjs', 404], ['/vendor/..%2Fpackage.json', 400],
    ] as const) {
      const response = await fetch(`${server.url}${file}`);
      assert.equal(response.status, status, file);
      if (status !== 200) assert.equal(((await response.json()) as { error: { code: string } }).error.code.length > 0, true);
      else await response.arrayBuffer();
    }
  });
});

describe('dashboard in Chromium', () => {
  async function open(): Promise<{ page: Page; errors: string[] }> {
    browser ??= await launchBrowser();
    const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
    const page = await context.newPage();
    const errors: string[] = [];
    page.on('pageerror', (error) => errors.push(`pageerror: ${error.message}`));
    page.on('console', (message) => {
      // Failed requests the app handles (401 for a wrong key, 404 for modules this build lacks) are expected.
      if (message.type() === 'error' && !/Failed to load resource: the server responded with a status of (401|404)/.test(message.text())) {
        errors.push(`console: ${message.text()}`);
      }
    });
    await page.goto(`${server.url}/`);
    await page.locator('body[data-ready="true"]').waitFor();
    return { page, errors };
  }

  it('signs in and out with the keyboard alone, refusing a wrong key', async () => {
    const { page, errors } = await open();
    try {
      assert.equal(await page.title(), 'Cocoon');
      // Focus starts in the key field: type and press Enter.
      assert.equal(await page.evaluate(() => document.activeElement?.id), 'api-key');
      await page.keyboard.type('cocoon_ak_not-a-real-key');
      await page.keyboard.press('Enter');
      const alert = page.getByRole('alert');
      await alert.filter({ hasText: 'unknown or revoked' }).waitFor();
      assert.equal(await page.getByLabel('API key').getAttribute('aria-invalid'), 'true');
      await page.screenshot({ path: path.join(shots, '01-wrong-key.png') });

      await page.getByLabel('API key').fill(server.adminKey);
      await page.keyboard.press('Enter');
      await page.getByRole('heading', { name: 'Images' }).waitFor();
      await page.getByRole('heading', { name: 'MicroVMs' }).waitFor();
      assert.equal(await page.getByRole('heading', { name: 'Sign in' }).isVisible(), false);
      assert.equal(await page.evaluate(() => document.activeElement?.id), 'image-name', 'focus moves to the first field');
      assert.equal(await page.evaluate(() => sessionStorage.getItem('cocoon.apiKey')), server.adminKey);
      assert.equal(await page.evaluate(() => localStorage.length), 0, 'nothing in localStorage');
      await page.screenshot({ path: path.join(shots, '02-signed-in.png'), fullPage: true });

      // A reload keeps the session (sessionStorage), without a page of its own.
      await page.reload();
      await page.getByRole('heading', { name: 'Images' }).waitFor();
      assert.match(await page.locator('#who').innerText(), /Signed in · key cocoon_ak_/);

      // Tab order reaches the sign-out button; Enter signs out and forgets the key.
      await page.getByRole('button', { name: 'Sign out' }).focus();
      await page.keyboard.press('Enter');
      await page.getByRole('heading', { name: 'Sign in' }).waitFor();
      assert.equal(await page.evaluate(() => sessionStorage.getItem('cocoon.apiKey')), null);
      assert.equal(await page.locator('#app').isHidden(), true);
      assert.deepEqual(errors, []);
    } finally {
      await page.context().close();
    }
  });

  it('labels every control, names every button, and marks live regions', async () => {
    const { page, errors } = await open();
    try {
      await page.getByLabel('API key').fill(server.adminKey);
      await page.getByRole('button', { name: 'Sign in' }).click();
      await page.getByRole('heading', { name: 'Images' }).waitFor();
      const report = await page.evaluate(() => {
        const unlabeled = [...document.querySelectorAll('input, select, textarea')]
          .filter((c) => (c as HTMLInputElement).type !== 'hidden')
          .filter((c) => !((c as HTMLInputElement).labels?.length) && !c.getAttribute('aria-label') && !c.getAttribute('aria-labelledby'))
          .map((c) => c.id || c.outerHTML);
        const unnamed = [...document.querySelectorAll('button')].filter((b) => !(b.textContent ?? '').trim() && !b.getAttribute('aria-label')).map((b) => b.outerHTML);
        const live = [...document.querySelectorAll('[aria-live], [role=alert], [role=status], [role=log]')].map((n) => n.id);
        return { unlabeled, unnamed, live, lang: document.documentElement.lang, h1: document.querySelectorAll('h1').length };
      });
      assert.deepEqual(report.unlabeled, []);
      assert.deepEqual(report.unnamed, []);
      for (const id of ['sign-in-error', 'image-status', 'vm-status', 'build-log', 'toast']) assert.ok(report.live.includes(id), id);
      assert.equal(report.lang, 'en');
      assert.equal(report.h1, 1);
      // Forms say what is wrong without a round trip.
      await page.getByRole('button', { name: 'Create image' }).click();
      await page.locator('#image-status').filter({ hasText: 'Give the image a name' }).waitFor();
      assert.equal(await page.evaluate(() => document.activeElement?.id), 'image-name');
      await page.getByLabel('Name').fill('my-app');
      await page.getByRole('button', { name: 'Create image' }).click();
      await page.locator('#image-status').filter({ hasText: 'Choose a bundle' }).waitFor();
      await page.getByRole('button', { name: 'Start microVM' }).click();
      await page.locator('#vm-status').filter({ hasText: 'Choose a READY image' }).waitFor();
      await page.screenshot({ path: path.join(shots, '03-form-errors.png'), fullPage: true });
      assert.deepEqual(errors, []);
    } finally {
      await page.context().close();
    }
  });
});
