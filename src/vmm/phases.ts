/**
 * Where the time of a VM start or a snapshot goes, phase by phase (issue 12: profile first).
 * A driver fills one of these in as it works and hands it back (`Vm.startPhases`,
 * `SnapshotOptions.phases`); the benchmarks print them, so that a speed-up is aimed at the phase
 * that costs, and nobody has to parse logs for it.
 *
 * Phases are consecutive: each mark charges the time since the previous mark, so the phases of
 * one record add up to its whole. A phase named twice adds up.
 */

/** Milliseconds per phase, in the order they happened. */
export type Phases = Record<string, number>;

export class PhaseClock {
  readonly phases: Phases;
  #last = performance.now();

  /** `into`: an object the caller passed to be filled in (the same object is written). */
  constructor(into: Phases = {}) {
    this.phases = into;
  }

  /** Charges the time since the previous mark (or the start) to `name`. */
  mark(name: string): void {
    const now = performance.now();
    this.phases[name] = (this.phases[name] ?? 0) + (now - this.#last);
    this.#last = now;
  }

  /**
   * Charges the time since the previous mark to a step that measured its own phases (a VM's
   * `startPhases` inside a lifecycle operation): each of `parts` as `prefix` + its name, and
   * what they do not cover of that time as `rest`, so that the record still adds up.
   */
  markParts(parts: Readonly<Phases> | undefined, prefix: string, rest: string): void {
    const now = performance.now();
    let covered = 0;
    for (const [name, ms] of Object.entries(parts ?? {})) {
      this.phases[prefix + name] = (this.phases[prefix + name] ?? 0) + ms;
      covered += ms;
    }
    this.phases[rest] = (this.phases[rest] ?? 0) + Math.max(0, now - this.#last - covered);
    this.#last = now;
  }
}
