/**
 * A token's ports, one vocabulary for the store, the gateway and the API (and AWS's
 * PortSpecification): a guest port, or an inclusive range of guest ports.
 */
export type PortSpec = number | { readonly from: number; readonly to: number };

/** Whether `port` is among `specs`. */
export function portInSpecs(specs: readonly PortSpec[], port: number): boolean {
  for (const spec of specs) {
    if (typeof spec === 'number' ? spec === port : spec.from <= port && port <= spec.to) return true;
  }
  return false;
}
