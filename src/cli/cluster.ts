/**
 * `cocoon cluster up|down|status` (also `npm run cluster -- …`): a Cocoon cluster on one machine
 * for trying it and for tests (src/cluster/local/cluster.ts; docs/cluster.md). Not for real
 * machines: each of those runs `cocoon serve` with the cluster's settings.
 */
import type { Command } from 'commander';
import { action, int } from './args.ts';
import { fields } from './format.ts';

const DEFAULT_DIR = '.cocoon-cluster';

export function registerClusterCommands(program: Command): void {
  const cluster = program
    .command('cluster')
    .description('a local cluster on this machine: PostgreSQL, an S3-protocol server and N Cocoon hosts');
  cluster
    .command('up', { isDefault: true })
    .description('start PostgreSQL, s3rver and the hosts (what is already running is kept); prints their URLs and the admin key')
    .option('--hosts <n>', 'how many Cocoon hosts (1-26)', int(1, 26), 3)
    .option('--dir <dir>', 'where the cluster keeps its data, logs and state file', DEFAULT_DIR)
    .action(action<{ hosts: number; dir: string }>(async (cli, _args, options) => {
      const { clusterUp } = await import('../cluster/local/cluster.ts');
      const up = await clusterUp({ dir: options.dir, hosts: options.hosts, progress: cli.json ? undefined : (line) => console.log(`… ${line}`) });
      const { state } = up;
      cli.result({ ...state, adminKey: up.adminKey }, () => [
        `✓ Cluster of ${state.hosts.length} host${state.hosts.length === 1 ? '' : 's'} is up (${state.dir})`,
        ...state.hosts.map((h) => `  ${h.id}: API ${h.apiUrl}/api/v1  gateway ${h.gatewayUrl}  (log ${h.logFile})`),
        fields([
          ['database', state.databaseUrl],
          ['s3', `${state.s3.endpoint} bucket ${state.s3.bucket}`],
          ['admin key', up.adminKey],
        ]),
        `Next: COCOON_API_URL=${state.hosts[0]!.apiUrl} COCOON_API_KEY=${up.adminKey} cocoon image create …`,
        `Stop it: npm run cluster -- down${options.dir === DEFAULT_DIR ? '' : ` --dir ${options.dir}`}`,
      ]);
    }));
  cluster
    .command('down')
    .description('stop everything `cluster up` started (idempotent); --purge also removes the directory')
    .option('--dir <dir>', 'the cluster\'s directory', DEFAULT_DIR)
    .option('--purge', 'remove the data too')
    .action(action<{ dir: string; purge?: boolean }>(async (cli, _args, options) => {
      const { clusterDown } = await import('../cluster/local/cluster.ts');
      const down = await clusterDown(options.dir, { purge: options.purge === true });
      cli.result(down, () => (down.stopped.length === 0 ? 'Nothing was running.' : `✓ Stopped ${down.stopped.join(', ')}`));
    }));
  cluster
    .command('status')
    .description('what the local cluster runs')
    .option('--dir <dir>', 'the cluster\'s directory', DEFAULT_DIR)
    .action(action<{ dir: string }>(async (cli, _args, options) => {
      const { readClusterState, processAlive } = await import('../cluster/local/cluster.ts');
      const state = readClusterState(options.dir);
      if (!state) {
        cli.result({ running: false }, () => `No cluster in ${options.dir}.`);
        return;
      }
      const hosts = state.hosts.map((h) => ({ ...h, running: processAlive(h.pid) }));
      cli.result({ ...state, hosts }, () => hosts.map((h) => `  ${h.id}: ${h.running ? 'running' : 'stopped'}  API ${h.apiUrl}/api/v1  gateway ${h.gatewayUrl}`));
    }));
}
