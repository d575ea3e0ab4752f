/**
 * This host's default identity: a random id kept in the data directory (`<dataDir>/host-id`),
 * made on first start. It belongs to the data directory, not to its path, so a data directory
 * that is moved or mounted elsewhere keeps its microVMs; COCOON_HOST_ID overrides it.
 */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { HOST_ID_PATTERN } from '../common/settings.ts';

export function dataDirHostId(dataDir: string): string {
  const file = path.join(dataDir, 'host-id');
  const read = (): string | undefined => {
    try {
      const id = fs.readFileSync(file, 'utf8').trim();
      return HOST_ID_PATTERN.test(id) ? id : undefined;
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw error;
    }
  };
  const existing = read();
  if (existing) return existing;
  fs.mkdirSync(dataDir, { recursive: true });
  const id = `host-${randomBytes(8).toString('hex')}`;
  try {
    // 'wx': a process starting beside this one may have written its id first; then that one holds.
    fs.writeFileSync(file, `${id}\n`, { flag: 'wx', mode: 0o644 });
    return id;
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== 'EEXIST') throw error;
    const other = read();
    if (!other) throw new Error(`${file} holds no valid host id; remove it or set COCOON_HOST_ID`, { cause: error });
    return other;
  }
}
