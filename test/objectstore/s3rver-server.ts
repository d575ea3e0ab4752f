/**
 * A real S3-protocol server for tests, started in-process on loopback.
 *
 * Why s3rver: it installs from npm (Debian has no MinIO package and nothing outside the npm
 * registry and Debian is reachable here), it speaks the actual S3 REST protocol over HTTP
 * (SigV4-signed requests, access key checks, multipart uploads, CopyObject), and it runs inside
 * the test process, so the AWS SDK is exercised end to end without mocks or Docker.
 * Known gaps: it does not verify SigV4 signatures and cannot abort a multipart upload.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import S3rver from 's3rver';

export interface TestS3Server {
  endpoint: string;
  /** s3rver checks signatures against these fixed credentials. */
  credentials: { accessKeyId: string; secretAccessKey: string };
  stop(): Promise<void>;
  /** Stops answering (connections are refused) but keeps the objects; `resume` serves them again on the same port. */
  pause(): Promise<void>;
  resume(): Promise<void>;
}

export async function startS3rver(buckets: string[]): Promise<TestS3Server> {
  const directory = await mkdtemp(join(tmpdir(), 'cocoon-s3rver-'));
  const create = (port: number) => new S3rver({
    address: '127.0.0.1',
    port, // 0 at first, ephemeral: tests never collide on a port
    silent: true,
    directory,
    configureBuckets: buckets.map((name) => ({ name })),
  });
  let server: S3rver | undefined = create(0);
  let address;
  try {
    address = await server.run();
  } catch (error) {
    await rm(directory, { recursive: true, force: true });
    throw error;
  }
  const port = address.port;
  let stopped = false;
  return {
    endpoint: `http://127.0.0.1:${port}`,
    credentials: { accessKeyId: 'S3RVER', secretAccessKey: 'S3RVER' },
    async stop() {
      if (stopped) return;
      stopped = true;
      try {
        await server?.close();
      } finally {
        await rm(directory, { recursive: true, force: true });
      }
    },
    async pause() {
      const running = server;
      server = undefined;
      await running?.close();
    },
    async resume() {
      if (server || stopped) return;
      server = create(port);
      await server.run();
    },
  };
}
