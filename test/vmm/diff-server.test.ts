/**
 * The long-lived memory diff helper (src/vmm/native/diff-server.ts, `cocoon-sparse serve`): its
 * diffs are the one-shot helper's byte for byte, also several at once; a job that fails says why
 * and the server serves on; a cancelled job ends; a server that died is started again, and the
 * job it held fails instead of hanging.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { describe, test } from 'node:test';
import { diffServerPid, startHeldDiff, startHeldSum, stopDiffServer } from '../../src/vmm/native/diff-server.ts';
import { runSparseHelper, startHeldHelper } from '../../src/vmm/native/helper.ts';
import { memFile, page } from '../support/mem-snapshot.ts';
import { useTempDir } from '../support/vm.ts';

describe('memory diff server', () => {
  test('diffs as the one-shot helper does, several at once; failures, cancels and a dead server', async (t) => {
    const dir = useTempDir(t, 'cocoon-diffserver-');
    t.after(() => stopDiffServer());
    const base = path.join(dir, 'base');
    const basePages = new Map(Array.from({ length: 300 }, (_, i) => [i * 5, page()] as [number, Buffer]));
    memFile(base, basePages);
    const mems = [0, 1, 2].map((n) => {
      const file = path.join(dir, `mem${n}`);
      memFile(file, new Map([...basePages, [n, page()], [1000 + n, page()], [5, page(0)]]));
      return file;
    });

    const oneShot = await startHeldHelper(['diff', base, mems[0]!, path.join(dir, 'one.diff'), 'narrow', 'wait']);
    const expected = await oneShot.go();
    const held = await Promise.all(mems.map((mem, n) => startHeldDiff(['diff', base, mem, path.join(dir, `served${n}.diff`), 'sync', 'narrow'])));
    const outputs = await Promise.all(held.map((job) => job.go()));
    assert.equal(outputs[0], expected, 'the same output lines (checksum, page counts)');
    assert.ok(fs.readFileSync(path.join(dir, 'served0.diff')).equals(fs.readFileSync(path.join(dir, 'one.diff'))), 'the same diff, byte for byte');
    for (const output of outputs) assert.match(output, /^[0-9a-f]{16} \d+ \d+\n3 2048\n$/);
    const pid = diffServerPid();
    assert.ok(pid);

    await assert.rejects(startHeldDiff(['diff', base, path.join(dir, 'missing'), path.join(dir, 'x.diff')]), /cannot open .*missing/);
    const cancelled = await startHeldDiff(['diff', base, mems[1]!, path.join(dir, 'cancelled.diff')]);
    cancelled.cancel();
    const after = await startHeldDiff(['diff', base, mems[1]!, path.join(dir, 'after.diff')]);
    assert.match(await after.go(), /\n3 2048\n$/, 'the server serves on after a failure and a cancel');
    assert.equal(diffServerPid(), pid, 'one server all along');

    const pending = await startHeldDiff(['diff', base, mems[2]!, path.join(dir, 'pending.diff')]);
    process.kill(pid, 'SIGKILL');
    await assert.rejects(pending.go(), /the memory diff helper ended|no go/, 'a job of a dead server fails (its go pipe closed)');
    const restarted = await startHeldDiff(['diff', base, mems[2]!, path.join(dir, 'restarted.diff')]);
    assert.match(await restarted.go(), /\n3 2048\n$/);
    assert.notEqual(diffServerPid(), pid, 'a new server');
  });

  test('a held checksum (a suspend\'s disk layer) sums the file it opened, renamed since, as `sum` does', async (t) => {
    const dir = useTempDir(t, 'cocoon-diffserver-');
    t.after(() => stopDiffServer());
    const file = path.join(dir, 'disk');
    memFile(file, new Map([[0, page()], [7, page()], [100, page()]]), 1024 * 1024);
    const held = await startHeldSum(file, true);
    const moved = path.join(dir, 'moved');
    fs.renameSync(file, moved);
    const line = await held.go();
    assert.equal(line, await runSparseHelper(['sum', moved]));
    await assert.rejects(startHeldSum(path.join(dir, 'missing'), false), /cannot open/);
  });
});
