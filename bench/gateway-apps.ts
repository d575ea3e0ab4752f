/**
 * The gateway against nginx and direct access with wrk (bench suite `gateway`):
 *
 *   gateway.close_vs_nginx_c1/_c8/_c32  gateway ÷ nginx req/s to busybox httpd, an app that closes
 *                                       every connection (HTTP/1.0-style), same guest, interleaved
 *   gateway.close_timeouts              requests through the gateway that timed out in those runs
 *   gateway.nginx_throughput_ratio_c32  gateway ÷ nginx req/s to the keep-alive test app at c=32
 *   gateway.close_{gateway,nginx}_cpu_ms_c1/_c8/_c32
 *                                       CPU (user + system) per busybox request of the gateway's process
 *                                       (the daemon) and of nginx: steadier than req/s on a shared host
 *   gateway.close_before_vs_nginx_c*, gateway.close_before_cpu_ms_c*, gateway.close_before_timeouts
 *                                       the same with the gateway's CPU levers off (src/gateway/tuning.ts,
 *                                       `tuneGateway`), a fourth target interleaved with the others
 *
 * nginx is Debian's, started here as a one-worker reverse proxy to the same forwarded guest port
 * (see wrk.ts); wrk is the load generator for all three targets.
 */
import type { Metrics } from './stats.ts';
import { single } from './stats.ts';
import { cpuMs, runWrk, startNginx, type WrkResult } from './wrk.ts';

export interface WrkTarget {
  name: 'direct' | 'nginx' | 'gateway' | 'gateway_before';
  url: string;
  headers: string[];
}

export interface AppsBenchOptions {
  dir: string;
  /** Forwarded host ports of the guest's busybox httpd and keep-alive test app. */
  closePort: number;
  keepAlivePort: number;
  gatewayPort: number;
  /** The gateway's process (the daemon), for its CPU per request. */
  gatewayPid?: number;
  vmId: string;
  token: string;
  closeGuestPort: number;
  keepAliveGuestPort: number;
  seconds?: number;
  rounds?: number;
  /**
   * Turns the gateway's CPU levers (src/gateway/tuning.ts) on or off in the daemon: given, the
   * busybox runs get a fourth target, the gateway with them off (`gateway_before`), interleaved.
   */
  tuneGateway?: (on: boolean) => Promise<void>;
  log: (line: string) => void;
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

export async function gatewayVsNginx(o: AppsBenchOptions): Promise<Metrics> {
  const seconds = o.seconds ?? 4;
  const rounds = o.rounds ?? 3;
  const metrics: Metrics = {};
  const nginxClose = await startNginx(o.dir, o.closePort);
  const nginxKeep = await startNginx(o.dir, o.keepAlivePort);
  try {
    const gw = (guestPort: number): WrkTarget => ({
      name: 'gateway',
      url: `http://127.0.0.1:${o.gatewayPort}/`,
      headers: [`Host: ${o.vmId}.vm.localhost`, `X-Cocoon-Token: ${o.token}`, `X-Cocoon-Port: ${guestPort}`],
    });
    const close: WrkTarget[] = [
      { name: 'direct', url: `http://127.0.0.1:${o.closePort}/`, headers: [] },
      { name: 'nginx', url: `http://127.0.0.1:${nginxClose.port}/`, headers: [] },
      gw(o.closeGuestPort),
      ...(o.tuneGateway ? [{ ...gw(o.closeGuestPort), name: 'gateway_before' as const }] : []),
    ];
    const keep: WrkTarget[] = [
      { name: 'direct', url: `http://127.0.0.1:${o.keepAlivePort}/`, headers: [] },
      { name: 'nginx', url: `http://127.0.0.1:${nginxKeep.port}/`, headers: [] },
      gw(o.keepAliveGuestPort),
    ];
    let closeTimeouts = 0;
    let closeTimeoutsBefore = 0;
    const cpuUs = new Map<string, number[]>();
    const measure = async (targets: WrkTarget[], c: number, label: string) => {
      const rps = new Map<string, number[]>(targets.map((t) => [t.name, []]));
      for (let round = 0; round < rounds; round++) {
        for (const t of round % 2 === 0 ? targets : [...targets].reverse()) {
          const isGateway = t.name === 'gateway' || t.name === 'gateway_before';
          if (isGateway && o.tuneGateway) await o.tuneGateway(t.name === 'gateway');
          const pid = isGateway ? o.gatewayPid : t.name === 'nginx' ? (label === 'close' ? nginxClose.pid : nginxKeep.pid) : undefined;
          const cpuBefore = pid === undefined ? 0 : cpuMs(pid);
          const r: WrkResult = await runWrk({ url: t.url, connections: c, seconds, headers: t.headers });
          if (pid !== undefined && r.requests > 0) {
            const key = `${label} ${c} ${t.name}`;
            cpuUs.set(key, [...(cpuUs.get(key) ?? []), ((cpuMs(pid) - cpuBefore) * 1000) / r.requests]);
          }
          rps.get(t.name)!.push(r.rps);
          const bad = r.errors.timeout + r.errors.connect + r.errors.read + r.errors.write + r.non2xx;
          if (t.name === 'gateway' && label === 'close') closeTimeouts += r.errors.timeout;
          if (t.name === 'gateway_before' && label === 'close') closeTimeoutsBefore += r.errors.timeout;
          o.log(`  ${label} c=${c} ${t.name}: ${r.rps.toFixed(0)} req/s${bad ? ` (timeouts ${r.errors.timeout}, connect ${r.errors.connect}, read ${r.errors.read}, write ${r.errors.write}, non-2xx ${r.non2xx})` : ''}`);
        }
      }
      return new Map([...rps].map(([k, v]) => [k, median(v)]));
    };
    // Warm-up, not measured: the gateway's path for an app that closes every connection (one
    // exchange per connection) has not run yet in this daemon; its first seconds would pay V8's
    // compilation (measured: 0.4-0.7 ms of worker-thread CPU per request) in the first c=1 round.
    for (const t of close) {
      if (t.name !== 'gateway' && t.name !== 'gateway_before') continue;
      if (o.tuneGateway) await o.tuneGateway(t.name === 'gateway');
      await runWrk({ url: t.url, connections: 4, seconds: 2, headers: t.headers });
    }
    for (const c of [1, 8, 32]) {
      const m = await measure(close, c, 'close');
      metrics[`gateway.close_vs_nginx_c${c}`] = { ...single(m.get('gateway')! / m.get('nginx')!, 'ratio'), n: rounds };
      metrics[`gateway.close_direct_rps_c${c}`] = single(m.get('direct')!, 'rps');
      metrics[`gateway.close_nginx_rps_c${c}`] = single(m.get('nginx')!, 'rps');
      metrics[`gateway.close_gateway_rps_c${c}`] = single(m.get('gateway')!, 'rps');
      if (m.has('gateway_before')) {
        metrics[`gateway.close_before_vs_nginx_c${c}`] = { ...single(m.get('gateway_before')! / m.get('nginx')!, 'ratio'), n: rounds };
        metrics[`gateway.close_before_rps_c${c}`] = single(m.get('gateway_before')!, 'rps');
      }
      for (const name of ['gateway', 'nginx', 'gateway_before']) {
        const us = cpuUs.get(`close ${c} ${name}`);
        const metric = name === 'gateway_before' ? `gateway.close_before_cpu_ms_c${c}` : `gateway.close_${name}_cpu_ms_c${c}`;
        if (us?.length) metrics[metric] = { ...single(median(us) / 1000, 'ms'), n: us.length };
      }
    }
    metrics['gateway.close_timeouts'] = single(closeTimeouts, 'count');
    if (o.tuneGateway) metrics['gateway.close_before_timeouts'] = single(closeTimeoutsBefore, 'count');
    if (o.tuneGateway) await o.tuneGateway(true);
    const k = await measure(keep, 32, 'keep-alive');
    metrics['gateway.nginx_throughput_ratio_c32'] = { ...single(k.get('gateway')! / k.get('nginx')!, 'ratio'), n: rounds };
    metrics['gateway.wrk_direct_rps_c32'] = single(k.get('direct')!, 'rps');
    metrics['gateway.wrk_nginx_rps_c32'] = single(k.get('nginx')!, 'rps');
    metrics['gateway.wrk_gateway_rps_c32'] = single(k.get('gateway')!, 'rps');
    return metrics;
  } finally {
    await nginxClose.stop();
    await nginxKeep.stop();
  }
}
