/**
 * Saving and loading a VM's device state with QEMU's migration, through unix sockets that this
 * process serves. (QEMU 7.2 has no `file:` migration target, and `exec:` would need QEMU to
 * spawn a shell, which its seccomp sandbox forbids.) Guest RAM is mapped shared and skipped
 * (`x-ignore-shared`), so the stream is the device state alone: tens of kilobytes.
 */
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import { pipeline } from 'node:stream/promises';
import { CocoonError } from '../../common/errors.ts';
import type { QmpClient, QmpEvent } from './qmp.ts';
import { connectUnix } from '../../net/unix-socket.ts';

const CAPABILITIES = [
  { capability: 'x-ignore-shared', state: true },
  { capability: 'events', state: true },
];

/**
 * The QMP connections whose QEMU has the capabilities set already (a device state loaded or
 * saved through them, or awaited): QEMU keeps them, and only this module sets them, always the
 * same. A suspend of a restored VM then skips that QMP round trip (issue 12).
 */
const capabilitiesSet = new WeakSet<QmpClient>();

async function setCapabilities(qmp: QmpClient): Promise<void> {
  if (capabilitiesSet.has(qmp)) return;
  await qmp.execute('migrate-set-capabilities', { capabilities: CAPABILITIES });
  capabilitiesSet.add(qmp);
}

function migrationFinished(timeoutMs: number, qmp: QmpClient): Promise<QmpEvent> {
  return qmp.waitForEvent('MIGRATION', timeoutMs, (event) => {
    const status = event.data?.status;
    return status === 'completed' || status === 'failed' || status === 'cancelled';
  });
}

async function failureReason(qmp: QmpClient): Promise<string> {
  try {
    const info = await qmp.execute('query-migrate', {}, 2000);
    return info['error-desc'] ?? info.status ?? 'unknown';
  } catch {
    return 'QEMU went away';
  }
}

/**
 * Writes the paused VM's device state to `file` (fsynced unless `fsync: false`), returning its size and SHA-256.
 * The VM must be stopped first.
 */
export async function saveDeviceState(
  qmp: QmpClient,
  socketPath: string,
  file: string,
  timeoutMs = 30_000,
  options: { fsync?: boolean } = {},
): Promise<{ sizeBytes: number; sha256: string }> {
  const prepared = await prepareDeviceStateSave(qmp, socketPath, file, timeoutMs);
  return prepared.save(options);
}

/** A device-state save prepared ahead of the pause (`prepareDeviceStateSave`). */
export interface DeviceStateSave {
  /** Runs the migration (the VM stopped); fsyncs the file unless `fsync: false`. */
  save(options?: { fsync?: boolean }): Promise<{ sizeBytes: number; sha256: string }>;
  /** Closes the socket and the file without saving (idempotent). */
  cancel(): Promise<void>;
}

/**
 * The part of a device-state save that does not need the VM paused: `file` created, the socket
 * QEMU will write to listening, the migration capabilities set. A snapshot does it before it
 * pauses the VM (issue 12: beside the memory diff helper's start); `save` then runs the
 * migration (the VM must be stopped by then), `cancel` undoes the preparation.
 */
export async function prepareDeviceStateSave(
  qmp: QmpClient,
  socketPath: string,
  file: string,
  timeoutMs = 30_000,
): Promise<DeviceStateSave> {
  const hash = createHash('sha256');
  let sizeBytes = 0;
  const out = fs.createWriteStream(file, { flags: 'wx', mode: 0o600 });
  const sockets = new Set<net.Socket>();
  let writeError: Error | undefined;
  const written = new Promise<void>((resolve, reject) => {
    out.once('finish', resolve);
    out.once('error', (error) => {
      // A full disk: stop the migration at once (QEMU sees its socket close) and report this.
      writeError = error;
      for (const socket of sockets) socket.destroy();
      reject(error);
    });
  });
  written.catch(() => undefined); // reported below, not as an unhandled rejection
  const server = net.createServer((socket) => {
    sockets.add(socket);
    socket.on('data', (chunk: Buffer) => {
      if (writeError) return;
      hash.update(chunk);
      sizeBytes += chunk.length;
      if (!out.write(chunk)) socket.pause();
    });
    out.on('drain', () => socket.resume());
    socket.once('end', () => out.end());
    socket.once('error', (error) => out.destroy(error));
  });
  const close = async () => {
    server.close();
    if (!out.closed) out.destroy();
    await fs.promises.rm(socketPath, { force: true });
  };
  try {
    await fs.promises.rm(socketPath, { force: true }); // left by a process that died mid-snapshot
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(socketPath, resolve);
    });
    // QEMU may run as another user: connecting takes write permission on the socket. Only
    // QEMU and root can reach it anyway (its directory is QEMU's, 0700).
    await fs.promises.chmod(socketPath, 0o666);
    await setCapabilities(qmp);
  } catch (error) {
    await close();
    throw error;
  }
  return {
    cancel: close,
    save: async (options = {}) => {
      try {
        const finished = migrationFinished(timeoutMs, qmp);
        finished.catch(() => undefined); // if `migrate` fails first, its error is the one reported
        await qmp.execute('migrate', { uri: `unix:${socketPath}` });
        const event = await finished;
        if (writeError) throw writeError;
        if (event.data?.status !== 'completed') {
          throw new CocoonError('snapshot_failed', `QEMU could not save the VM state: ${await failureReason(qmp)}`);
        }
        await written;
        // A fork point fsyncs later, once the VM runs again.
        if (options.fsync !== false) await fsyncPath(file);
        return { sizeBytes, sha256: hash.digest('hex') };
      } finally {
        await close();
      }
    },
  };
}

async function fsyncPath(file: string): Promise<void> {
  const handle = await fs.promises.open(file, 'r');
  try {
    await handle.datasync();
  } finally {
    await handle.close();
  }
}

/**
 * Makes a QEMU started with `-incoming defer` listen for its device state on `socketPath`
 * (relative: to QEMU's working directory). A QEMU started ahead (pool.ts) does it while it
 * waits, so that a restore's `loadDeviceState({ listening: true })` only sends the state.
 */
export async function listenForDeviceState(qmp: QmpClient, socketPath: string): Promise<void> {
  await setCapabilities(qmp);
  await qmp.execute('migrate-incoming', { uri: `unix:${socketPath}` });
}

/**
 * Feeds a saved device state into a QEMU started with `-incoming defer`. `listening`: QEMU
 * listens on `socketPath` already (`listenForDeviceState`). `inline`: the file (tens of
 * kilobytes) read in one call and the socket removed at once, not through the thread pool.
 */
export async function loadDeviceState(
  qmp: QmpClient,
  socketPath: string,
  file: string,
  timeoutMs = 30_000,
  options: { listening?: boolean; inline?: boolean } = {},
): Promise<void> {
  const bytes = options.inline ? fs.readFileSync(file) : undefined;
  if (!options.listening) await setCapabilities(qmp);
  const finished = migrationFinished(timeoutMs, qmp);
  finished.catch(() => undefined); // if a step below fails first (QEMU gone), its error is the one reported
  if (!options.listening) await qmp.execute('migrate-incoming', { uri: `unix:${socketPath}` });
  const socket = await connectUnix(socketPath, 5000);
  socket.on('error', () => undefined); // QEMU going away resets it, also after the pipeline is done with it
  const sent = bytes
    ? new Promise<void>((resolve) => {
        socket.once('close', () => resolve()); // (destroyed before its end was written: QEMU stopped reading)
        socket.end(bytes, () => resolve());
      })
    : pipeline(fs.createReadStream(file), socket).catch(() => undefined); // QEMU may close early on a bad stream
  const event = await finished.finally(() => socket.destroy());
  await sent;
  if (bytes) fs.rmSync(socketPath, { force: true });
  else await fs.promises.rm(socketPath, { force: true });
  if (event.data?.status !== 'completed') {
    throw new CocoonError(
      'snapshot_corrupt',
      `QEMU could not load the snapshot's device state (${await failureReason(qmp)}); the snapshot is damaged or was made by another machine shape`,
      { status: 422 },
    );
  }
}
