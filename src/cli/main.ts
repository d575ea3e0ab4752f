/**
 * `cocoon`: the command-line interface. `serve` runs the server; the other commands talk to a
 * server's API through the SDK (packages/sdk). See docs/cli.md for every command, the
 * configuration order and the exit codes.
 */
import { Command, CommanderError } from 'commander';
import { registerAdminCommands } from './admin.ts';
import { action } from './args.ts';
import { registerClusterCommands } from './cluster.ts';
import { separateCommand } from './exec-args.ts';
import { EXIT } from './exit-codes.ts';
import { registerImageCommands } from './images.ts';
import { registerMicrovmCommands } from './microvms.ts';

export function buildCli(): Command {
  const program = new Command('cocoon')
    .description('Stateful, isolated microVMs on your own Linux hosts')
    .option('--api-url <url>', 'the server (default: COCOON_API_URL, the data directory\'s api-url, or http://127.0.0.1:7070)')
    .option('--api-key <key>', 'an API key (default: COCOON_API_KEY, or the data directory\'s admin-api-key)')
    .option('--data-dir <dir>', "a local server's data directory (default: COCOON_DATA_DIR or ./.cocoon)")
    .option('--json', 'machine-readable output: one JSON document on stdout, errors as JSON on stderr')
    .showHelpAfterError('(add --help for usage)')
    .configureHelp({ showGlobalOptions: true, sortSubcommands: false })
    .exitOverride();
  program.addHelpText('after', `
Exit codes: 0 ok, 1 failure, 2 usage or invalid input, 3 not found, 4 no/bad API key,
5 conflict (wrong state), 6 server unreachable, 7 timed out.

Start here:
  npm start                                  # or: cocoon serve
  cocoon image create my-app ./my-app --wait # a folder with a Dockerfile
  cocoon vm start my-app                     # prints its URL and a token
  cocoon vm curl <microvm id> /`);

  program
    .command('serve')
    .description('run the Cocoon server (API, dashboard, builder, lifecycle, gateway) with embedded defaults')
    .action(action(async () => {
      const [{ loadConfig }, { ADMIN_KEY_FILE, startServer }, { defaultModules }] = await Promise.all([
        import('../config/config.ts'),
        import('../server.ts'),
        import('../modules.ts'),
      ]);
      const config = loadConfig();
      const modules = defaultModules();
      const server = await startServer(config, modules);
      if (server.newAdminKey) {
        console.log(`Admin API key (shown once, also in ${config.dataDir}/${ADMIN_KEY_FILE}):\n  ${server.newAdminKey}\n`);
      }
      console.log(`Cocoon API on ${server.apiUrl}/api/v1 (health: ${server.apiUrl}/api/v1/health)`);
      console.log(`Dashboard on ${server.apiUrl}/`);
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
    }));
  registerAdminCommands(program);
  registerImageCommands(program);
  registerMicrovmCommands(program);
  registerClusterCommands(program);
  return program;
}

export async function main(argv: string[]): Promise<void> {
  try {
    await buildCli().parseAsync(separateCommand(argv));
  } catch (error) {
    if (error instanceof CommanderError) {
      // Help and version exit 0; every parse error (unknown command or flag, bad value) is a usage error.
      process.exitCode = error.exitCode === 0 ? EXIT.ok : EXIT.usage;
      return;
    }
    console.error(`cocoon: ${error instanceof Error ? error.message : String(error)}`);
    process.exitCode = EXIT.failure;
  }
}

if (import.meta.main) await main(process.argv);
