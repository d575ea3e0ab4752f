import { createTestImage } from '../support/image.ts';
import { startTestServer, stopTestServer, request } from '../support/server.ts';
import { tempDir } from '../support/vm.ts';

const dataDir = tempDir('cocoon-exec-smoke-');
const s = await startTestServer({ dataDir });
try {
  const image = await createTestImage({ db: s.server.db, dataDir, tenantId: s.adminTenantId });
  const vm = await s.api('POST', '/microvms', { image: image.arn });
  console.log('vm', vm.status, vm.body.id);
  for (let i = 0; i < 100; i++) {
    const g = await s.api('GET', `/microvms/${vm.body.id}`);
    if (g.body.state === 'RUNNING') break;
    await new Promise((r) => setTimeout(r, 200));
  }
  const port = Number(new URL(s.server.apiUrl).port);
  const t0 = Date.now();
  const a = await request(port, { method: 'POST', path: `/api/v1/microvms/${vm.body.id}/exec`, headers: { authorization: `Bearer ${s.adminKey}`, 'content-type': 'application/json' }, body: JSON.stringify({ command: 'echo hello; echo err >&2; exit 3' }) });
  console.log(Date.now() - t0, 'ms', a.status, a.body);
  for (let i = 0; i < 5; i++) {
    const t1 = Date.now();
    const b = await request(port, { method: 'POST', path: `/api/v1/microvms/${vm.body.id}/exec`, headers: { authorization: `Bearer ${s.adminKey}`, 'content-type': 'application/json' }, body: JSON.stringify({ command: ['/bin/busybox', 'true'] }) });
    console.log(Date.now() - t1, 'ms', b.status, b.body.length);
  }
  const up = await request(port, { method: 'PUT', path: `/api/v1/microvms/${vm.body.id}/files?path=/tmp/x`, headers: { authorization: `Bearer ${s.adminKey}`, 'content-type': 'application/octet-stream' }, body: Buffer.alloc(5_000_000, 7) });
  console.log('up', up.status, up.body);
  const down = await request(port, { method: 'GET', path: `/api/v1/microvms/${vm.body.id}/files?path=/tmp/x`, headers: { authorization: `Bearer ${s.adminKey}` } });
  console.log('down', down.status, down.body.length, down.headers['content-length']);
  console.log(await s.api('GET', `/microvms/${vm.body.id}/files/list?path=/app`));
  console.log(await s.api('GET', `/microvms/${vm.body.id}/processes`));
} finally {
  console.log('leaked', await stopTestServer(s, dataDir));
}
