/** What a QEMU that failed to start, or was killed while starting, reports: read from its own log (qemu.log). */
import fs from 'node:fs';
import path from 'node:path';
import { CocoonError, errorMessage, isCocoonError } from '../../common/errors.ts';
import { isNoSpace } from '../snapshot-safety.ts';
import type { QemuLaunch } from './qemu-args.ts';

export function qemuStartError(runDir: string, launch: Pick<QemuLaunch, 'forwards' | 'incoming'> | undefined, vm?: { serialTail(lines?: number): string }): CocoonError {
  let output = '';
  try {
    output = fs.readFileSync(path.join(runDir, 'qemu.log'), 'utf8').trim().slice(-2000);
  } catch {
    // no log
  }
  if (/hostfwd|host forwarding rule/i.test(output)) {
    const ports = launch?.forwards.map((f) => f.hostPort).join(', ') ?? '';
    return new CocoonError('port_in_use', `QEMU could not listen on host port(s) ${ports}: ${output}`, { status: 409 });
  }
  if (launch?.incoming && /migration|load of/i.test(output)) {
    return new CocoonError('snapshot_corrupt', `QEMU could not load the snapshot (damaged, or made for another machine shape): ${output}`, {
      status: 422,
    });
  }
  const console = vm ? `\nlast console lines:\n${vm.serialTail(20)}` : '';
  return new CocoonError('vm_start_failed', `QEMU exited while starting: ${output || '(no output)'}${console}`);
}

/** `no_space` for an error that says the disk is full (a raw ENOSPC from a file operation). */
export function noSpaceError(error: unknown, id: string): CocoonError | undefined {
  if (isCocoonError(error, 'no_space') || !isNoSpace(error)) return undefined;
  return new CocoonError('no_space', `no space left on the data directory's disk to start ${id}: ${errorMessage(error)}`, {
    status: 507,
    cause: error,
  });
}

export function qemuKilledError(id: string, signal: string, restoring: boolean): CocoonError {
  return new CocoonError(
    'vm_killed',
    `QEMU of ${id} was killed by ${signal} while ${restoring ? 'restoring' : 'booting'} (from outside Cocoon: the OOM killer, an operator); ` +
      (restoring ? 'the snapshot is untouched and can be restored again' : 'try again'),
    { status: 503 },
  );
}
