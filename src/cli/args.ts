/** Option parsers and the action wrapper shared by the commands. */
import { type Command, InvalidArgumentError } from 'commander';
import { Cli, reportError } from './context.ts';

/** An integer option in [min, max]; anything else is a usage error (exit 2). */
export function int(min: number, max: number) {
  return (value: string): number => {
    if (!/^-?\d+$/.test(value.trim())) throw new InvalidArgumentError(`expected a whole number from ${min} to ${max}`);
    const parsed = Number(value);
    if (parsed < min || parsed > max) throw new InvalidArgumentError(`expected a whole number from ${min} to ${max}`);
    return parsed;
  };
}

/** A repeatable option: `-H a -H b` → ['a', 'b']. */
export function collect(value: string, previous: string[] = []): string[] {
  return [...previous, value];
}

/** A repeatable integer option. */
export function collectInt(min: number, max: number) {
  const parse = int(min, max);
  return (value: string, previous: number[] = []): number[] => [...previous, ...value.split(',').map((v) => parse(v))];
}

/** Runs `fn` with the command's Cli context, its arguments and options. */
export function action<O>(fn: (cli: Cli, args: string[], options: O) => Promise<void>) {
  return async function (this: Command, ...received: unknown[]): Promise<void> {
    const command = received.at(-1) as Command;
    const options = received.at(-2) as O;
    const args = received.slice(0, -2) as string[];
    const cli = new Cli(command);
    try {
      await fn(cli, args, options);
    } catch (error) {
      process.exitCode = reportError(error, cli.json, cli.settings);
    }
  };
}
