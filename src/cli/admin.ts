/** `cocoon tenant create|list`, `cocoon apikey create|list|revoke`, `cocoon health`. */
import type { Command } from 'commander';
import type { ApiKey, Tenant } from '../../packages/sdk/src/index.ts';
import { action, int } from './args.ts';
import { fields, relative, table } from './format.ts';

export function registerAdminCommands(program: Command): void {
  const tenant = program.command('tenant').description('tenants own images and microVMs (admin key)');
  tenant
    .command('create')
    .description('create a tenant and its first API key (shown once)')
    .argument('<name>', 'lower-case letters, digits, ".", "_", "-"')
    .action(action(async (cli, [name]) => {
      const created = await cli.client().tenants.create({ name: name! });
      cli.result(created, () => [
        `✓ Tenant ${created.name} (${created.id}, account ${created.accountId})`,
        `API key (shown once, keep it safe): ${created.apiKey}`,
        `Use it: COCOON_API_KEY=${created.apiKey} cocoon image list`,
      ]);
    }));
  tenant
    .command('list')
    .alias('ls')
    .description('list tenants')
    .option('--limit <n>', 'at most this many per page (1-1000)', int(1, 1000))
    .option('--cursor <cursor>', 'the page after this cursor')
    .action(action<{ limit?: number; cursor?: string }>(async (cli, _args, options) => {
      const page = await cli.client().tenants.list({ limit: options.limit, cursor: options.cursor });
      cli.result(page, () => {
        const lines = [table(['ID', 'NAME', 'ACCOUNT', 'ADMIN', 'CREATED'], page.items.map((t: Tenant) => [t.id, t.name, t.accountId, t.isAdmin ? 'yes' : '', relative(t.createdAt)]))];
        if (page.nextCursor) lines.push(`More: cocoon tenant list --cursor ${page.nextCursor}`);
        return lines;
      });
    }));

  const keys = program.command('apikey').description('API keys of your tenant (or, with the admin key, of any tenant)');
  keys
    .command('create')
    .description('create an API key (shown once)')
    .option('--name <name>', 'what the key is for')
    .option('--tenant <id>', 'for this tenant (admin key only)')
    .action(action<{ name?: string; tenant?: string }>(async (cli, _args, options) => {
      const client = cli.client();
      const input = options.name !== undefined ? { name: options.name } : {};
      const created = options.tenant ? await client.tenants.createApiKey(options.tenant, input) : await client.apiKeys.create(input);
      cli.result(created, () => [`✓ API key ${created.id}${created.name ? ` (${created.name})` : ''}`, `Secret (shown once): ${created.apiKey}`]);
    }));
  keys
    .command('list')
    .alias('ls')
    .description("list your tenant's API keys")
    .option('--limit <n>', 'at most this many per page (1-1000)', int(1, 1000))
    .option('--cursor <cursor>', 'the page after this cursor')
    .action(action<{ limit?: number; cursor?: string }>(async (cli, _args, options) => {
      const page = await cli.client().apiKeys.list({ limit: options.limit, cursor: options.cursor });
      cli.result(page, () => table(
        ['ID', 'NAME', 'PREFIX', 'CREATED', 'LAST USED', 'STATUS'],
        page.items.map((k: ApiKey) => [k.id, k.name ?? '', `${k.prefix}…`, relative(k.createdAt), relative(k.lastUsedAt), k.revokedAt ? 'revoked' : 'active']),
      ));
    }));
  keys
    .command('revoke')
    .description('revoke one of your API keys (at once)')
    .argument('<id>', 'the key id (from `apikey list`)')
    .action(action(async (cli, [id]) => {
      await cli.client().apiKeys.revoke(id!);
      cli.result({ revoked: id }, () => `Revoked API key ${id}`);
    }));

  program
    .command('health')
    .description('check that the server is up (no API key needed)')
    .action(action(async (cli) => {
      const client = cli.client({ anonymous: true });
      const health = await client.health();
      const info = await client.info().catch(() => undefined);
      cli.result({ ...health, apiUrl: client.apiUrl, ...(info ? { info } : {}) }, () => fields([
        ['status', health.status],
        ['api', `${client.apiUrl}/api/v1 (from ${cli.settings.apiUrlFrom})`],
        ['gateway', info?.gateway.port ? `port ${info.gateway.port}, hosts <microvm id>.${info.gateway.domain}` : undefined],
        ['api key', cli.settings.apiKeyFrom ? `from ${cli.settings.apiKeyFrom}` : 'none found'],
      ]));
      if (health.status !== 'ok') process.exitCode = 1;
    }));
}
