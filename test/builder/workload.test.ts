import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { isCocoonError } from '../../src/common/errors.ts';
import { findDebianSources } from '../../src/builder/base-images.ts';
import { parseInspect } from '../../src/builder/buildah.ts';
import { baseImagesNeeded } from '../../src/builder/root-disk.ts';
import {
  buildEnv, combineArgv, DEFAULT_PATH, escapeValue, firstTcpPort, parseWorkload, renderWorkload, resolveUser, unescapeValue,
} from '../../src/builder/workload.ts';

const PASSWD = `root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
app:x:1000:1001:App:/home/app:/bin/sh
# comment
broken line
nobody:x:65534:65534:nobody:/home:/bin/false
`;
const GROUP = `root:x:0:
wheel:x:10:root
appgroup:x:1001:
staff:x:50:app,other
docker:x:999:app
nogroup:x:65534:
`;

describe('argv (ENTRYPOINT + CMD as Docker combines them)', () => {
  test('exec forms concatenate', () => {
    assert.deepEqual(combineArgv(['/entry', '--flag'], ['serve', '8080']), ['/entry', '--flag', 'serve', '8080']);
  });
  test('shell form is stored as sh -c and passes through', () => {
    assert.deepEqual(combineArgv([], ['/bin/sh', '-c', 'echo $HOME && exec httpd']), ['/bin/sh', '-c', 'echo $HOME && exec httpd']);
  });
  test('only one of them', () => {
    assert.deepEqual(combineArgv(['/app'], []), ['/app']);
    assert.deepEqual(combineArgv([], ['sh']), ['sh']);
  });
});

describe('environment', () => {
  test('PATH and HOME defaults', () => {
    assert.deepEqual(buildEnv(['A=1'], '/home/app'), ['A=1', `PATH=${DEFAULT_PATH}`, 'HOME=/home/app']);
  });
  test('image values win, later duplicates replace earlier ones, = inside values kept', () => {
    assert.deepEqual(buildEnv(['PATH=/x', 'A=1', 'B=a=b', 'A=2', 'HOME=/h'], '/root'), ['PATH=/x', 'A=2', 'B=a=b', 'HOME=/h']);
  });
});

describe('USER resolution', () => {
  test('empty is root, with the groups root is a member of', () => {
    assert.deepEqual(resolveUser('', PASSWD, GROUP), { uid: 0, gid: 0, groups: [10], home: '/root', name: 'root' });
  });
  test('by name: uid, primary gid from passwd, supplementary groups from group', () => {
    assert.deepEqual(resolveUser('app', PASSWD, GROUP), { uid: 1000, gid: 1001, groups: [50, 999], home: '/home/app', name: 'app' });
  });
  test('numeric uid found in passwd behaves like its name', () => {
    assert.deepEqual(resolveUser('1000', PASSWD, GROUP), { uid: 1000, gid: 1001, groups: [50, 999], home: '/home/app', name: 'app' });
  });
  test('numeric uid not in passwd: gid 0, home /', () => {
    assert.deepEqual(resolveUser('4242', PASSWD, GROUP), { uid: 4242, gid: 0, groups: [], home: '/', name: undefined });
  });
  test('user:group by names and numbers; an explicit group drops supplementary groups', () => {
    assert.deepEqual(resolveUser('app:staff', PASSWD, GROUP), { uid: 1000, gid: 50, groups: [], home: '/home/app', name: 'app' });
    assert.deepEqual(resolveUser('1000:4000', PASSWD, GROUP), { uid: 1000, gid: 4000, groups: [], home: '/home/app', name: 'app' });
    assert.deepEqual(resolveUser('nobody:nogroup', PASSWD, GROUP), { uid: 65534, gid: 65534, groups: [], home: '/home', name: 'nobody' });
    assert.deepEqual(resolveUser('5:6', undefined, undefined), { uid: 5, gid: 6, groups: [], home: '/', name: undefined });
  });
  test('an unknown user or group is a clear error', () => {
    assert.throws(() => resolveUser('ghost', PASSWD, GROUP), (e) => isCocoonError(e, 'unknown_user') && /ghost/.test(e.message) && /\/etc\/passwd/.test(e.message));
    assert.throws(() => resolveUser('app:ghosts', PASSWD, GROUP), (e) => isCocoonError(e, 'unknown_user') && /ghosts/.test(e.message));
    assert.throws(() => resolveUser('app', undefined, undefined), (e) => isCocoonError(e, 'unknown_user') && /has no \/etc\/passwd/.test(e.message));
    assert.throws(() => resolveUser('99999999999', PASSWD, GROUP), (e) => isCocoonError(e, 'unknown_user'));
  });
});

describe('workload file', () => {
  test('escapes round-trip', () => {
    for (const v of ['plain', 'with space', 'a\\b', 'multi\nline', 'tab\there', '\\n literal', 'trailing\\', '']) {
      assert.equal(unescapeValue(escapeValue(v)), v);
      assert.ok(!escapeValue(v).includes('\n'));
    }
    assert.throws(() => escapeValue('nul\0'), (e) => isCocoonError(e, 'invalid_workload'));
  });
  test('renders the documented keys and parses back', () => {
    const w = { argv: ['/bin/sh', '-c', 'echo "a b"\necho c'], env: ['PATH=/bin', 'X=1\t2'], cwd: '/srv app', uid: 1000, gid: 1001, groups: [50, 999], hooks: { suspend: 'sync' } };
    const text = renderWorkload(w);
    assert.match(text, /^arg \/bin\/sh$/m);
    assert.match(text, /^arg echo "a b"\\necho c$/m);
    assert.match(text, /^env X=1\\t2$/m);
    assert.match(text, /^cwd \/srv app$/m);
    assert.match(text, /^uid 1000$/m);
    assert.match(text, /^gid 1001$/m);
    assert.match(text, /^groups 50,999$/m);
    assert.match(text, /^hook\.suspend sync$/m);
    assert.deepEqual(parseWorkload(text), w);
  });
  test('no groups line without groups; limits are enforced', () => {
    assert.doesNotMatch(renderWorkload({ argv: ['x'], env: [], cwd: '/', uid: 0, gid: 0, groups: [] }), /^groups/m);
    assert.throws(() => renderWorkload({ argv: Array(300).fill('x'), env: [], cwd: '/', uid: 0, gid: 0, groups: [] }), (e) => isCocoonError(e, 'invalid_workload'));
    assert.throws(() => renderWorkload({ argv: ['x'], env: ['A=' + 'x'.repeat(1024 * 1024)], cwd: '/', uid: 0, gid: 0, groups: [] }), (e) => isCocoonError(e, 'invalid_workload'));
  });
});

test('app port: the lowest exposed TCP port', () => {
  assert.equal(firstTcpPort(['8080/tcp', '80/tcp', '53/udp']), 80);
  assert.equal(firstTcpPort(['53/udp']), undefined);
  assert.equal(firstTcpPort(['3000']), 3000);
  assert.equal(firstTcpPort([]), undefined);
});

test('image config from buildah inspect (Docker format first)', () => {
  const json = JSON.stringify({
    Docker: { config: { Entrypoint: ['/e'], Cmd: null, Env: ['A=1'], WorkingDir: '/w', User: 'app', ExposedPorts: { '80/tcp': {} }, StopSignal: 'SIGINT', Labels: null } },
    OCIv1: { config: {} },
  });
  assert.deepEqual(parseInspect(json), { entrypoint: ['/e'], cmd: [], env: ['A=1'], workingDir: '/w', user: 'app', exposedPorts: ['80/tcp'], stopSignal: 'SIGINT', labels: {} });
});

test('which seeded base images a Dockerfile needs', () => {
  assert.deepEqual(baseImagesNeeded('FROM busybox\nRUN x'), ['busybox']);
  assert.deepEqual(baseImagesNeeded('# c\nfrom --platform=linux/amd64 docker.io/library/debian:bookworm-slim AS build\nFROM build\nFROM busybox:latest'), ['debian', 'busybox']);
  assert.deepEqual(baseImagesNeeded('FROM scratch\nFROM node:20'), []);
  assert.deepEqual(baseImagesNeeded('ARG BASE=busybox\nFROM $BASE'), ['busybox', 'debian']);
  assert.deepEqual(baseImagesNeeded('FROM busybox AS busybox\nFROM busybox'), ['busybox']);
});

describe('Debian mirror from apt sources', () => {
  test('deb822 with main and security archives', () => {
    const text = `Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
`;
    assert.deepEqual(findDebianSources([{ name: 'debian.sources', text }, { name: 'x.list.disabled', text: 'deb http://evil/ bookworm main' }]),
      { mirror: 'http://deb.debian.org/debian', security: 'http://deb.debian.org/debian-security' });
  });
  test('one-line format with options; third-party entries ignored', () => {
    const text = 'deb https://packages.cloud.google.com/apt cloud-sdk-bookworm main\ndeb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian/ bookworm main contrib\n';
    assert.deepEqual(findDebianSources([{ name: 'sources.list', text }]), { mirror: 'http://mirror.example/debian', security: undefined });
  });
  test('a disabled stanza is skipped; nothing found falls back to deb.debian.org', () => {
    const text = 'Enabled: no\nTypes: deb\nURIs: http://off.example/debian\nSuites: bookworm\n';
    assert.deepEqual(findDebianSources([{ name: 'a.sources', text }]), { mirror: 'http://deb.debian.org/debian', security: undefined });
  });
});
