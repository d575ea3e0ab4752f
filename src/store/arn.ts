import { invalid } from './values.ts';

/**
 * ARNs: `arn:cocoon:<region>:<account>:microvm-image/<name>:<version>` and
 * `arn:cocoon:<region>:<account>:microvm/<id>`. The region comes from the server's
 * configuration, the account is the tenant's 12-digit account id.
 */
const REGION = /^[a-z0-9][a-z0-9-]{0,31}$/;
const ACCOUNT = /^\d{12}$/;

export function checkRegion(region: string): string {
  if (!REGION.test(region)) throw invalid(`region '${region}' must be 1–32 lower-case letters, digits or '-'`);
  return region;
}

export function imageArn(region: string, accountId: string, name: string, version: number): string {
  checkRegion(region);
  if (!ACCOUNT.test(accountId)) throw new Error(`not an account id: ${accountId}`);
  return `arn:cocoon:${region}:${accountId}:microvm-image/${name}:${version}`;
}

export function microvmArn(region: string, accountId: string, id: string): string {
  checkRegion(region);
  if (!ACCOUNT.test(accountId)) throw new Error(`not an account id: ${accountId}`);
  return `arn:cocoon:${region}:${accountId}:microvm/${id}`;
}

export function isArn(value: string): boolean {
  return value.startsWith('arn:cocoon:');
}
