/**
 * Fork and checkpoint with real QEMU, a real server and real HTTP through the real gateway:
 * forks continue the source's memory, disk and processes independently, with fresh RNG state;
 * the source runs on; a SUSPENDED source is forked without waking; a checkpoint image starts
 * microVMs exactly where the source was. One test image for the file.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { before, describe, test } from 'node:test';
import { microvmDir } from '../../src/lifecycle/paths.ts';
import { getImage, type Image } from '../../src/store/images.ts';
import { useTestImageServer } from '../support/fixtures.ts';
import { TESTAPP_PORT } from '../support/image.ts';
import type { TestServer } from '../support/server.ts';
import { qemuProcessesMentioning } from '../support/vm.ts';

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

interface Started {
  id: string;
  token: string;
}

describe('fork and checkpoint', () => {
  const fixture = useTestImageServer({
    prefix: 'cocoon-fork-',
    image: { hooks: { resume: { command: 'echo resumed >> /tmp/hooks.log', timeoutSeconds: 10 } } },
  });
  const dataDir = fixture.dataDir;
  let s: TestServer;
  let image: Image;
  before(() => ({ server: s, image } = fixture));

  async function start(imageRef: string = image.arn): Promise<Started> {
    const answer = await s.api('POST', '/microvms', { image: imageRef, idlePolicy: { maxIdleDurationSeconds: 600 } });
    assert.equal(answer.status, 201, JSON.stringify(answer.body));
    return { id: answer.body.id, token: answer.body.token };
  }

  const counter = (vm: Started) => s.get(vm.id, vm.token, '/count', { port: TESTAPP_PORT });

  async function fork(id: string, count: number): Promise<{ forks: Started[]; body: Record<string, any> }> {
    const answer = await s.api('POST', `/microvms/${id}/fork`, { count });
    assert.equal(answer.status, 201, JSON.stringify(answer.body));
    assert.equal(answer.body.items.length, count);
    return { forks: answer.body.items.map((item: Record<string, string>) => ({ id: item.id, token: item.token })), body: answer.body };
  }

  test('fork of 3: each continues the counter on its own, fresh randomness, disk copy-on-write, the source runs on', async () => {
    const source = await start();
    assert.equal(await counter(source), '1');
    assert.equal(await counter(source), '2');
    assert.equal(await counter(source), '3');
    assert.equal(await s.get(source.id, source.token, '/cgi-bin/write?before-fork'), 'written');
    const bgBefore = await s.get(source.id, source.token, '/cgi-bin/bg');

    const { forks, body } = await fork(source.id, 3);
    assert.ok(typeof body.sourcePausedMs === 'number' && body.sourcePausedMs > 0, `the source's pause is reported: ${body.sourcePausedMs}`);
    const ids = new Set([source.id, ...forks.map((f) => f.id)]);
    assert.equal(ids.size, 4, 'every fork is a microVM of its own');
    for (const item of body.items) {
      assert.equal(item.state, 'RUNNING');
      assert.equal(item.image, image.arn);
      assert.match(item.token, /^cocoon_tk_/);
      assert.equal(item.idlePolicy.maxIdleDurationSeconds, 600, "the source's idle policy");
    }
    // Every fork and the source run in a QEMU of their own.
    for (const id of ids) assert.equal(qemuProcessesMentioning(microvmDir(dataDir, id)).length, 1, id);

    // The in-memory counter: every fork continues from 3, independently of the others and the source.
    assert.equal(await counter(forks[0]!), '4');
    assert.equal(await counter(forks[0]!), '5');
    assert.equal(await counter(forks[1]!), '4');
    assert.equal(await counter(source), '4', 'the source keeps serving, from its own state');
    assert.equal(await counter(forks[2]!), '4');
    assert.equal(await counter(forks[1]!), '5');
    assert.equal(await counter(source), '5');

    // The fork point was restored unverified (made moments ago); its checksums follow in the background.
    for (const f of forks) {
      const manifest = path.join(microvmDir(dataDir, f.id), 'gen-1', 'manifest.json');
      let files: Record<string, { checksum?: { value: string } }> = {};
      for (let i = 0; i < 300 && !files.mem?.checksum; i++, await sleep(100)) files = JSON.parse(fs.readFileSync(manifest, 'utf8')).files;
      assert.match(files.mem?.checksum?.value ?? '', /^[0-9a-f]{16}$/, `${f.id}: the memory's checksum`);
      assert.match(files.disk?.checksum?.value ?? '', /^[0-9a-f]{16}$/, `${f.id}: the disk's checksum`);
    }

    // The same background process goes on in every fork (processes were forked, not restarted).
    const pid = /^running (\d+) /.exec(bgBefore)?.[1];
    assert.ok(pid, bgBefore);
    for (const f of forks) assert.match(await s.get(f.id, f.token, '/cgi-bin/bg'), new RegExp(`^running ${pid} `));

    // Fresh RNG state in every fork: their /dev/urandom bytes differ.
    const randoms = await Promise.all([source, ...forks].map((vm) => s.get(vm.id, vm.token, '/cgi-bin/random')));
    for (const r of randoms) assert.match(r, /^[0-9a-f]{64}$/);
    assert.equal(new Set(randoms).size, randoms.length, `random bytes repeat across forks: ${randoms.join(' ')}`);

    // Files: written before the fork in every one; written after only where written.
    for (const vm of [source, ...forks]) assert.equal(await s.get(vm.id, vm.token, '/cgi-bin/file'), 'before-fork', vm.id);
    assert.equal(await s.get(forks[0]!.id, forks[0]!.token, '/cgi-bin/write?fork-0'), 'written');
    assert.equal(await s.get(source.id, source.token, '/cgi-bin/write?source-after'), 'written');
    assert.equal(await s.get(forks[0]!.id, forks[0]!.token, '/cgi-bin/file'), 'fork-0');
    assert.equal(await s.get(forks[1]!.id, forks[1]!.token, '/cgi-bin/file'), 'before-fork');
    assert.equal(await s.get(forks[2]!.id, forks[2]!.token, '/cgi-bin/file'), 'before-fork');
    assert.equal(await s.get(source.id, source.token, '/cgi-bin/file'), 'source-after');

    // Each fork has its own token: one fork's token opens no other microVM.
    const other = await s.api('GET', `/microvms/${forks[1]!.id}`);
    assert.equal(other.body.state, 'RUNNING');
    await assert.rejects(s.get(forks[1]!.id, forks[0]!.token, '/'), /40[13]/);

    // A fork is independent of its source: the source terminated, the forks run on, suspend and wake.
    assert.equal((await s.api('DELETE', `/microvms/${source.id}`)).status, 204);
    assert.equal(fs.existsSync(microvmDir(dataDir, source.id)), false);
    assert.equal(await counter(forks[2]!), '5');
    const suspended = await s.api('POST', `/microvms/${forks[2]!.id}/suspend`);
    assert.equal(suspended.body.state, 'SUSPENDED');
    assert.equal(await counter(forks[2]!), '6', 'woken by the request, memory intact');
    assert.equal(await s.get(forks[2]!.id, forks[2]!.token, '/cgi-bin/file'), 'before-fork');
    for (const f of forks) assert.equal((await s.api('DELETE', `/microvms/${f.id}`)).status, 204);
  });

  test('a SUSPENDED microVM is forked from its snapshot without waking; fork of a fork works', async () => {
    const source = await start();
    assert.equal(await counter(source), '1');
    assert.equal(await s.get(source.id, source.token, '/cgi-bin/write?suspended-state'), 'written');
    assert.equal((await s.api('POST', `/microvms/${source.id}/suspend`)).body.state, 'SUSPENDED');
    // Twice suspended: its disk is a chain of two layers, which the fork point must not depend on.
    assert.equal(await counter(source), '2');
    assert.equal((await s.api('POST', `/microvms/${source.id}/suspend`)).body.state, 'SUSPENDED');

    const { forks, body } = await fork(source.id, 1);
    assert.equal(body.sourcePausedMs, 0);
    assert.equal((await s.api('GET', `/microvms/${source.id}`)).body.state, 'SUSPENDED', 'the source was not woken');
    assert.deepEqual(qemuProcessesMentioning(microvmDir(dataDir, source.id)), []);
    const child = forks[0]!;
    assert.equal(await counter(child), '3');
    assert.equal(await s.get(child.id, child.token, '/cgi-bin/file'), 'suspended-state');

    // The source is terminated: the fork's disk stands on the image, not on the source's generations.
    assert.equal((await s.api('DELETE', `/microvms/${source.id}`)).status, 204);
    const grandchildren = await fork(child.id, 2);
    const [a, b] = grandchildren.forks as [Started, Started];
    assert.equal(await counter(a), '4');
    assert.equal(await counter(b), '4');
    assert.equal(await counter(child), '4');
    assert.equal(await s.get(b.id, b.token, '/cgi-bin/file'), 'suspended-state');
    for (const vm of [child, a, b]) assert.equal((await s.api('DELETE', `/microvms/${vm.id}`)).status, 204);
  });

  test('forks left SUSPENDED: committed without a QEMU, each wakes on its own request and continues the source', async () => {
    const source = await start();
    assert.equal(await counter(source), '1');
    assert.equal(await s.get(source.id, source.token, '/cgi-bin/write?kept-suspended'), 'written');
    assert.equal((await s.api('POST', `/microvms/${source.id}/suspend`)).body.state, 'SUSPENDED');

    const answer = await s.api('POST', `/microvms/${source.id}/fork`, { count: 3, suspended: true });
    assert.equal(answer.status, 201, JSON.stringify(answer.body));
    assert.equal(answer.body.sourcePausedMs, 0);
    const forks: Started[] = answer.body.items.map((item: Record<string, string>) => ({ id: item.id, token: item.token }));
    for (const item of answer.body.items) assert.equal(item.state, 'SUSPENDED', JSON.stringify(item));
    for (const vm of [source, ...forks]) {
      assert.deepEqual(qemuProcessesMentioning(microvmDir(dataDir, vm.id)), [], `${vm.id} runs no QEMU`);
      assert.equal((await s.api('GET', `/microvms/${vm.id}`)).body.state, 'SUSPENDED');
    }
    // Committed before the answer: a complete manifest (checksums) in each fork's own generation 1.
    for (const f of forks) {
      const { files } = JSON.parse(fs.readFileSync(path.join(microvmDir(dataDir, f.id), 'gen-1', 'manifest.json'), 'utf8'));
      assert.match(files.mem?.checksum?.value ?? '', /^[0-9a-f]{16}$/, `${f.id}: the memory's checksum`);
      assert.match(files.disk?.checksum?.value ?? '', /^[0-9a-f]{16}$/, `${f.id}: the disk's checksum`);
    }

    // The source is terminated; each fork wakes on its own request from the source's state.
    assert.equal((await s.api('DELETE', `/microvms/${source.id}`)).status, 204);
    assert.equal(await counter(forks[0]!), '2');
    assert.equal(await counter(forks[0]!), '3');
    assert.equal(await counter(forks[1]!), '2');
    assert.equal(await s.get(forks[1]!.id, forks[1]!.token, '/cgi-bin/file'), 'kept-suspended');
    await assert.rejects(s.get(forks[2]!.id, forks[0]!.token, '/'), /40[13]/);
    assert.equal((await s.api('GET', `/microvms/${forks[2]!.id}`)).body.state, 'SUSPENDED', 'untouched until asked');
    assert.equal((await s.api('POST', `/microvms/${forks[2]!.id}/resume`)).body.state, 'RUNNING');
    assert.equal(await counter(forks[2]!), '2');

    // A RUNNING source: its fork is left SUSPENDED too, and the source runs on.
    const running = forks[0]!;
    const again = await s.api('POST', `/microvms/${running.id}/fork`, { suspended: true });
    assert.equal(again.status, 201, JSON.stringify(again.body));
    const child: Started = { id: again.body.items[0].id, token: again.body.items[0].token };
    assert.equal(again.body.items[0].state, 'SUSPENDED');
    assert.deepEqual(qemuProcessesMentioning(microvmDir(dataDir, child.id)), []);
    assert.equal(await counter(running), '4');
    assert.equal(await counter(child), '4');
    for (const vm of [...forks, child]) assert.equal((await s.api('DELETE', `/microvms/${vm.id}`)).status, 204);
  });

  test('checkpoint: a new image version READY once committed; microVMs from it start exactly there', async () => {
    const source = await start();
    assert.equal(await counter(source), '1');
    assert.equal(await counter(source), '2');
    assert.equal(await s.get(source.id, source.token, '/cgi-bin/write?checkpointed'), 'written');
    const answer = await s.api('POST', `/microvms/${source.id}/checkpoint`, {});
    assert.equal(answer.status, 202, JSON.stringify(answer.body));
    assert.equal(answer.body.name, image.name, "a new version of the source image's name");
    assert.equal(answer.body.version, image.version + 1);
    assert.ok(['SNAPSHOTTING', 'READY'].includes(answer.body.state));
    const imageId = answer.body.id as string;
    let checkpoint: Image | undefined;
    for (let i = 0; i < 600; i++) {
      checkpoint = await getImage(s.server.db, imageId);
      if (checkpoint?.state === 'READY' || checkpoint?.state === 'FAILED') break;
      await sleep(100);
    }
    assert.equal(checkpoint?.state, 'READY', checkpoint?.error ?? '');
    // The source goes on from where it was; the checkpoint does not.
    assert.equal(await counter(source), '3');
    assert.equal(await s.get(source.id, source.token, '/cgi-bin/write?after-checkpoint'), 'written');

    const first = await start(checkpoint!.arn);
    const second = await start(checkpoint!.id);
    assert.equal(await counter(first), '3', 'the counter as it was at the checkpoint');
    assert.equal(await counter(second), '3');
    assert.equal(await counter(first), '4');
    assert.equal(await s.get(first.id, first.token, '/cgi-bin/file'), 'checkpointed');
    const [r1, r2] = await Promise.all([first, second].map((vm) => s.get(vm.id, vm.token, '/cgi-bin/random')));
    assert.notEqual(r1, r2, 'microVMs of one checkpoint get fresh randomness');

    // Named checkpoint: version 1 of a new name, standing alone when the source's image is gone.
    const named = await s.api('POST', `/microvms/${source.id}/checkpoint`, { name: 'saved-state' });
    assert.equal(named.status, 202, JSON.stringify(named.body));
    assert.equal(named.body.name, 'saved-state');
    assert.equal(named.body.version, 1);
    for (let i = 0; i < 600 && (await getImage(s.server.db, named.body.id))?.state === 'SNAPSHOTTING'; i++) await sleep(100);
    assert.equal((await getImage(s.server.db, named.body.id))?.state, 'READY');
    const third = await start(named.body.arn);
    assert.equal(await counter(third), '4');
    assert.equal(await s.get(third.id, third.token, '/cgi-bin/file'), 'after-checkpoint');
    assert.ok(fs.existsSync(path.join(dataDir, 'images', named.body.id, 'base.raw')), 'its own link to the raw disk');
    for (const vm of [source, first, second, third]) assert.equal((await s.api('DELETE', `/microvms/${vm.id}`)).status, 204);
  });

  test('validation and tenant isolation', async () => {
    const source = await start();
    for (const body of [{ count: 0 }, { count: 17 }, { count: 'two' }, { count: 1, extra: true }]) {
      const answer = await s.api('POST', `/microvms/${source.id}/fork`, body);
      assert.equal(answer.status, 400, JSON.stringify(body));
    }
    assert.equal((await s.api('POST', `/microvms/${source.id}/checkpoint`, { name: 'no/slash' })).status, 400);
    assert.equal((await s.api('POST', '/microvms/mvm-00000000000000000000000000/fork', { count: 1 })).status, 404);

    const tenant = await s.api('POST', '/tenants', { name: 'other-fork-tenant' });
    assert.equal(tenant.status, 201);
    const otherKey = tenant.body.apiKey as string;
    const forkedByOther = await s.api('POST', `/microvms/${source.id}/fork`, { count: 1 }, otherKey);
    assert.equal(forkedByOther.status, 404, 'another tenant sees no such microVM');
    assert.equal(forkedByOther.body.error.code, 'microvm_not_found');
    assert.equal((await s.api('POST', `/microvms/${source.id}/checkpoint`, {}, otherKey)).status, 404);
    assert.equal((await s.api('GET', '/microvms', undefined, otherKey)).body.items.length, 0);

    assert.equal((await s.api('DELETE', `/microvms/${source.id}`)).status, 204);
    const ended = await s.api('POST', `/microvms/${source.id}/fork`, { count: 1 });
    assert.equal(ended.status, 409, JSON.stringify(ended.body));
  });
});
