/**
 * A minimal root disk for VM-core tests: busybox plus a tiny stateful web app, no buildah.
 *
 * The app (busybox httpd with CGI scripts) answers:
 *   /cgi-bin/count   a counter kept in /tmp/count, advanced by every request
 *   /cgi-bin/random  32 bytes read from /dev/urandom, hex
 *   /cgi-bin/time    the guest's wall clock, seconds since the epoch
 *   /cgi-bin/bg      `running <pid> <ticks>` of a background loop started before the web server
 *   /cgi-bin/file    the content of /data/file (written by /cgi-bin/write)
 *   /cgi-bin/http10  an app that speaks HTTP/1.0: its own `HTTP/1.0 200 OK` status line (busybox
 *                    httpd passes a CGI's output that starts with "HTTP" through as is), no
 *                    Content-Length, the body ended by the close
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';

const SCRIPTS: Record<string, string> = {
  count: 'n=$(cat /tmp/count 2>/dev/null || echo 0); n=$((n+1)); echo $n > /tmp/count; echo "$n"',
  random: "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo",
  time: 'date +%s',
  bg: 'pid=$(cat /tmp/bg.pid); if kill -0 "$pid" 2>/dev/null; then echo "running $pid $(cat /tmp/bg.count)"; else echo "gone"; fi',
  write: 'echo "$QUERY_STRING" > /data/file; sync; echo written',
  file: 'cat /data/file 2>/dev/null || echo none',
};

/** CGI scripts that write the whole response, status line included. */
const RAW_SCRIPTS: Record<string, string> = {
  http10: "printf 'HTTP/1.0 200 OK\\r\\nContent-Type: text/plain\\r\\n\\r\\nhello over HTTP/1.0\\n'",
};

const APPLETS = ['sh', 'httpd', 'cat', 'echo', 'sleep', 'head', 'od', 'tr', 'date', 'kill', 'sync', 'ls', 'ps', 'mv'];

export interface TestRootDiskOptions {
  sizeMiB?: number;
  /** Lines of /.cocoon/workload (docs/guest-protocol.md); default: the web app above (plus `hooks`). */
  workload?: string[];
  /** A static binary (test/support/testapp.c, see testapp.ts) started as `/bin/testapp 8081` before httpd. */
  testApp?: string;
  /** Image hooks for the workload file: `hook.<name> <command>`. */
  hooks?: Record<string, string>;
  /** The background loop behind /cgi-bin/bg (default true); without it an idle guest is really idle. */
  backgroundLoop?: boolean;
}

const DEFAULT_WORKLOAD = ['arg /bin/sh', 'arg /app/start.sh', 'cwd /app', 'env APP=test'];

export function makeTestRootDisk(file: string, options: TestRootDiskOptions = {}): void {
  const sizeMiB = options.sizeMiB ?? 64;
  const root = `${file}.root`;
  fs.rmSync(root, { recursive: true, force: true });
  try {
    for (const dir of ['bin', 'www/cgi-bin', 'app', '.cocoon', 'tmp', 'data', 'dev', 'proc', 'sys', 'etc']) {
      fs.mkdirSync(path.join(root, dir), { recursive: true });
    }
    fs.copyFileSync('/bin/busybox', path.join(root, 'bin/busybox'));
    fs.chmodSync(path.join(root, 'bin/busybox'), 0o755);
    for (const applet of APPLETS) fs.symlinkSync('busybox', path.join(root, 'bin', applet));
    fs.writeFileSync(
      path.join(root, 'app/start.sh'),
      [
        '#!/bin/sh',
        // Written aside and renamed: a reader never sees the file empty.
        ...(options.backgroundLoop === false
          ? []
          : [
              '(i=0; while true; do i=$((i+1)); echo $i > /tmp/bg.count.new; mv /tmp/bg.count.new /tmp/bg.count; sleep 0.2; done) &',
              'echo $! > /tmp/bg.pid',
            ]),
        ...(options.testApp ? ['/bin/testapp 8081 &'] : []),
        'exec httpd -f -p 8080 -h /www',
        '',
      ].join('\n'),
      { mode: 0o755 },
    );
    for (const [name, body] of Object.entries(SCRIPTS)) {
      fs.writeFileSync(
        path.join(root, 'www/cgi-bin', name),
        `#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\n'\n${body}\n`,
        { mode: 0o755 },
      );
    }
    for (const [name, body] of Object.entries(RAW_SCRIPTS)) {
      fs.writeFileSync(path.join(root, 'www/cgi-bin', name), `#!/bin/sh\n${body}\n`, { mode: 0o755 });
    }
    fs.writeFileSync(path.join(root, 'www/index.html'), 'hello from cocoon\n');
    fs.writeFileSync(path.join(root, 'etc/passwd'), 'root:x:0:0:root:/root:/bin/sh\n');
    if (options.testApp) {
      fs.copyFileSync(options.testApp, path.join(root, 'bin/testapp'));
      fs.chmodSync(path.join(root, 'bin/testapp'), 0o755);
    }
    const hooks = Object.entries(options.hooks ?? {}).map(([name, command]) => `hook.${name} ${command}`);
    fs.writeFileSync(path.join(root, '.cocoon/workload'), [...(options.workload ?? DEFAULT_WORKLOAD), ...hooks].join('\n') + '\n');
    fs.rmSync(file, { force: true });
    execFileSync('truncate', ['-s', `${sizeMiB}M`, file]);
    execFileSync('mkfs.ext4', ['-q', '-F', '-E', 'root_owner=0:0', '-d', root, file]);
  } finally {
    fs.rmSync(root, { recursive: true, force: true });
  }
}
