/**
 * The local cluster's S3-protocol server: s3rver (npm; Debian has no MinIO) in a process of its
 * own, so that it outlives `cluster up` and `cluster down` can stop it by pid. It stores the
 * bucket under a directory of the cluster, listens on 127.0.0.1 only and takes s3rver's fixed
 * credentials (`S3RVER` / `S3RVER`). s3rver does not verify SigV4 signatures: it is for trying
 * Cocoon and for tests on one machine, never for a real deployment.
 *
 * As a program: `node s3-server.ts <directory> <port> <bucket>`; prints one line
 * `COCOON_S3_READY {"port":…}` once it listens.
 */
import fs from 'node:fs';

export const S3_READY = 'COCOON_S3_READY ';
export const S3_CREDENTIALS = { accessKeyId: 'S3RVER', secretAccessKey: 'S3RVER' } as const;

async function main(directory: string, port: number, bucket: string): Promise<void> {
  const { default: S3rver } = await import('s3rver');
  fs.mkdirSync(directory, { recursive: true, mode: 0o700 });
  const server = new S3rver({ address: '127.0.0.1', port, silent: true, directory, configureBuckets: [{ name: bucket }] });
  const address = await server.run();
  process.stdout.write(`${S3_READY}${JSON.stringify({ port: address.port, pid: process.pid })}\n`);
  const stop = () => {
    void server.close().finally(() => process.exit(0));
  };
  process.once('SIGTERM', stop);
  process.once('SIGINT', stop);
}

if (import.meta.main) {
  const [directory, port, bucket] = process.argv.slice(2);
  if (!directory || !port || !bucket) {
    console.error('usage: s3-server.ts <directory> <port> <bucket>');
    process.exit(2);
  }
  await main(directory, Number(port), bucket);
}
