/**
 * A root disk whose guest turns hostile on request: busybox, httpd on port 8080, and CGI scripts
 * the host calls to start each attack and read what the guest saw.
 *
 *   /cgi-bin/count             a counter in /tmp/count (state that must survive)
 *   /cgi-bin/start?<attack>    starts an attack in the background, answers `started <attack>`
 *   /cgi-bin/result?<attack>   what the attack left in /run/<attack>.result (or `none`; /run is
 *                              a tmpfs, so results survive a full root disk)
 *   /cgi-bin/probe?<h:p>,...   TCP connects from inside the guest: `<h:p> open|closed` per line
 *   /cgi-bin/touch?<MiB>       fills that much of fresh guest memory (a tmpfs file), `touched`
 *
 * Attacks: `flood` (the serial console, as fast as the guest can), `fill` (the root disk until
 * it is full, with data that does not compress to zeros), `forkbomb`, `spin` (every vCPU busy).
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';

const ATTACKS: Record<string, string> = {
  // The console is the serial port: every byte is a trap into QEMU and a write to the host.
  flood: 'line=FLOOD-0123456789abcdefghijklmnopqrstuvwxyz-0123456789abcdefghijklmnopqrstuvwxyz-FLOOD; while :; do echo "$line$line$line"; done > /dev/console 2>&1',
  // /dev/urandom: QEMU turns written zeros into holes (detect-zeroes=unmap), random data it must store.
  fill: 'dd if=/dev/urandom of=/data/fill bs=1M > /run/fill.out 2>&1; echo "exit=$?" > /run/fill.result; cat /run/fill.out >> /run/fill.result; df -k /data >> /run/fill.result; sync',
  forkbomb: 'bomb() { bomb | bomb & }; bomb',
  spin: 'n=$(nproc); i=0; while [ $i -lt $n ]; do (while :; do :; done) & i=$((i+1)); done; echo "spinning $n" > /run/spin.result',
};

const SCRIPTS: Record<string, string> = {
  count: 'n=$(cat /tmp/count 2>/dev/null || echo 0); n=$((n+1)); echo $n > /tmp/count; echo "$n"',
  start: [
    'case "$QUERY_STRING" in',
    ...Object.keys(ATTACKS).map((name) => `  ${name}) setsid sh /app/attack-${name}.sh </dev/null >/dev/null 2>&1 & echo "started ${name}" ;;`),
    '  *) echo "unknown attack" ;;',
    'esac',
  ].join('\n'),
  result: 'case "$QUERY_STRING" in *[!a-z]*|"") echo bad ;; *) cat "/run/$QUERY_STRING.result" 2>/dev/null || echo none ;; esac',
  probe: [
    'for target in $(echo "$QUERY_STRING" | tr "," " "); do',
    '  host=${target%:*}; port=${target##*:}',
    '  if nc -w 3 "$host" "$port" </dev/null >/dev/null 2>&1; then echo "$target open"; else echo "$target closed"; fi',
    'done',
  ].join('\n'),
  touch: [
    'mib=$(echo "$QUERY_STRING" | tr -cd 0-9); [ -n "$mib" ] || mib=1',
    'mkdir -p /mnt/ram; mountpoint -q /mnt/ram 2>/dev/null || mount -t tmpfs -o size=90% tmpfs /mnt/ram',
    'rm -f /mnt/ram/fill',
    // 0xA5 bytes, not zeros: every page really becomes the guest's.
    'dd if=/dev/zero bs=1M count="$mib" 2>/dev/null | tr "\\000" "\\245" > /mnt/ram/fill && echo touched || echo failed',
  ].join('\n'),
};

const APPLETS = [
  'sh', 'httpd', 'cat', 'echo', 'sleep', 'head', 'tr', 'date', 'kill', 'sync', 'ls', 'ps', 'mv', 'rm', 'nc', 'dd', 'df',
  'nproc', 'setsid', 'mkdir', 'mount', 'mountpoint', 'seq', 'wc',
];

/** Writes an ext4 image at `file` with the hostile workload (tests: `makeHostileRootDisk(path, 32)`). */
export function makeHostileRootDisk(file: string, sizeMiB = 32): void {
  const root = `${file}.root`;
  fs.rmSync(root, { recursive: true, force: true });
  try {
    for (const dir of ['bin', 'www/cgi-bin', 'app', '.cocoon', 'tmp', 'data', 'dev', 'proc', 'sys', 'etc', 'mnt', 'run']) {
      fs.mkdirSync(path.join(root, dir), { recursive: true });
    }
    fs.copyFileSync('/bin/busybox', path.join(root, 'bin/busybox'));
    fs.chmodSync(path.join(root, 'bin/busybox'), 0o755);
    for (const applet of APPLETS) fs.symlinkSync('busybox', path.join(root, 'bin', applet));
    fs.writeFileSync(path.join(root, 'app/start.sh'), '#!/bin/sh\nmount -t tmpfs -o size=4m tmpfs /run\nexec httpd -f -p 8080 -h /www\n', {
      mode: 0o755,
    });
    for (const [name, body] of Object.entries(ATTACKS)) {
      fs.writeFileSync(path.join(root, `app/attack-${name}.sh`), `#!/bin/sh\n${body}\n`, { mode: 0o755 });
    }
    for (const [name, body] of Object.entries(SCRIPTS)) {
      fs.writeFileSync(path.join(root, 'www/cgi-bin', name), `#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\n'\n${body}\n`, {
        mode: 0o755,
      });
    }
    fs.writeFileSync(path.join(root, 'www/index.html'), 'hostile\n');
    fs.writeFileSync(path.join(root, 'etc/passwd'), 'root:x:0:0:root:/root:/bin/sh\n');
    fs.writeFileSync(path.join(root, '.cocoon/workload'), 'arg /bin/sh\narg /app/start.sh\ncwd /app\n');
    fs.rmSync(file, { force: true });
    execFileSync('truncate', ['-s', `${sizeMiB}M`, file]);
    execFileSync('mkfs.ext4', ['-q', '-F', '-E', 'root_owner=0:0', '-d', root, file]);
  } finally {
    fs.rmSync(root, { recursive: true, force: true });
  }
}
