// The dashboard's terminal and file transfer for one microVM. The terminal is xterm.js (served
// by this server from node_modules at /vendor/, loaded on first use) attached to a PTY over the
// exec WebSocket through the SDK: keystrokes go to the guest as typed, its output is written
// as it comes, and the terminal's size follows the panel (fit addon → resize). Files go up and
// down through the files API (a File is streamed up; a download becomes a Blob to save).

const $ = (id) => document.getElementById(id);

/** @type {{ vmId: string, term: any, fit: any, session: any, observer: ResizeObserver } | undefined} */
let current;
let xterm;

async function loadXterm() {
  xterm ??= Promise.all([import('/vendor/xterm.mjs'), import('/vendor/addon-fit.mjs')])
    .then(([{ Terminal }, { FitAddon }]) => ({ Terminal, FitAddon }));
  return xterm;
}

function setState(text, kind = '') {
  const badge = $('terminal-state');
  badge.textContent = text;
  badge.dataset.kind = kind;
}

function filesStatus(text, kind = '') {
  const node = $('files-status');
  node.textContent = text;
  node.dataset.kind = kind;
}

/** Ends the terminal shown now (its shell in the microVM ends with the connection). */
export function closeTerminal() {
  if (!current) return;
  const { term, session, observer } = current;
  current = undefined;
  observer.disconnect();
  try {
    session?.close();
  } catch {
    // already ended
  }
  term.dispose();
  $('terminal-panel').hidden = true;
}

/**
 * Opens a terminal on `vmId` in the panel: a PTY running the image's login shell, sized to the
 * panel. `describe` turns an error into a sentence for the user.
 */
export async function openTerminal(cocoon, vmId, describe) {
  closeTerminal();
  const panel = $('terminal-panel');
  panel.hidden = false;
  panel.dataset.vm = vmId;
  $('terminal-vm').textContent = vmId;
  $('download-path').value ||= '/etc/hostname';
  filesStatus('');
  setState('connecting…');
  const { Terminal, FitAddon } = await loadXterm();
  const container = $('terminal');
  container.replaceChildren();
  const term = new Terminal({
    cursorBlink: true,
    convertEol: false,
    fontFamily: 'ui-monospace, SFMono-Regular, Menlo, Consolas, monospace',
    fontSize: 14,
    scrollback: 5000,
    theme: { background: '#0b0d10', foreground: '#e7eaee' },
  });
  const fit = new FitAddon();
  term.loadAddon(fit);
  term.open(container);
  fit.fit();
  const mine = { vmId, term, fit, session: undefined, observer: new ResizeObserver(() => fit.fit()) };
  current = mine;
  mine.observer.observe(container);
  panel.scrollIntoView({ block: 'nearest' });

  try {
    const session = await cocoon.pty.open(vmId, {
      cols: term.cols,
      rows: term.rows,
      onData: (_text, bytes) => term.write(bytes),
    });
    if (current !== mine) {
      session.close();
      return;
    }
    mine.session = session;
    setState('connected', 'ok');
    term.onData((data) => {
      if (!session.done) void session.write(data);
    });
    term.onBinary((data) => {
      if (!session.done) void session.write(Uint8Array.from(data, (c) => c.charCodeAt(0)));
    });
    term.onResize(({ cols, rows }) => {
      if (!session.done) session.resize(cols, rows);
    });
    term.focus();
    const exit = await session.wait().catch((error) => ({ error }));
    if (current !== mine) return;
    if (exit.error) {
      setState('disconnected', 'error');
      term.write(`\r\n\x1b[31m[${describe(exit.error)}]\x1b[0m\r\n`);
    } else {
      const how = exit.exitCode !== null ? `exit ${exit.exitCode}` : `killed by ${exit.signal}`;
      setState(`ended: ${how}`);
      term.write(`\r\n[the shell ended: ${how}${exit.reason ? `, ${exit.reason}` : ''}]\r\n`);
    }
  } catch (error) {
    if (current !== mine) return;
    setState('failed', 'error');
    term.write(`\x1b[31m[cannot open a terminal: ${describe(error)}]\x1b[0m\r\n`);
  }
}

/** Uploads the chosen file into the folder typed beside it. */
export async function uploadFile(cocoon, describe) {
  const vmId = $('terminal-panel').dataset.vm;
  const file = $('upload-file').files[0];
  const folder = $('upload-dir').value.trim() || '/tmp';
  if (!file) {
    filesStatus('Choose a file to upload.', 'error');
    $('upload-file').focus();
    return;
  }
  if (!folder.startsWith('/')) {
    filesStatus('The folder is an absolute path in the microVM, e.g. /tmp.', 'error');
    $('upload-dir').focus();
    return;
  }
  const target = `${folder.replace(/\/+$/, '')}/${file.name}`;
  try {
    filesStatus(`Uploading ${file.name}…`);
    const stat = await cocoon.files.write(vmId, target, file);
    filesStatus(`Uploaded ${stat.path} (${stat.size} bytes).`, 'ok');
  } catch (error) {
    filesStatus(`Upload failed: ${describe(error)}`, 'error');
  }
}

/** Downloads the file at the typed path and hands it to the browser to save. */
export async function downloadFile(cocoon, describe) {
  const vmId = $('terminal-panel').dataset.vm;
  const path = $('download-path').value.trim();
  if (!path.startsWith('/')) {
    filesStatus('Type an absolute path in the microVM, e.g. /etc/hostname.', 'error');
    $('download-path').focus();
    return;
  }
  try {
    filesStatus(`Downloading ${path}…`);
    const blob = await cocoon.files.read(vmId, path, { format: 'blob' });
    const url = URL.createObjectURL(blob);
    const link = document.createElement('a');
    link.href = url;
    link.download = path.split('/').pop() || 'download';
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
    filesStatus(`Downloaded ${path} (${blob.size} bytes).`, 'ok');
  } catch (error) {
    filesStatus(`Download failed: ${describe(error)}`, 'error');
  }
}
