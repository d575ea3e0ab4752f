/**
 * Exec on images built by the real pipeline (buildah, FROM busybox and FROM
 * debian:bookworm-slim, seeded locally): an image with "port": null becomes READY once its
 * workload runs and is driven by exec alone (gateway HTTP → 409 no_app_port); a Debian image
 * runs commands as its USER by default, by name with `user`, and through a shell string.
 * One server and two image builds for the whole file.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { loadConfig } from '../../src/config/config.ts';
import { imagesModule } from '../../src/wiring/images.ts';
import { microvmModule } from '../../src/wiring/microvms.ts';
import { startServer, type RunningServer } from '../../src/server.ts';
import { client, makeBundle, type Client } from '../images/helpers.ts';
import { gatewayRequest } from '../support/server.ts';
import { cleanupDir, tempDir } from '../support/vm.ts';
import { apiPort, execCall } from './helpers.ts';

const BUILD = { timeout: 900_000 };

describe('exec on pipeline-built images (busybox with port null, Debian)', () => {
  const dataDir = tempDir('cocoon-exec-img-');
  let server: RunningServer;
  let microvms: ReturnType<typeof microvmModule>;
  let api: Client;
  let key: string;
  const started: string[] = [];

  before(async () => {
    microvms = microvmModule();
    server = await startServer({ ...loadConfig({ COCOON_DATA_DIR: dataDir }), apiPort: 0, gatewayPort: 0 }, [imagesModule(), microvms]);
    key = fs.readFileSync(path.join(dataDir, 'admin-api-key'), 'utf8').trim();
    api = client(server.apiUrl, key);
  });
  after(async () => {
    for (const id of started) await api.delete(`/microvms/${id}`).catch(() => undefined);
    await server?.close();
    assert.deepEqual(cleanupDir(dataDir), [], 'no QEMU left');
  });

  async function build(name: string, files: Record<string, string>, extra: Record<string, unknown> = {}): Promise<any> {
    const upload = await api.uploadBundle(await makeBundle(files));
    assert.equal(upload.status, 201, upload.text);
    const created = await api.post('/images', { name, bundle: upload.body.uri, ...extra });
    assert.equal(created.status, 202, created.text);
    const image = await api.waitForState(created.body.id, ['READY', 'FAILED'], 850_000);
    assert.equal(image.state, 'READY', image.error);
    return image;
  }
  async function startVm(image: string): Promise<any> {
    const vm = await api.post('/microvms', { image });
    assert.equal(vm.status, 201, vm.text);
    started.push(vm.body.id);
    for (let i = 0; i < 1200 && (await api.get(`/microvms/${vm.body.id}`)).body.state !== 'RUNNING'; i++) await new Promise((r) => setTimeout(r, 100));
    return vm.body;
  }

  test('an image with "port": null becomes READY and is driven by exec alone; gateway HTTP answers 409 no_app_port', BUILD, async () => {
    const image = await build('sandbox', { Dockerfile: 'FROM busybox\nCMD ["sleep", "infinity"]\n' }, { port: null });
    assert.equal(image.port, null);
    const vm = await startVm(image.id);
    assert.equal(vm.port, null);
    const r = await execCall(apiPort(server.apiUrl), key, vm.id, { command: 'echo $((6*7)); ls /bin/busybox' });
    assert.equal(r.stdout, '42\n/bin/busybox\n');
    assert.equal(r.exit?.exitCode, 0);
    const http = await gatewayRequest(microvms.gatewayPort, vm.id, vm.token, '/');
    assert.equal(http.status, 409);
    assert.equal(JSON.parse(http.body).error.code, 'no_app_port');
  });

  test('a Debian image: its USER by default, another user by name, a shell string, a binary file round trip', BUILD, async () => {
    const image = await build('debian-exec', {
      Dockerfile: [
        'FROM debian:bookworm-slim',
        'RUN useradd -m -u 1234 app',
        'USER app',
        'WORKDIR /home/app',
        'CMD ["sleep", "infinity"]',
        '',
      ].join('\n'),
    }, { port: null });
    const vm = await startVm(image.id);
    const port = apiPort(server.apiUrl);
    const who = await execCall(port, key, vm.id, { command: ['id', '-un'] });
    assert.equal(who.stdout, 'app\n', "the image's USER");
    const pwd = await execCall(port, key, vm.id, { command: 'pwd; echo $HOME' });
    assert.equal(pwd.stdout, '/home/app\n/home/app\n');
    const root = await execCall(port, key, vm.id, { command: ['id', '-u'], user: 'root' });
    assert.equal(root.stdout, '0\n');
    const bytes = Buffer.from(Array.from({ length: 4096 }, (_, i) => i % 256));
    const up = await api.call('PUT', `/microvms/${vm.id}/files?path=/home/app/blob.bin`, bytes, { 'content-type': 'application/octet-stream' });
    assert.equal(up.status, 201, up.text);
    assert.equal(up.body.uid, 1234, 'uploaded files belong to the image USER');
    const sum = await execCall(port, key, vm.id, { command: 'sha256sum /home/app/blob.bin | cut -d" " -f1' });
    const { createHash } = await import('node:crypto');
    assert.equal(sum.stdout.trim(), createHash('sha256').update(bytes).digest('hex'));
    const down = await fetch(`${server.apiUrl}/api/v1/microvms/${vm.id}/files?path=/home/app/blob.bin`, { headers: { authorization: `Bearer ${key}` } });
    assert.deepEqual(Buffer.from(await down.arrayBuffer()), bytes);
  });
});
