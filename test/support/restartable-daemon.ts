/**
 * A data directory holding the test image and the admin key, served by one daemon process at a
 * time: for tests that kill the daemon at chosen points and start it again over the same files.
 */
import fs from 'node:fs';
import path from 'node:path';
import type { Image } from '../../src/store/images.ts';
import { openMetadataStore } from '../../src/store/open.ts';
import type { Database } from '../../src/store/sql.ts';
import { findTenantByName } from '../../src/store/tenants.ts';
import { spawnDaemon, type Daemon } from './daemon.ts';
import { createTestImage } from './image.ts';
import { apiClient, type ApiClient } from './server.ts';
import { cleanupDir } from './vm.ts';

export class RestartableDaemon {
  /** The daemon now running, if any. */
  current: Daemon | undefined;

  readonly dataDir: string;
  readonly db: Database;
  readonly image: Image;
  readonly adminKey: string;

  private constructor(parts: { dataDir: string; db: Database; image: Image; adminKey: string }) {
    this.dataDir = parts.dataDir;
    this.db = parts.db;
    this.image = parts.image;
    this.adminKey = parts.adminKey;
  }

  /** A first daemon makes the admin key; the image is made beside it through the same database. */
  static async prepare(dataDir: string): Promise<RestartableDaemon> {
    const first = await spawnDaemon(dataDir);
    try {
      const adminKey = fs.readFileSync(path.join(dataDir, 'admin-api-key'), 'utf8').trim();
      const db = (await openMetadataStore(dataDir)).db;
      const admin = await findTenantByName(db, 'admin');
      const image = await createTestImage({ db, dataDir, tenantId: admin!.id });
      return new RestartableDaemon({ dataDir, db, image, adminKey });
    } finally {
      await first.stop();
    }
  }

  async up(env: Record<string, string> = {}): Promise<{ api: ApiClient; d: Daemon }> {
    const d = await spawnDaemon(this.dataDir, env);
    this.current = d;
    return { api: apiClient(d.info.apiUrl, this.adminKey), d };
  }

  async down(how: 'kill' | 'stop'): Promise<void> {
    await (how === 'kill' ? this.current?.kill() : this.current?.stop());
    this.current = undefined;
  }

  /** Kills the daemon, closes the store, removes the directory; answers the QEMU pids a test left running (killed). */
  async close(): Promise<number[]> {
    await this.current?.kill();
    this.current = undefined;
    await this.db.close();
    return cleanupDir(this.dataDir);
  }
}
