/**
 * The client side of the 100 MiB transfer test, in a process of its own so that the test
 * process's memory is the daemon's alone: uploads `size` pseudo-random bytes to `path`,
 * downloads them again, and prints {"up": status, "sent": sha256, "got": sha256, "bytes": n}.
 *   node test/exec/transfer-client.ts <api port> <key> <microvm> <path> <size>
 */
import { createHash } from 'node:crypto';
import { download, patternStream, upload } from './helpers.ts';

const [port, key, vm, guestPath, size] = process.argv.slice(2) as [string, string, string, string, string];
const sent = createHash('sha256');
const source = patternStream(Number(size), 7);
const hashing = source.on('data', (c: Buffer) => sent.update(c));
const up = await upload(Number(port), key, vm, guestPath, hashing);
const got = createHash('sha256');
let bytes = 0;
let length: string | undefined;
if (up.status === 201) {
  const res = await download(Number(port), key, vm, guestPath);
  length = res.headers['content-length'];
  for await (const chunk of res) {
    got.update(chunk as Buffer);
    bytes += (chunk as Buffer).length;
  }
}
console.log(JSON.stringify({ up: up.status, upBody: up.body, sent: sent.digest('hex'), got: got.digest('hex'), bytes, length }));
