/**
 * An image's lifecycle hooks at a lifecycle point (run, resume, suspend, terminate): first its
 * command hook (run by the guest agent over the VM's channel), then its AWS-style HTTP hook
 * (POSTed to the image's hooks port), each within its own timeout. A hook's outcome is written
 * to the microVM's log and events; whatever it answers, the operation goes on.
 */
import { errorMessage } from '../common/errors.ts';
import { callHttpHook, describeHttpHookOutcome } from '../guest/http-hooks.ts';
import type { HookName } from '../store/images.ts';
import { clearRunHookPayload, getRunHookPayload } from '../store/microvms.ts';
import type { Db } from '../store/sql.ts';
import type { Vm } from '../vmm/driver.ts';
import { appendInstanceEvent, type Instance } from './instance.ts';
import { appendLog } from './storage.ts';

export type HookTarget = Pick<Instance, 'id' | 'tenantId' | 'hooks' | 'httpHooks'>;

/** A lifecycle point: the image's command hook, then its HTTP hook (each within its timeout). */
export async function runHooks(db: Db, dataDir: string, instance: HookTarget, vm: Vm, name: HookName): Promise<void> {
  await commandHook(db, dataDir, instance, vm, name);
  await httpHook(db, dataDir, instance, vm, name);
}

async function commandHook(db: Db, dataDir: string, instance: HookTarget, vm: Vm, name: HookName): Promise<void> {
  const hook = instance.hooks[name];
  if (!hook) return;
  const started = performance.now();
  let status: string;
  try {
    status = await vm.channel.runHook(name, hook.timeoutSeconds * 1000);
  } catch (error) {
    status = `error (${errorMessage(error)})`;
  }
  const ms = Math.round(performance.now() - started);
  const line = status === 'timeout' ? `hook ${name} timed out after ${hook.timeoutSeconds} s` : `hook ${name} ended: ${status} after ${ms} ms`;
  await appendLog(dataDir, instance.id, line);
  await appendInstanceEvent(db, instance, 'hook', line, { hook: name, status, ms });
}

/**
 * POST /aws/lambda-microvms/runtime/v1/<name> to the image's hooks port, within its timeout;
 * /run carries the launch's runHookPayload (read from the store, dropped once sent; never
 * logged). An answer other than 200, or none, is recorded; the operation goes on.
 */
async function httpHook(db: Db, dataDir: string, instance: HookTarget, vm: Vm, name: HookName): Promise<void> {
  const hooks = instance.httpHooks;
  const hook = hooks?.[name];
  if (!hooks || !hook) return;
  let endpoint: { host: string; port: number };
  try {
    endpoint = vm.endpoint(hooks.port);
  } catch (error) {
    const line = `HTTP hook ${name} not sent: ${errorMessage(error)}`;
    await appendLog(dataDir, instance.id, line);
    await appendInstanceEvent(db, instance, 'hook', line, { hook: name, kind: 'http', status: 'not_sent' });
    return;
  }
  const body = name === 'run' ? await getRunHookPayload(db, instance.id) : undefined;
  const outcome = await callHttpHook({ endpoint, name, timeoutMs: hook.timeoutSeconds * 1000, body, retryUnavailable: false });
  if (name === 'run') await clearRunHookPayload(db, instance.id);
  const line = describeHttpHookOutcome(name, outcome, hook.timeoutSeconds);
  const status = outcome.ok ? 200 : outcome.reason === 'status' ? outcome.status : outcome.reason;
  await appendLog(dataDir, instance.id, line);
  await appendInstanceEvent(db, instance, 'hook', line, { hook: name, kind: 'http', status, ms: outcome.ms });
}
