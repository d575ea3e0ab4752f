/**
 * Per-phase breakdowns (issue 12): the records a driver fills in (src/vmm/phases.ts), collected
 * run by run and printed as one metric per phase, `<prefix>_<phase>_ms`, so that the bench shows
 * where a restore, a resume or a suspend spends its time.
 */
import type { Phases } from '../src/vmm/phases.ts';
import { type Metrics, summarize } from './stats.ts';

export class PhaseSamples {
  readonly #samples = new Map<string, number[]>();

  /**
   * Adds one run's phases; `totalMs`, when given, is the whole as the caller measured it, and
   * what the phases do not cover of it is counted as `rest` (for a restore: from the driver
   * handing the VM back to the first HTTP byte). A phase that only some runs have (another path
   * taken: its name says which) has only their samples (its metric's n says how many).
   */
  add(phases: Readonly<Phases> | undefined, totalMs?: number, rest = 'first_byte'): void {
    if (!phases) return;
    const entries = Object.entries(phases);
    if (totalMs !== undefined) entries.push([rest, Math.max(0, totalMs - entries.reduce((sum, [, ms]) => sum + ms, 0))]);
    for (const [name, ms] of entries) {
      const list = this.#samples.get(name) ?? [];
      list.push(ms);
      this.#samples.set(name, list);
    }
  }

  /** One metric per phase, in the order the phases first happened. */
  metrics(prefix: string): Metrics {
    const out: Metrics = {};
    for (const [name, values] of this.#samples) out[`${prefix}_${name}_ms`] = summarize(values);
    return out;
  }

  /** The p50 of each phase, one line, for the bench's log. */
  line(): string {
    return Object.entries(this.metrics('x'))
      .map(([name, m]) => `${name.slice(2, -3)} ${m.p50}`)
      .join(', ');
  }
}
