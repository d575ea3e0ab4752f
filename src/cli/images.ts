/** `cocoon bundle push` and `cocoon image create|list|get|logs|delete`. */
import type { Command } from 'commander';
import {
  CocoonTimeoutError,
  ImageBuildFailedError,
  IMAGE_STATES,
  type Bundle,
  type CreateImageInput,
  type Image,
  type ImageState,
} from '../../packages/sdk/src/index.ts';
import { action, collect, int } from './args.ts';
import type { Cli } from './context.ts';
import { UsageError } from './exit-codes.ts';
import { fields, relative, table } from './format.ts';

const PHASES: Record<ImageState, string> = {
  PENDING: 'queued',
  BUILDING: 'building the Dockerfile into a root disk',
  BOOTING: 'booting the VM and waiting for the app to be ready',
  SNAPSHOTTING: 'snapshotting the ready VM',
  READY: 'ready',
  FAILED: 'failed',
};

function isBundleUri(source: string): boolean {
  return /^(cocoon|s3):\/\//.test(source);
}

function sizeText(bytes: number): string {
  return bytes < 1024 * 1024 ? `${Math.ceil(bytes / 1024)} KiB` : `${(bytes / 1024 / 1024).toFixed(1)} MiB`;
}

export async function pushBundle(cli: Cli, source: string): Promise<Bundle> {
  cli.progress(`Uploading ${source}…`);
  const bundle = await cli.client().bundles.push(source);
  cli.progress(`Bundle checked and stored: ${bundle.uri} (${sizeText(bundle.sizeBytes)})`);
  return bundle;
}

function imageRow(image: Image): string[] {
  return [image.id, `${image.name}:${image.version}`, image.state, String(image.vcpus), `${image.memoryMiB} MiB`, String(image.port), relative(image.createdAt)];
}

export function imageDetails(image: Image): string {
  return fields([
    ['id', image.id],
    ['arn', image.arn],
    ['name', `${image.name}:${image.version}`],
    ['state', image.state],
    ['error', image.error],
    ['resources', `${image.vcpus} vCPU, ${image.memoryMiB} MiB memory, ${image.diskMiB} MiB disk`],
    ['port', image.port],
    ['bundle', image.bundle],
    ['created', `${image.createdAt} (${relative(image.createdAt)})`],
    ['timings', image.timings && Object.keys(image.timings).length ? Object.entries(image.timings).map(([k, v]) => `${k.replace(/Ms$/, '')} ${Math.round(v)} ms`).join(', ') : undefined],
  ]);
}

function parseStates(values: string[] | undefined): ImageState[] | undefined {
  if (!values?.length) return undefined;
  const states = values.flatMap((v) => v.split(',')).map((v) => v.trim().toUpperCase());
  for (const state of states) {
    if (!IMAGE_STATES.includes(state as ImageState)) throw new UsageError(`unknown image state ${state}; one of ${IMAGE_STATES.join(', ')}`);
  }
  return states as ImageState[];
}

/**
 * Follows a build: its log lines as they come, a line whenever the phase changes, until the
 * image is READY (returned) or FAILED (ImageBuildFailedError). JSON mode only polls.
 */
export async function followBuild(cli: Cli, image: Image, timeoutSeconds: number): Promise<Image> {
  const client = cli.client();
  const timeout = AbortSignal.timeout(timeoutSeconds * 1000);
  const stop = new AbortController();
  const signal = AbortSignal.any([timeout, stop.signal]);
  const rethrow = (error: unknown): never => {
    if (timeout.aborted) throw new CocoonTimeoutError(`building image ${image.id}`, timeoutSeconds * 1000);
    throw error;
  };
  if (cli.json) {
    return client.images.waitUntilReady(image.id, { signal, timeoutMs: timeoutSeconds * 1000 }).catch(rethrow);
  }
  let last: ImageState = image.state;
  const watch = client.images
    .waitForState(image.id, ['READY', 'FAILED'], {
      signal,
      pollIntervalMs: 1000,
      timeoutMs: timeoutSeconds * 1000,
      onState: (current) => {
        if (current.state !== last && current.state !== 'READY' && current.state !== 'FAILED') cli.progress(`==> ${current.state}: ${PHASES[current.state]}…`);
        last = current.state;
      },
    });
  watch.catch(() => undefined);
  try {
    for await (const line of client.images.logs(image.id, { follow: true, signal })) cli.progress(`    ${line}`);
    const done = await watch;
    if (done.state === 'FAILED') throw new ImageBuildFailedError(done);
    return done;
  } catch (error) {
    return rethrow(error);
  } finally {
    stop.abort();
  }
}

interface CreateOptions {
  bundle?: string;
  port?: number;
  vcpus?: number;
  memory?: number;
  disk?: number;
  readinessPath?: string;
  readinessTimeout?: number;
  egress?: boolean;
  wait?: boolean;
  waitTimeout: number;
}

export function registerImageCommands(program: Command): void {
  const bundle = program.command('bundle').description('upload app bundles (a folder or archive with a Dockerfile)');
  bundle
    .command('push')
    .description('upload a folder (packed as .tar.gz) or a .tar.gz/.zip file; prints the bundle URI for `image create`')
    .argument('<path>', 'a folder with a Dockerfile at its root, or a .tar.gz / .zip of one')
    .action(action(async (cli, [source]) => {
      const pushed = await pushBundle(cli, source!);
      cli.result(pushed, () => [`Next: cocoon image create <name> ${pushed.uri}`]);
    }));

  const image = program.command('image').description('build images from bundles and manage them');

  image
    .command('create')
    .description('create an image: upload the source (unless it is a bundle URI) and start the build')
    .argument('<name>', 'image name: letters, digits, ".", "_", "-" (part of the ARN)')
    .argument('[source]', 'a folder, a .tar.gz/.zip file, or a bundle URI (cocoon://… or s3://…)')
    .option('--bundle <uri>', 'a bundle URI from `bundle push` (instead of [source])')
    .option('--port <port>', "the app's port (default: the Dockerfile's EXPOSE, else 8080)", int(1, 65535))
    .option('--vcpus <n>', 'virtual CPUs, 1-16', int(1, 16))
    .option('--memory <MiB>', 'memory in MiB, 128-32768', int(128, 32768))
    .option('--disk <MiB>', 'root disk in MiB, up to 32768', int(1, 32768))
    .option('--readiness-path <path>', 'ready once GET <path> on the app port answers 2xx')
    .option('--readiness-timeout <seconds>', 'give the app this long to be ready (≤ 3600)', int(1, 3600))
    .option('--egress', 'let the guest reach the network (default: no egress)')
    .option('-w, --wait', 'follow the build log until the image is READY or FAILED')
    .option('--wait-timeout <seconds>', 'with --wait: give up after this long', int(1, 86400), 1800)
    .action(action<CreateOptions>(async (cli, [name, source], options) => {
      if (source && options.bundle) throw new UsageError('give either [source] or --bundle, not both');
      const from = source ?? options.bundle;
      if (!from) throw new UsageError('say what to build: a folder, a .tar.gz/.zip, or --bundle <uri> (see `cocoon image create --help`)');
      const uri = isBundleUri(from) ? from : (await pushBundle(cli, from)).uri;
      const input: CreateImageInput = { name: name!, bundle: uri };
      if (options.port !== undefined) input.port = options.port;
      if (options.vcpus !== undefined) input.vcpus = options.vcpus;
      if (options.memory !== undefined) input.memoryMiB = options.memory;
      if (options.disk !== undefined) input.diskMiB = options.disk;
      if (options.readinessPath !== undefined || options.readinessTimeout !== undefined) {
        input.readiness = {};
        if (options.readinessPath !== undefined) input.readiness.httpPath = options.readinessPath;
        if (options.readinessTimeout !== undefined) input.readiness.timeoutSeconds = options.readinessTimeout;
      }
      if (options.egress) input.networkEgress = true;
      let created = await cli.client().images.create(input);
      cli.progress(`Image ${created.name}:${created.version} (${created.id}) is ${created.state}`);
      if (!options.wait) {
        cli.result(created, () => [`Follow the build: cocoon image logs -f ${created.id}`]);
        return;
      }
      created = await followBuild(cli, created, options.waitTimeout);
      cli.result(created, () => [
        `✓ Image ${created.name}:${created.version} is READY`,
        `  ${created.arn}`,
        `Next: cocoon vm start ${created.id}`,
      ]);
    }));

  image
    .command('list')
    .alias('ls')
    .description('list your images, newest first')
    .option('--state <state>', `only these states, comma-separated or repeated (${IMAGE_STATES.join(', ')})`, collect)
    .option('--name <name>', 'only images with this name')
    .option('--limit <n>', 'at most this many per page (1-1000)', int(1, 1000))
    .option('--cursor <cursor>', 'the page after this cursor (from a previous list)')
    .option('--all', 'every page')
    .action(action<{ state?: string[]; name?: string; limit?: number; cursor?: string; all?: boolean }>(async (cli, _args, options) => {
      const client = cli.client();
      const params = { state: parseStates(options.state), name: options.name, limit: options.limit, cursor: options.cursor };
      let items: Image[];
      let nextCursor: string | null = null;
      if (options.all) {
        items = [];
        for await (const item of client.images.iterate(params)) items.push(item);
      } else {
        ({ items, nextCursor } = await client.images.list(params));
      }
      cli.result({ items, nextCursor }, () => {
        if (items.length === 0) return 'No images. Create one: cocoon image create <name> <folder> --wait';
        const lines = [table(['ID', 'IMAGE', 'STATE', 'VCPUS', 'MEMORY', 'PORT', 'CREATED'], items.map(imageRow))];
        if (nextCursor) lines.push(`More: cocoon image list --cursor ${nextCursor} (or --all)`);
        return lines;
      });
    }));

  image
    .command('get')
    .description('show an image')
    .argument('<image>', 'image id or ARN')
    .action(action(async (cli, [id]) => {
      const found = await cli.client().images.get(id!);
      cli.result(found, () => imageDetails(found));
    }));

  image
    .command('logs')
    .description("print an image's build log")
    .argument('<image>', 'image id or ARN')
    .option('-f, --follow', 'keep printing until the build ends')
    .action(action<{ follow?: boolean }>(async (cli, [id], options) => {
      const client = cli.client();
      if (!options.follow) {
        const log = await client.images.logs(id!);
        if (cli.json) cli.result({ log }, () => '');
        else process.stdout.write(log);
        return;
      }
      for await (const line of client.images.logs(id!, { follow: true })) {
        process.stdout.write(cli.json ? `${JSON.stringify({ line })}\n` : `${line}\n`);
      }
    }));

  image
    .command('delete')
    .alias('rm')
    .description('delete an image and its files (refused while microVMs use it)')
    .argument('<image>', 'image id or ARN')
    .action(action(async (cli, [id]) => {
      await cli.client().images.delete(id!);
      cli.result({ deleted: id }, () => `Deleted image ${id}`);
    }));
}
