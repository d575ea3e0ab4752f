/**
 * `cocoon vm exec [options] <microvm> <command...>`: everything after the microVM is the
 * command, options included (`cocoon vm exec mvm-1 ls -l --json` runs `ls -l --json`), as
 * with `docker exec`. Commander would read `-l` and `--json` as its own options, so before it
 * parses, a `--` is put right after the microVM id when the user did not write one.
 */

/** Options that take a value: the global ones and exec's. */
const LONG_WITH_VALUE = new Set(['--api-url', '--api-key', '--data-dir', '--env', '--workdir', '--user', '--timeout']);
const SHORT_WITH_VALUE = new Set(['e', 'w', 'u']);

/** Subcommands of `vm` whose operands end with a command. */
const COMMAND_TAKERS = new Set(['exec']);

/**
 * Returns `argv` (as `process.argv`: node, script, then the arguments) with `--` inserted
 * after the microVM of `vm exec` when needed; anything else is returned as it is.
 */
export function separateCommand(argv: readonly string[]): string[] {
  const out = [...argv];
  const args = out.slice(2);
  let i = 0;
  /** Skips an option at args[i] (and its value); false when args[i] is no option. */
  const skipOption = (): boolean => {
    const arg = args[i]!;
    if (arg === '--' || !arg.startsWith('-') || arg === '-') return false;
    if (arg.startsWith('--')) {
      i += LONG_WITH_VALUE.has(arg) ? 2 : 1;
      return true;
    }
    // A cluster of short flags: `-it`, `-e KEY=V`, `-eKEY=V`, `-ite KEY=V`.
    for (let j = 1; j < arg.length; j++) {
      if (SHORT_WITH_VALUE.has(arg[j]!)) {
        i += j === arg.length - 1 ? 2 : 1;
        return true;
      }
    }
    i += 1;
    return true;
  };
  // Global options, then `vm`, then the subcommand.
  while (i < args.length && skipOption());
  if (args[i] !== 'vm') return out;
  i += 1;
  while (i < args.length && skipOption());
  if (!COMMAND_TAKERS.has(args[i] ?? '')) return out;
  i += 1;
  while (i < args.length && skipOption());
  if (i >= args.length || args[i] === '--') return out;
  // args[i] is the microVM; the command follows.
  const next = i + 1;
  if (next >= args.length || args[next] === '--') return out;
  out.splice(2 + next, 0, '--');
  return out;
}
