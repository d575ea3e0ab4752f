/** Shared by every benchmark suite: the metric shape of docs/contract.md and percentiles. */

export type Unit = 'ms' | 'rps' | 'ratio' | 'count' | 'MiB' | 'MiB/s' | 'percent';

export interface Metric {
  p50: number;
  p95: number;
  unit: Unit;
  n: number;
}

export type Metrics = Record<string, Metric>;

/** Nearest-rank percentile of `values` (0 < p ≤ 100). */
export function percentile(values: readonly number[], p: number): number {
  if (values.length === 0) return Number.NaN;
  const sorted = [...values].sort((a, b) => a - b);
  const rank = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[rank] as number;
}

export function summarize(values: readonly number[], unit: Unit = 'ms'): Metric {
  const round = (x: number) => Math.round(x * 100) / 100;
  return { p50: round(percentile(values, 50)), p95: round(percentile(values, 95)), unit, n: values.length };
}

/** A single measured figure (a ratio, a count) as a metric. */
export function single(value: number, unit: Unit): Metric {
  const rounded = Math.round(value * 100) / 100;
  return { p50: rounded, p95: rounded, unit, n: 1 };
}

export function elapsedMs(start: number): number {
  return performance.now() - start;
}
