/**
 * Disk layers written from a template (src/vmm/qemu/layer-template.ts) are byte for byte what
 * `qemu-img create -b NAME` writes, for raw and qcow2 backing files and names short and long;
 * what a template cannot serve is left to qemu-img. No VM: qemu-img only.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, describe, test } from 'node:test';
import { createDiskLayer, readBackingName } from '../../src/vmm/qemu/disk-layers.ts';
import { forgetLayerTemplates, writeLayerFromTemplate } from '../../src/vmm/qemu/layer-template.ts';

describe('disk layers from a template', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cocoon-layer-template-'));
  after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const raw = path.join(dir, 'base.raw');
  fs.writeFileSync(raw, Buffer.alloc(0));
  fs.truncateSync(raw, 300 * 1024 * 1024);
  const qcow2 = path.join(dir, 'base.qcow2');
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', qcow2, '1G']);
  const byQemuImg = (backing: string, format: string, name: string, file: string) => {
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', name, '-F', format, file]);
    return fs.readFileSync(file);
  };

  for (const [backing, format] of [[raw, 'raw'], [qcow2, 'qcow2']] as const) {
    for (const name of [path.resolve(backing), path.relative(path.join(dir, 'a', 'b'), backing), `${'../'.repeat(200)}${backing.slice(1)}`]) {
      test(`over a ${format} file named ${name.length} bytes long: the same bytes as qemu-img's`, async () => {
        // A relative name is the backing file's from the layer's directory (qemu-img opens it).
        const layerDir = path.join(dir, 'a', 'b');
        fs.mkdirSync(layerDir, { recursive: true });
        const expected = byQemuImg(backing, format, name, path.join(layerDir, `expected-${format}-${name.length}.qcow2`));
        const layer = path.join(layerDir, `layer-${format}-${name.length}.qcow2`);
        assert.equal(await writeLayerFromTemplate(backing, format, layer, name), true);
        assert.ok(fs.readFileSync(layer).equals(expected), 'byte for byte');
        assert.equal(await readBackingName(layer), name);
      });
    }
  }

  test('createDiskLayer: a layer QEMU opens over its backing file, twice from one template', async () => {
    forgetLayerTemplates();
    fs.mkdirSync(path.join(dir, 'run'));
    for (const name of ['one.qcow2', 'two.qcow2']) {
      const layer = path.join(dir, 'run', name);
      await createDiskLayer(raw, 'raw', layer);
      const info = JSON.parse(execFileSync('qemu-img', ['info', '--output=json', '--backing-chain', layer], { encoding: 'utf8' })) as Array<{ 'virtual-size': number; filename: string }>;
      assert.deepEqual(info.map((i) => [i.filename, i['virtual-size']]), [[layer, 300 * 1024 * 1024], [`${dir}/run/../base.raw`, 300 * 1024 * 1024]]);
    }
    await assert.rejects(createDiskLayer(raw, 'raw', path.join(dir, 'run', 'one.qcow2')), { code: 'disk_layer_failed' }, 'an existing layer is not overwritten');
  });

  test('what a template cannot hold is left to qemu-img: nothing is written', async () => {
    const layer = path.join(dir, 'too-long.qcow2');
    assert.equal(await writeLayerFromTemplate(raw, 'raw', layer, 'x'.repeat(1024)), false);
    assert.equal(await writeLayerFromTemplate(path.join(dir, 'missing.raw'), 'raw', layer, 'missing.raw'), false);
    assert.equal(await writeLayerFromTemplate(raw, 'qcow2', layer, 'base.raw'), false, 'a qcow2 backing that is not qcow2');
    assert.equal(fs.existsSync(layer), false);
  });
});
