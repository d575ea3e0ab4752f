// Temporary: reproduce the gateway c32 stall after a previous round (not committed).
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { getMicrovm } from '../src/store/microvms.ts';
import { openMetadataStore } from '../src/store/open.ts';
import { findTenantByName } from '../src/store/tenants.ts';
import { spawnDaemon } from '../test/support/daemon.ts';
import { APP_PORT, createTestImage } from '../test/support/image.ts';
import { apiClient, gatewayRequest } from '../test/support/server.ts';
import { endDaemonRun } from './cleanup.ts';
import { runWrk } from './wrk.ts';

const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'cocoon-bench-stall-'));
const daemon = await spawnDaemon(dataDir, { COCOON_LOG_LEVEL: 'warn' });
const { db } = await openMetadataStore(dataDir);
try {
  const api = apiClient(daemon.info.apiUrl, fs.readFileSync(path.join(dataDir, 'admin-api-key'), 'utf8').trim());
  const admin = await findTenantByName(db, 'admin');
  const image = await createTestImage({ db, dataDir, tenantId: admin!.id, idle: true });
  const vm = (await api('POST', '/microvms', { image: image.id, idlePolicy: { maxIdleDurationSeconds: 3600 } })).body;
  await gatewayRequest(daemon.info.gatewayPort, vm.id, vm.token, '/', {});
  const ports = (await getMicrovm(db, vm.id))?.runtime.ports as Record<string, number>;
  const gw = { url: `http://127.0.0.1:${daemon.info.gatewayPort}/`, headers: [`Host: ${vm.id}.vm.localhost`, `X-Cocoon-Token: ${vm.token}`, `X-Cocoon-Port: ${APP_PORT}`] };
  const direct = { url: `http://127.0.0.1:${ports[String(APP_PORT)]}/`, headers: [] };
  const plan = (process.env.PLAN ?? 'g,g,g,d,g,g').split(',');
  for (const step of plan) {
    const t = step === 'g' ? gw : direct;
    const started = Date.now();
    const r = await runWrk({ ...t, connections: 32, seconds: 4 });
    console.log(`${step === 'g' ? 'gateway' : 'direct '} c32: ${r.rps.toFixed(0)} req/s, ${r.requests} requests, errors ${JSON.stringify(r.errors)}, non2xx ${r.non2xx} (${Date.now() - started} ms)`);
  }
} finally {
  console.log(daemon.output().split('\n').filter((l) => /warn|error/i.test(l)).slice(-15).join('\n'));
  await endDaemonRun({ daemon, db, dataDir });
}
