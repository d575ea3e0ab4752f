/**
 * Fork and checkpoint through the CLI (`cocoon vm fork [--suspended]`, `cocoon vm checkpoint`) and the SDK
 * (`microvms.fork`, `microvms.checkpoint`), against a real server with every default module and
 * real QEMU. One test image (test/support/image.ts, no buildah) for the file.
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { Cocoon } from '../../packages/sdk/src/index.ts';
import { microvmDir } from '../../src/lifecycle/paths.ts';
import { findTenantByName } from '../../src/store/tenants.ts';
import { createTestImage } from '../support/image.ts';
import { qemuProcessesMentioning } from '../support/vm.ts';
import { cocoon, startTestServer, type TestServer } from './helpers.ts';

let server: TestServer;
let flags: string[];
let imageId: string;
let sdk: Cocoon;

before(async () => {
  server = await startTestServer();
  flags = ['--api-url', server.url, '--api-key', server.adminKey];
  const admin = await findTenantByName(server.server.db, 'admin');
  imageId = (await createTestImage({ db: server.server.db, dataDir: server.dataDir, tenantId: admin!.id, idle: true })).id;
  sdk = new Cocoon({ apiUrl: server.url, apiKey: server.adminKey });
});
after(async () => {
  await server?.close();
});

describe('fork and checkpoint through the surfaces', () => {
  it('CLI: vm fork --count 2 continues the app in each fork; vm checkpoint [name] makes a READY image that starts there', async () => {
    const started = await cocoon([...flags, 'vm', 'start', imageId, '--json', '--max-idle', '600']);
    assert.equal(started.code, 0, started.stderr);
    const id = started.json.id as string;
    const curl = async (vm: string, route: string) => {
      const answer = await cocoon([...flags, 'vm', 'curl', vm, route]);
      assert.equal(answer.code, 0, `${answer.stdout}\n${answer.stderr}`);
      return answer.stdout.trim();
    };
    assert.equal(await curl(id, '/cgi-bin/count'), '1');

    const human = await cocoon([...flags, 'vm', 'fork', id]);
    assert.equal(human.code, 0, human.stderr);
    assert.match(human.stdout, new RegExp(`✓ 1 fork of ${id} \\(the source was paused [\\d.]+ ms\\)`));
    assert.match(human.stdout, /mvm-[0-9a-z]+ +RUNNING/);
    const single = /(mvm-[0-9a-z]+) +RUNNING/.exec(human.stdout)![1]!;
    assert.match(human.stdout, new RegExp(`Next:\\n {2}cocoon vm curl ${single} /`));

    const forked = await cocoon([...flags, 'vm', 'fork', id, '--count', '2', '--json']);
    assert.equal(forked.code, 0, forked.stderr);
    assert.equal(forked.json.items.length, 2);
    for (const fork of forked.json.items) {
      assert.equal(fork.state, 'RUNNING');
      assert.equal(await curl(fork.id, '/cgi-bin/count'), '2', 'each fork goes on from the source');
    }
    assert.equal(await curl(single, '/cgi-bin/count'), '2');
    assert.equal(await curl(id, '/cgi-bin/count'), '2', 'and so does the source, on its own');
    assert.equal((await cocoon([...flags, 'vm', 'fork', id, '--count', '17'])).code, 2, 'out of range: a usage error');

    const checkpoint = await cocoon([...flags, 'vm', 'checkpoint', id, 'cli-saved']);
    assert.equal(checkpoint.code, 0, checkpoint.stderr);
    assert.match(checkpoint.stdout, /✓ arn:cocoon:local-1:\d{12}:microvm-image\/cli-saved:1 is READY\nNext:\n {2}cocoon vm start img-[0-9a-z]+/);
    const saved = /cocoon vm start (img-[0-9a-z]+)/.exec(checkpoint.stdout)![1]!;
    const fromCheckpoint = await cocoon([...flags, 'vm', 'start', saved, '--json']);
    assert.equal(fromCheckpoint.code, 0, fromCheckpoint.stderr);
    assert.equal(await curl(fromCheckpoint.json.id, '/cgi-bin/count'), '3', 'it starts where the source was');

    for (const vm of [id, single, fromCheckpoint.json.id, ...forked.json.items.map((f: { id: string }) => f.id)]) {
      assert.equal((await cocoon([...flags, 'vm', 'terminate', vm])).code, 0);
    }
  });

  it('CLI: vm fork --suspended leaves the forks SUSPENDED (no QEMU); each wakes where the source was', async () => {
    const started = await cocoon([...flags, 'vm', 'start', imageId, '--json', '--max-idle', '600']);
    assert.equal(started.code, 0, started.stderr);
    const id = started.json.id as string;
    const created = [id];
    try {
      const curl = async (vm: string, route: string) => {
        const answer = await cocoon([...flags, 'vm', 'curl', vm, route]);
        assert.equal(answer.code, 0, `${answer.stdout}\n${answer.stderr}`);
        return answer.stdout.trim();
      };
      assert.equal(await curl(id, '/cgi-bin/count'), '1');

      const human = await cocoon([...flags, 'vm', 'fork', id, '--suspended']);
      assert.equal(human.code, 0, human.stderr);
      const single = /(mvm-[0-9a-z]+) +SUSPENDED/.exec(human.stdout)?.[1];
      assert.ok(single, human.stdout);
      created.push(single);
      assert.match(human.stdout, new RegExp(`Wake one: cocoon vm resume ${single} \\(or send it a request: cocoon vm curl ${single} /\\)`));

      const forked = await cocoon([...flags, 'vm', 'fork', id, '--count', '2', '--suspended', '--json']);
      assert.equal(forked.code, 0, forked.stderr);
      const ids = (forked.json.items as { id: string; state: string; token: string }[]).map((f) => f.id);
      created.push(...ids);
      assert.equal(ids.length, 2);
      for (const fork of forked.json.items) {
        assert.equal(fork.state, 'SUSPENDED');
        assert.ok(fork.token, 'each fork has its own first token');
      }
      for (const fork of [single, ...ids]) {
        const got = await cocoon([...flags, 'vm', 'get', fork, '--json']);
        assert.equal(got.code, 0, got.stderr);
        assert.equal(got.json.state, 'SUSPENDED', 'still suspended: nothing woke it');
        assert.deepEqual(qemuProcessesMentioning(microvmDir(server.dataDir, fork)), [], `${fork} runs no QEMU`);
      }

      // One wakes on a request through the gateway, one through `vm resume`: both go on from the source.
      assert.equal(await curl(ids[0]!, '/cgi-bin/count'), '2');
      const resumed = await cocoon([...flags, 'vm', 'resume', ids[1]!]);
      assert.equal(resumed.code, 0, resumed.stderr);
      assert.equal(await curl(ids[1]!, '/cgi-bin/count'), '2');
      assert.equal(await curl(id, '/cgi-bin/count'), '2', 'the source goes on on its own');
      assert.deepEqual(qemuProcessesMentioning(microvmDir(server.dataDir, single)), [], 'the fork nobody asked for still runs no QEMU');
    } finally {
      for (const vm of created) await cocoon([...flags, 'vm', 'terminate', vm]);
    }
  });

  it('SDK: microvms.fork and microvms.checkpoint', async () => {
    const vm = await sdk.microvms.start({ image: imageId, idlePolicy: { maxIdleDurationSeconds: 600 } });
    await sdk.microvms.waitForState(vm.id, 'RUNNING');
    const count = async (id: string, token?: string) => (await (await sdk.microvms.fetch(id, '/cgi-bin/count', token ? { token } : {})).text()).trim();
    assert.equal(await count(vm.id, vm.token!), '1');
    const { items, sourcePausedMs } = await sdk.microvms.fork(vm.id, { count: 2, idlePolicy: { maxIdleDurationSeconds: 120 } });
    assert.equal(items.length, 2);
    assert.ok(sourcePausedMs > 0);
    for (const fork of items) {
      assert.equal(fork.idlePolicy.maxIdleDurationSeconds, 120, 'its own idle policy');
      assert.equal(await count(fork.id, fork.token!), '2');
    }
    const image = await sdk.microvms.checkpoint(vm.id);
    assert.equal(image.state, 'SNAPSHOTTING');
    const ready = await sdk.images.waitUntilReady(image.id, { timeoutMs: 120_000 });
    assert.equal(ready.state, 'READY');
    const restarted = await sdk.microvms.start({ image: ready.arn });
    await sdk.microvms.waitForState(restarted.id, 'RUNNING');
    assert.equal(await count(restarted.id, restarted.token!), '2');
    for (const id of [vm.id, restarted.id, ...items.map((f) => f.id)]) await sdk.microvms.terminate(id);
  });
});
