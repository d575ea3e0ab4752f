/**
 * `cocoon`: the command-line interface. `serve` runs the server; the other commands talk to a
 * server's API (see docs/cli.md).
 */
import { Command } from 'commander';
import { errorMessage, isCocoonError } from '../common/errors.ts';
import { loadConfig } from '../config/config.ts';
import { ADMIN_KEY_FILE, startServer } from '../server.ts';
import { defaultModules } from '../modules.ts';

export function buildCli(): Command {
  const program = new Command('cocoon').description('Stateful, isolated microVMs on your own Linux hosts');
  program
    .command('serve')
    .description('run the Cocoon server (API, builder, lifecycle, gateway) with embedded defaults')
    .action(async () => {
      const config = loadConfig();
      const modules = defaultModules();
      const server = await startServer(config, modules);
      if (server.newAdminKey) {
        console.log(`Admin API key (shown once, also in ${config.dataDir}/${ADMIN_KEY_FILE}):\n  ${server.newAdminKey}\n`);
      }
      console.log(`Cocoon API on ${server.apiUrl}/api/v1 (health: ${server.apiUrl}/api/v1/health)`);
      for (const module of modules) {
        if ('gatewayPort' in module && typeof module.gatewayPort === 'number') {
          console.log(`Gateway on http://${config.host}:${module.gatewayPort} (microVMs at http://<id>.${config.gatewayDomain}:${module.gatewayPort})`);
        }
      }
      const stop = async () => {
        await server.close();
        process.exit(0);
      };
      process.once('SIGINT', stop);
      process.once('SIGTERM', stop);
    });
  return program;
}

export async function main(argv: string[]): Promise<void> {
  try {
    await buildCli().parseAsync(argv);
  } catch (error) {
    console.error(`cocoon: ${errorMessage(error)}`);
    process.exitCode = isCocoonError(error) && error.status < 500 ? 2 : 1;
  }
}

if (import.meta.main) await main(process.argv);
