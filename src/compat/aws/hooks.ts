/**
 * The model's `hooks` ↔ Cocoon's image `httpHooks`. AWS names each hook's state (ENABLED /
 * DISABLED) and timeout; Cocoon keeps the enabled ones with their timeouts: a DISABLED or absent
 * hook is no key. Cocoon POSTs /aws/lambda-microvms/runtime/v1/<name> to `port` in the guest.
 */
import type { HttpHooksInput } from '../../images/image-service.ts';
import type { HttpHooks } from '../../store/images.ts';
import { validation } from './errors.ts';
import { int, oneOf, onlyMembers, struct, type Json } from './validate.ts';

const STATES = ['DISABLED', 'ENABLED'] as const;
const IMAGE_HOOKS = [['ready', 3600], ['validate', 3600]] as const;
const MICROVM_HOOKS = [['run', 60], ['resume', 60], ['suspend', 60], ['terminate', 60]] as const;

/** Validates the model's Hooks and maps it; undefined when no hooks are given. */
export function httpHooksFromAws(body: Json): HttpHooksInput | undefined {
  const hooks = struct(body, 'hooks');
  if (hooks === undefined) return undefined;
  onlyMembers(hooks, ['port', 'microvmHooks', 'microvmImageHooks'], 'hooks');
  const port = int(hooks, 'port', { min: 1, max: 65535 }, 'hooks.port');
  const out: Partial<HttpHooksInput> = {};
  const groups = [
    ['microvmImageHooks', IMAGE_HOOKS],
    ['microvmHooks', MICROVM_HOOKS],
  ] as const;
  for (const [group, names] of groups) {
    const g = struct(hooks, group, {}, `hooks.${group}`);
    if (g === undefined) continue;
    onlyMembers(g, names.flatMap(([n]) => [n, `${n}TimeoutInSeconds`]), `hooks.${group}`);
    for (const [name, max] of names) {
      const state = oneOf(g, name, STATES, {}, `hooks.${group}.${name}`);
      const timeout = int(g, `${name}TimeoutInSeconds`, { min: 1, max }, `hooks.${group}.${name}TimeoutInSeconds`);
      if (state === 'ENABLED') out[name] = timeout === undefined ? {} : { timeoutSeconds: timeout };
    }
  }
  if (port === undefined) {
    if (Object.keys(out).length > 0) throw validation("hooks.port is required when a hook is ENABLED (the port Cocoon sends the hooks' requests to in the guest)");
    return undefined;
  }
  return { ...out, port };
}

/** Cocoon's stored httpHooks as the model's Hooks (every hook named, ENABLED or DISABLED). */
export function awsHooksFrom(httpHooks: HttpHooks | null): Json | undefined {
  if (!httpHooks) return undefined;
  const group = (names: readonly (readonly [keyof HttpHooks, number])[]) => {
    const out: Json = {};
    for (const [name] of names) {
      const hook = httpHooks[name] as { timeoutSeconds: number } | undefined;
      out[name] = hook ? 'ENABLED' : 'DISABLED';
      if (hook) out[`${name}TimeoutInSeconds`] = hook.timeoutSeconds;
    }
    return out;
  };
  return { port: httpHooks.port, microvmImageHooks: group(IMAGE_HOOKS), microvmHooks: group(MICROVM_HOOKS) };
}
