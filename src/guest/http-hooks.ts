/**
 * AWS Lambda MicroVMs' HTTP hooks, host side: `POST /aws/lambda-microvms/runtime/v1/<name>` to
 * the image's hooks port inside the guest (reached through its host-side forward), where a
 * listener in the guest answers 200 once the hook's work is done.
 *
 * - `ready` and `validate` (image build, before the snapshot) may answer 503 ("not yet"): asked
 *   again until their timeout. A refused or reset connection counts as "not yet" too (user-mode
 *   networking accepts a host-side connection even when nothing listens in the guest yet).
 * - `run`, `resume`, `suspend`, `terminate` (lifecycle) are asked once within their timeout;
 *   a connection that fails before any answer is tried again within it.
 *
 * The guest is not trusted: only the status of its answer is read, never its body.
 */
import http from 'node:http';
import type { HttpHookName } from '../store/images.ts';

export const HTTP_HOOK_PATH_PREFIX = '/aws/lambda-microvms/runtime/v1/';

export function httpHookPath(name: HttpHookName): string {
  return `${HTTP_HOOK_PATH_PREFIX}${name}`;
}

export interface HttpHookCall {
  /** Where the hooks port in the guest is reachable (the VM's endpoint for it). */
  endpoint: { host: string; port: number };
  name: HttpHookName;
  timeoutMs: number;
  /** The request body (the run hook's payload); none: an empty body. */
  body?: string | undefined;
  /** Ask again after a 503 until the timeout (ready, validate). */
  retryUnavailable: boolean;
  signal?: AbortSignal | undefined;
}

export type HttpHookOutcome =
  | { ok: true; status: 200; attempts: number; ms: number }
  /** `last`: the last answer's status, or why there was none ('timeout', a connection error). */
  | { ok: false; reason: 'status' | 'timeout' | 'aborted'; status?: number; last: string; attempts: number; ms: number };

/** Pause between attempts that got a 503 or no connection. */
const RETRY_DELAY_MS = 200;

/** One POST; resolves with the status, or rejects with the connection's or the timer's error. */
function postOnce(endpoint: { host: string; port: number }, path: string, body: Buffer, signal: AbortSignal): Promise<number> {
  return new Promise((resolve, reject) => {
    const req = http.request(
      {
        host: endpoint.host,
        port: endpoint.port,
        method: 'POST',
        path,
        // No keep-alive: a hook call is rare, and a pooled connection could outlive the VM.
        agent: false,
        headers: {
          'content-type': 'text/plain; charset=utf-8',
          'content-length': body.length,
          connection: 'close',
        },
        signal,
      },
      (res) => {
        // Drop the body unread; the status is the answer.
        res.resume();
        res.on('error', () => undefined);
        resolve(res.statusCode ?? 0);
        res.destroy();
      },
    );
    req.on('error', reject);
    req.end(body);
  });
}

/** Calls one hook within `timeoutMs`; never throws (the outcome says what happened). */
export async function callHttpHook(call: HttpHookCall): Promise<HttpHookOutcome> {
  const started = performance.now();
  const elapsed = (): number => Math.round(performance.now() - started);
  const deadline = AbortSignal.timeout(call.timeoutMs);
  const signal = call.signal ? AbortSignal.any([deadline, call.signal]) : deadline;
  const body = Buffer.from(call.body ?? '', 'utf8');
  const path = httpHookPath(call.name);
  let attempts = 0;
  let last = 'no answer';
  for (;;) {
    if (call.signal?.aborted) return { ok: false, reason: 'aborted', last, attempts, ms: elapsed() };
    if (deadline.aborted) return { ok: false, reason: 'timeout', last, attempts, ms: elapsed() };
    attempts++;
    let status: number | undefined;
    try {
      status = await postOnce(call.endpoint, path, body, signal);
    } catch (error) {
      if (!signal.aborted) last = (error as NodeJS.ErrnoException).code ?? (error as Error).message;
    }
    if (status === 200) return { ok: true, status: 200, attempts, ms: elapsed() };
    if (status !== undefined) {
      last = `HTTP ${status}`;
      if (status !== 503 || !call.retryUnavailable) return { ok: false, reason: 'status', status, last, attempts, ms: elapsed() };
    }
    await new Promise<void>((resolve) => {
      const timer = setTimeout(resolve, RETRY_DELAY_MS);
      signal.addEventListener('abort', () => { clearTimeout(timer); resolve(); }, { once: true });
    });
  }
}

/** One line for logs and events, e.g. "HTTP hook run: 200 after 12 ms". */
export function describeHttpHookOutcome(name: HttpHookName, outcome: HttpHookOutcome, timeoutSeconds: number): string {
  if (outcome.ok) return `HTTP hook ${name}: 200 after ${outcome.ms} ms`;
  switch (outcome.reason) {
    case 'timeout':
      return `HTTP hook ${name} did not answer 200 within ${timeoutSeconds} s (last: ${outcome.last}, ${outcome.attempts} attempts)`;
    case 'aborted':
      return `HTTP hook ${name} was cancelled after ${outcome.ms} ms`;
    default:
      return `HTTP hook ${name} answered ${outcome.last} after ${outcome.ms} ms`;
  }
}
