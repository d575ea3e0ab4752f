/** File-system steps that several roles need for crash safety (snapshots, image builds, forks). */
import fs from 'node:fs';

/**
 * fsyncs a directory, so that the renames and creations in it survive a host crash (a file's
 * own fsync does not cover its directory entry).
 */
export async function fsyncDir(dir: string): Promise<void> {
  const handle = await fs.promises.open(dir, 'r');
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}

/** fdatasyncs a file's content (not its metadata beyond what reading it back needs). */
export async function fsyncFile(file: string, mode: 'r' | 'r+' = 'r+'): Promise<void> {
  const handle = await fs.promises.open(file, mode);
  try {
    await handle.datasync();
  } finally {
    await handle.close();
  }
}
