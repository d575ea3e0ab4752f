/**
 * The host firewall, as the daemon touches it: one way to run iptables/ip6tables and to read
 * back the rules it lists. The egress guard (egress-guard.ts) installs its chain with it; the
 * builder (src/builder/buildah.ts) removes what CNI left for a killed build step.
 */
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';

const run = promisify(execFile);

export type IptablesBinary = 'iptables' | 'ip6tables';

/**
 * Runs `binary` with `args` (no shell), waiting up to 5 s for the xtables lock another process
 * holds; rejects on a non-zero exit unless `allowFailure`, then answers its output and status.
 */
export async function iptables(
  args: readonly string[],
  options: { binary?: IptablesBinary; allowFailure?: boolean } = {},
): Promise<{ ok: boolean; stdout: string }> {
  try {
    const { stdout } = await run(options.binary ?? 'iptables', ['-w', '5', ...args]);
    return { ok: true, stdout };
  } catch (error) {
    if (!options.allowFailure) throw error;
    return { ok: false, stdout: String((error as { stdout?: unknown }).stdout ?? '') };
  }
}

/** Splits an `iptables -S` line into words (double quotes with backslash escapes). */
export function splitIptablesRule(line: string): string[] {
  const words: string[] = [];
  let i = 0;
  while (i < line.length) {
    while (line[i] === ' ') i++;
    if (i >= line.length) break;
    let word = '';
    while (i < line.length && line[i] !== ' ') {
      if (line[i] === '"') {
        i++;
        while (i < line.length && line[i] !== '"') {
          if (line[i] === '\\' && i + 1 < line.length) i++;
          word += line[i++];
        }
        i++;
      } else {
        word += line[i++];
      }
    }
    words.push(word);
  }
  return words;
}
