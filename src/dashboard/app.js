// The Cocoon dashboard: one page, plain ES modules, the same SDK as the CLI (served by the API
// server with its types stripped). The API key lives in sessionStorage (this tab only). Lists
// refresh every two seconds while the tab is visible; rows are updated in place so focus and
// keyboard position survive a refresh. All text goes in with textContent, never as HTML.
import { Cocoon, isCocoonApiError } from '/sdk/index.ts';
import { closeTerminal, downloadFile, openTerminal, uploadFile } from '/dashboard/terminal.js';

const KEY_STORAGE = 'cocoon.apiKey';
const REFRESH_MS = 2000;
const FINAL_VM = new Set(['TERMINATED', 'FAILED']);

const $ = (id) => document.getElementById(id);

/** @type {Cocoon | undefined} */
let cocoon;
let info = { gateway: { domain: 'vm.localhost', port: null } };
let refreshTimer;
let logAbort;
let modules = { images: true, microvms: true };
const images = new Map();

// ---------------------------------------------------------------- helpers

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === 'class') node.className = value;
    else if (key === 'dataset') Object.assign(node.dataset, value);
    else if (key.startsWith('aria-') || key === 'role') node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) node.append(child);
  return node;
}

function message(error) {
  if (isCocoonApiError(error)) {
    if (error.kind === 'unauthenticated') return 'Your API key is unknown or was revoked: sign in again.';
    return error.message;
  }
  return error?.message ?? String(error);
}

function toast(text) {
  const box = $('toast');
  box.textContent = text;
  box.classList.add('show');
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => box.classList.remove('show'), 5000);
}

function setStatus(id, text, kind = '') {
  const node = $(id);
  node.textContent = text;
  node.dataset.kind = kind;
}

function ago(iso) {
  if (!iso) return '';
  const seconds = Math.round((Date.now() - Date.parse(iso)) / 1000);
  const abs = Math.abs(seconds);
  const text = abs < 60 ? `${abs}s` : abs < 3600 ? `${Math.floor(abs / 60)}m` : `${Math.floor(abs / 3600)}h ${Math.floor((abs % 3600) / 60)}m`;
  return seconds >= 0 ? `${text} ago` : `in ${text}`;
}

function badge(state) {
  return el('span', { class: `badge state-${state.toLowerCase()}` }, state);
}

function number(form, name) {
  const value = form.elements[name].value.trim();
  return value === '' ? undefined : Number(value);
}

async function busy(button, work) {
  button.disabled = true;
  button.setAttribute('aria-busy', 'true');
  try {
    return await work();
  } finally {
    button.disabled = false;
    button.removeAttribute('aria-busy');
  }
}

function handleAuthLoss(error) {
  if (isCocoonApiError(error, 'unauthenticated')) {
    signOut('Your API key is unknown or was revoked: sign in again.');
    return true;
  }
  return false;
}

// ---------------------------------------------------------------- sign in / out

async function signIn(apiKey, { quiet = false } = {}) {
  const client = new Cocoon({ apiUrl: location.origin, apiKey, timeoutMs: 30_000 });
  try {
    await client.apiKeys.list({ limit: 1 });
  } catch (error) {
    sessionStorage.removeItem(KEY_STORAGE);
    if (!quiet) {
      $('sign-in-error').textContent = isCocoonApiError(error, 'unauthenticated')
        ? 'That API key is unknown or revoked. Check it and try again.'
        : `Cannot sign in: ${message(error)}`;
      $('api-key').setAttribute('aria-invalid', 'true');
      $('api-key').focus();
    }
    return false;
  }
  cocoon = client;
  sessionStorage.setItem(KEY_STORAGE, apiKey);
  try {
    info = await client.info();
  } catch {
    // an older server: fall back to the microVMs' own URLs
  }
  $('api-key').value = '';
  $('api-key').removeAttribute('aria-invalid');
  $('sign-in-error').textContent = '';
  $('sign-in').hidden = true;
  $('app').hidden = false;
  $('sign-out').hidden = false;
  $('who').hidden = false;
  $('who').textContent = `Signed in · key ${apiKey.slice(0, 14)}…`;
  document.title = 'Cocoon — dashboard';
  $('image-name').focus();
  await refresh();
  scheduleRefresh();
  return true;
}

function signOut(reason = '') {
  cocoon = undefined;
  closeTerminal();
  sessionStorage.removeItem(KEY_STORAGE);
  clearTimeout(refreshTimer);
  logAbort?.abort();
  images.clear();
  for (const body of document.querySelectorAll('tbody')) body.replaceChildren();
  $('app').hidden = true;
  $('log-panel').hidden = true;
  $('token-box').hidden = true;
  $('sign-out').hidden = true;
  $('who').hidden = true;
  $('sign-in').hidden = false;
  $('sign-in-error').textContent = reason;
  document.title = 'Cocoon';
  $('api-key').focus();
}

// ---------------------------------------------------------------- live lists

function scheduleRefresh() {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(async () => {
    if (cocoon && !document.hidden) await refresh();
    if (cocoon) scheduleRefresh();
  }, REFRESH_MS);
}

async function refresh() {
  if (!cocoon) return;
  const client = cocoon;
  const [imagePage, vmPage] = await Promise.allSettled([
    modules.images ? client.images.list({ limit: 100 }) : Promise.resolve({ items: [] }),
    modules.microvms ? client.microvms.list({ limit: 100 }) : Promise.resolve({ items: [] }),
  ]);
  if (client !== cocoon) return;
  for (const result of [imagePage, vmPage]) {
    if (result.status === 'rejected' && handleAuthLoss(result.reason)) return;
  }
  if (imagePage.status === 'fulfilled') renderImages(imagePage.value.items);
  else if (isCocoonApiError(imagePage.reason, 'not_found')) {
    modules.images = false;
    $('images-empty').textContent = 'This server has no image service.';
  }
  if (vmPage.status === 'fulfilled') renderVms(vmPage.value.items);
  else if (isCocoonApiError(vmPage.reason, 'not_found')) {
    modules.microvms = false;
    $('vms-empty').textContent = 'This server has no microVM service.';
  }
}

/** Updates `tbody` to hold one row per item, in order, reusing rows by id. */
function syncRows(tbody, items, build, update) {
  const existing = new Map([...tbody.rows].map((row) => [row.dataset.id, row]));
  let previous = null;
  for (const item of items) {
    let row = existing.get(item.id);
    if (!row) {
      row = build(item);
      row.dataset.id = item.id;
    }
    existing.delete(item.id);
    update(row, item);
    const wanted = previous ? previous.nextSibling : tbody.firstChild;
    if (wanted !== row) tbody.insertBefore(row, wanted);
    previous = row;
  }
  for (const row of existing.values()) row.remove();
}

function setCell(cell, value) {
  if (typeof value === 'string') {
    if (cell.textContent !== value) cell.textContent = value;
  } else if (cell.firstChild?.textContent !== value.textContent || cell.firstChild?.className !== value.className) {
    cell.replaceChildren(value);
  }
}

function renderImages(items) {
  images.clear();
  for (const image of items) images.set(image.id, image);
  $('images-empty').hidden = items.length > 0;
  syncRows($('images-table').tBodies[0], items, (image) => {
    const logButton = el('button', { type: 'button', class: 'secondary small', textContent: 'Log', 'aria-label': `Build log of ${image.name}:${image.version}` });
    logButton.addEventListener('click', () => showLog(image.id));
    const deleteButton = el('button', { type: 'button', class: 'danger small', textContent: 'Delete', 'aria-label': `Delete image ${image.name}:${image.version}` });
    deleteButton.addEventListener('click', () => confirmThen(deleteButton, () => deleteImage(image.id)));
    return el('tr', {}, el('th', { scope: 'row' }), el('td'), el('td'), el('td'), el('td'), el('td', { class: 'row-actions' }, logButton, deleteButton));
  }, (row, image) => {
    setCell(row.cells[0], image.name);
    row.cells[0].title = image.arn;
    setCell(row.cells[1], String(image.version));
    setCell(row.cells[2], badge(image.state));
    row.cells[2].title = image.error ?? '';
    setCell(row.cells[3], `${image.vcpus} vCPU · ${image.memoryMiB} MiB · :${image.port}`);
    setCell(row.cells[4], ago(image.createdAt));
  });
  // The image picker offers READY images; keep the choice across refreshes.
  const select = $('vm-image');
  const ready = items.filter((i) => i.state === 'READY');
  const key = ready.map((i) => i.arn).join('|');
  if (select.dataset.key !== key) {
    const chosen = select.value;
    select.replaceChildren(...(ready.length
      ? ready.map((i) => el('option', { value: i.arn, textContent: `${i.name}:${i.version}` }))
      : [el('option', { value: '', textContent: 'No READY image yet' })]));
    if (ready.some((i) => i.arn === chosen)) select.value = chosen;
    select.dataset.key = key;
  }
}

function renderVms(items) {
  $('vms-empty').hidden = items.length > 0;
  syncRows($('vms-table').tBodies[0], items, (vm) => {
    const button = (label, kind, action, text) => {
      const b = el('button', { type: 'button', class: `${kind} small`, textContent: text, 'aria-label': `${label} ${vm.id}`, dataset: { action } });
      return b;
    };
    const open = button('Open the app of', 'primary', 'open', 'Open app');
    const terminal = button('Open a terminal on', 'secondary', 'terminal', 'Terminal');
    const copy = button('Copy a token for', 'secondary', 'token', 'Copy token');
    const suspend = button('Suspend', 'secondary', 'suspend', 'Suspend');
    const resume = button('Resume', 'secondary', 'resume', 'Resume');
    const fork = button('Fork', 'secondary', 'fork', 'Fork');
    const checkpoint = button('Checkpoint', 'secondary', 'checkpoint', 'Checkpoint');
    const terminate = button('Terminate', 'danger', 'terminate', 'Terminate');
    open.addEventListener('click', () => openApp(vm.id, open));
    terminal.addEventListener('click', () => void openTerminal(cocoon, vm.id, message));
    copy.addEventListener('click', () => copyToken(vm.id, copy));
    suspend.addEventListener('click', () => lifecycle(vm.id, 'suspend', suspend));
    resume.addEventListener('click', () => lifecycle(vm.id, 'resume', resume));
    fork.addEventListener('click', () => forkVm(vm.id, fork));
    checkpoint.addEventListener('click', () => checkpointVm(vm.id, checkpoint));
    terminate.addEventListener('click', () => confirmThen(terminate, () => lifecycle(vm.id, 'terminate', terminate)));
    return el('tr', {}, el('th', { scope: 'row' }, el('code', {}, vm.id)), el('td'), el('td'), el('td'), el('td'),
      el('td', { class: 'row-actions' }, open, terminal, copy, suspend, resume, fork, checkpoint, terminate));
  }, (row, vm) => {
    row.vm = vm;
    const imageName = vm.image.split('/').pop() ?? vm.image;
    setCell(row.cells[1], imageName);
    row.cells[1].title = vm.image;
    setCell(row.cells[2], badge(vm.state));
    row.cells[2].title = vm.error ?? '';
    const p = vm.idlePolicy ?? {};
    setCell(row.cells[3], `suspend after ${p.maxIdleDurationSeconds}s idle${p.autoResumeEnabled ? ', wakes on request' : ''}`);
    setCell(row.cells[4], FINAL_VM.has(vm.state) ? '—' : ago(vm.expiresAt));
    const ended = FINAL_VM.has(vm.state) || vm.state === 'TERMINATING';
    for (const b of row.querySelectorAll('button')) {
      const action = b.dataset.action;
      b.hidden = ended
        || (action === 'suspend' && vm.state !== 'RUNNING')
        || (action === 'resume' && !['SUSPENDED', 'SUSPENDING'].includes(vm.state))
        || ((action === 'fork' || action === 'checkpoint') && !['RUNNING', 'SUSPENDED'].includes(vm.state));
    }
  });
}

/** A destructive button asks once more: the first press turns it into "Confirm". */
function confirmThen(button, action) {
  if (button.dataset.confirming) {
    delete button.dataset.confirming;
    button.textContent = button.dataset.label;
    void action();
    return;
  }
  button.dataset.label = button.textContent;
  button.dataset.confirming = '1';
  button.textContent = 'Confirm';
  setTimeout(() => {
    if (button.dataset.confirming) {
      delete button.dataset.confirming;
      button.textContent = button.dataset.label;
    }
  }, 4000);
}

// ---------------------------------------------------------------- images

async function createImage(event) {
  event.preventDefault();
  const form = event.currentTarget;
  const name = form.elements.name.value.trim();
  const file = form.elements.bundle.files[0];
  if (!name || !form.elements.name.checkValidity()) {
    setStatus('image-status', 'Give the image a name: letters, digits, “.”, “_”, “-”.', 'error');
    form.elements.name.focus();
    return;
  }
  if (!file) {
    setStatus('image-status', 'Choose a bundle: a .tar.gz or .zip with a Dockerfile at its root.', 'error');
    form.elements.bundle.focus();
    return;
  }
  await busy($('image-create'), async () => {
    try {
      setStatus('image-status', `Uploading ${file.name} (${Math.ceil(file.size / 1024)} KiB)…`);
      const bundle = await cocoon.bundles.push(file);
      setStatus('image-status', 'Bundle checked and stored; starting the build…');
      const input = { name, bundle: bundle.uri };
      for (const field of ['port', 'vcpus', 'memoryMiB', 'diskMiB']) {
        const value = number(form, field);
        if (value !== undefined) input[field] = value;
      }
      const httpPath = form.elements.httpPath.value.trim();
      if (httpPath) input.readiness = { httpPath };
      const image = await cocoon.images.create(input);
      setStatus('image-status', `Building ${image.name}:${image.version}: follow its log below.`, 'ok');
      form.reset();
      await refresh();
      showLog(image.id);
    } catch (error) {
      if (!handleAuthLoss(error)) setStatus('image-status', message(error), 'error');
    }
  });
}

async function showLog(imageId) {
  logAbort?.abort();
  const abort = new AbortController();
  logAbort = abort;
  const panel = $('log-panel');
  const pre = $('build-log');
  const image = images.get(imageId);
  panel.hidden = false;
  panel.dataset.image = imageId;
  $('log-image').textContent = image ? `${image.name}:${image.version}` : imageId;
  $('log-state').replaceChildren(badge(image?.state ?? 'PENDING'));
  pre.textContent = '';
  panel.scrollIntoView({ block: 'nearest' });
  try {
    let pending = '';
    let flushing = false;
    const flush = () => {
      flushing = false;
      const stick = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 8;
      pre.append(pending);
      pending = '';
      if (stick) pre.scrollTop = pre.scrollHeight;
    };
    for await (const line of cocoon.images.logs(imageId, { follow: true, signal: abort.signal })) {
      pending += `${line}\n`;
      if (!flushing) {
        flushing = true;
        requestAnimationFrame(flush);
      }
    }
    if (pending) flush();
    const done = await cocoon.images.get(imageId, { signal: abort.signal });
    $('log-state').replaceChildren(badge(done.state));
    pre.append(done.state === 'READY'
      ? `\n✓ Build finished: ${done.name}:${done.version} is READY. Start a microVM from it below.\n`
      : done.state === 'FAILED' ? `\n✗ Build failed: ${done.error ?? 'see above'}\n` : `\n(log ended; the image is ${done.state})\n`);
    pre.scrollTop = pre.scrollHeight;
    await refresh();
  } catch (error) {
    if (abort.signal.aborted) return;
    if (!handleAuthLoss(error)) pre.append(`\n(${message(error)})\n`);
  }
}

async function deleteImage(id) {
  try {
    await cocoon.images.delete(id);
    toast('Image deleted.');
    if ($('log-panel').dataset.image === id) {
      logAbort?.abort();
      $('log-panel').hidden = true;
    }
  } catch (error) {
    if (!handleAuthLoss(error)) toast(message(error));
  }
  await refresh();
}

// ---------------------------------------------------------------- microVMs

async function startVm(event) {
  event.preventDefault();
  const form = event.currentTarget;
  const image = form.elements.image.value;
  if (!image) {
    setStatus('vm-status', 'Choose a READY image (build one above first).', 'error');
    form.elements.image.focus();
    return;
  }
  const idlePolicy = { autoResumeEnabled: form.elements.autoResumeEnabled.checked };
  const maxIdle = number(form, 'maxIdleDurationSeconds');
  const suspended = number(form, 'suspendedDurationSeconds');
  if (maxIdle !== undefined) idlePolicy.maxIdleDurationSeconds = maxIdle;
  if (suspended !== undefined) idlePolicy.suspendedDurationSeconds = suspended;
  const input = { image, idlePolicy };
  const maxDuration = number(form, 'maximumDurationSeconds');
  if (maxDuration !== undefined) input.maximumDurationSeconds = maxDuration;
  await busy($('vm-start'), async () => {
    try {
      setStatus('vm-status', 'Starting: restoring the image’s snapshot…');
      const vm = await cocoon.microvms.start(input);
      if (vm.token) showToken(vm.id, vm.token, vm.tokenExpiresAt);
      await refresh();
      setStatus('vm-status', `Booting ${vm.id}…`);
      const running = await cocoon.microvms.waitForState(vm.id, ['RUNNING'], { timeoutMs: 10 * 60_000 });
      setStatus('vm-status', `${running.id} is RUNNING: open its app or copy a token.`, 'ok');
    } catch (error) {
      if (!handleAuthLoss(error)) setStatus('vm-status', message(error), 'error');
    }
    await refresh();
  });
}

async function lifecycle(id, action, button) {
  const doing = { suspend: 'Snapshotting', resume: 'Resuming', terminate: 'Terminating' }[action];
  await busy(button, async () => {
    try {
      setStatus('vm-status', `${doing} ${id}…`);
      if (action === 'terminate') await cocoon.microvms.terminate(id);
      else await cocoon.microvms[action](id);
      setStatus('vm-status', `${id}: ${action} done.`, 'ok');
    } catch (error) {
      if (!handleAuthLoss(error)) setStatus('vm-status', message(error), 'error');
    }
    await refresh();
  });
}

/** Fork: one new microVM that continues this one from now; its token is shown like a copied one. */
async function forkVm(id, button) {
  await busy(button, async () => {
    try {
      setStatus('vm-status', `Forking ${id}…`);
      const { items, sourcePausedMs } = await cocoon.microvms.fork(id, { count: 1 });
      const fork = items[0];
      if (fork?.token) showToken(fork.id, fork.token, fork.tokenExpiresAt);
      setStatus('vm-status', `Forked ${id} into ${fork?.id} (${fork?.state}); ${id} was paused ${sourcePausedMs} ms.`, 'ok');
    } catch (error) {
      if (!handleAuthLoss(error)) setStatus('vm-status', message(error), 'error');
    }
    await refresh();
  });
}

/** Checkpoint: a new version of the microVM's image, READY once its snapshot is committed. */
async function checkpointVm(id, button) {
  await busy(button, async () => {
    try {
      setStatus('vm-status', `Checkpointing ${id}…`);
      const image = await cocoon.microvms.checkpoint(id);
      const ready = await cocoon.images.waitUntilReady(image.id, { timeoutMs: 10 * 60_000 });
      setStatus('vm-status', `Checkpoint ${ready.name}:${ready.version} of ${id} is READY: start microVMs from it above.`, 'ok');
    } catch (error) {
      if (!handleAuthLoss(error)) setStatus('vm-status', message(error), 'error');
    }
    await refresh();
  });
}

function showToken(id, token, expiresAt) {
  $('token-box').hidden = false;
  $('token-vm').textContent = id;
  $('token-expires').textContent = expiresAt ? ago(expiresAt) : '';
  $('token-value').value = token;
}

async function copyToken(id, button) {
  await busy(button, async () => {
    try {
      const issued = await cocoon.tokens.create(id, {});
      showToken(id, issued.token, issued.expiresAt);
      try {
        await navigator.clipboard.writeText(issued.token);
        toast(`Token for ${id} copied (valid until ${new Date(issued.expiresAt).toLocaleTimeString()}).`);
      } catch {
        $('token-value').select();
        toast('The token is selected: press Ctrl+C (⌘C) to copy it.');
      }
    } catch (error) {
      if (!handleAuthLoss(error)) toast(message(error));
    }
  });
}

/** The gateway's address for a microVM: its own `url`, else built from the server's info. */
function appUrl(vm) {
  if (vm?.url) return vm.url.replace(/\/+$/, '');
  const port = info.gateway.port ? `:${info.gateway.port}` : '';
  return `${location.protocol}//${vm.id}.${info.gateway.domain}${port}`;
}

/**
 * Opens the app in a new tab through the gateway's browser flow: the first visit carries
 * `?cocoon_token=`, the gateway answers with an HttpOnly cookie for the microVM's host.
 * The tab is opened at once (a browser allows pop-ups only right after a click) and pointed
 * at the app once the token is made.
 */
async function openApp(id, button) {
  const tab = window.open('about:blank', '_blank');
  await busy(button, async () => {
    try {
      const row = [...$('vms-table').tBodies[0].rows].find((r) => r.dataset.id === id);
      const vm = row?.vm ?? (await cocoon.microvms.get(id));
      const issued = await cocoon.tokens.create(id, {});
      const url = `${appUrl(vm)}/?cocoon_token=${encodeURIComponent(issued.token)}`;
      if (tab) {
        tab.opener = null;
        tab.location.href = url;
      } else {
        showToken(id, issued.token, issued.expiresAt);
        toast('The browser blocked the new tab: allow pop-ups, or use the token below.');
      }
    } catch (error) {
      tab?.close();
      if (!handleAuthLoss(error)) toast(message(error));
    }
  });
}

// ---------------------------------------------------------------- start

$('sign-in-form').addEventListener('submit', async (event) => {
  event.preventDefault();
  const key = $('api-key').value.trim();
  if (!key) {
    $('sign-in-error').textContent = 'Enter an API key.';
    $('api-key').setAttribute('aria-invalid', 'true');
    $('api-key').focus();
    return;
  }
  await busy($('sign-in-button'), () => signIn(key));
});
$('sign-out').addEventListener('click', () => signOut());
$('terminal-close').addEventListener('click', () => closeTerminal());
$('upload-form').addEventListener('submit', (event) => {
  event.preventDefault();
  void busy($('upload-button'), () => uploadFile(cocoon, message));
});
$('download-form').addEventListener('submit', (event) => {
  event.preventDefault();
  void busy($('download-button'), () => downloadFile(cocoon, message));
});
$('image-form').addEventListener('submit', createImage);
$('vm-form').addEventListener('submit', startVm);
$('log-close').addEventListener('click', () => {
  logAbort?.abort();
  $('log-panel').hidden = true;
});
$('token-copy').addEventListener('click', async () => {
  $('token-value').select();
  try {
    await navigator.clipboard.writeText($('token-value').value);
    toast('Token copied.');
  } catch {
    toast('Press Ctrl+C (⌘C) to copy the selected token.');
  }
});
document.addEventListener('visibilitychange', () => {
  if (!document.hidden && cocoon) void refresh();
});

const saved = sessionStorage.getItem(KEY_STORAGE);
if (saved) void signIn(saved, { quiet: true });
else $('api-key').focus();
document.body.dataset.ready = 'true';
