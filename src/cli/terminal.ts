/**
 * Wiring a local terminal to an interactive session in a microVM: stdin forwarded (with
 * back-pressure: it pauses while the socket is full), raw mode for a PTY (so Ctrl-C, Ctrl-D,
 * arrows reach the guest as keys, and the guest's line discipline turns Ctrl-C into SIGINT),
 * the window's size followed (SIGWINCH → resize), and everything put back as it was at the end
 * — also when the session breaks.
 */
import type { ExecSession } from '../../packages/sdk/src/index.ts';

export interface TerminalSize {
  cols: number;
  rows: number;
}

/** The local terminal's size, when stdout is one. */
export function terminalSize(stream: NodeJS.WriteStream = process.stdout): TerminalSize | undefined {
  if (!stream.isTTY || !stream.columns || !stream.rows) return undefined;
  return { cols: stream.columns, rows: stream.rows };
}

export interface AttachOptions {
  /** Forward stdin (the CLI's `-i`). */
  stdin: boolean;
  /** The session has a PTY (the CLI's `-t`, and `shell`). */
  tty: boolean;
}

/**
 * Connects the process's stdin, window size and signals to `session` until it ends; returns a
 * function that undoes it all (call it once the session is over).
 */
export function attachTerminal(session: ExecSession, options: AttachOptions): () => void {
  const cleanups: Array<() => void> = [];
  const input = process.stdin;

  if (options.stdin) {
    const raw = options.tty && input.isTTY;
    if (raw) {
      input.setRawMode(true);
      // Whatever happens, the user's terminal is not left raw.
      const restore = () => input.setRawMode(false);
      process.once('exit', restore);
      cleanups.push(() => {
        process.off('exit', restore);
        restore();
      });
    }
    const onData = (chunk: Buffer) => {
      if (session.done) return;
      const sent = session.write(chunk);
      // Back-pressure: stop reading until the socket has sent what it holds.
      input.pause();
      void sent.then(() => {
        if (!session.done) input.resume();
      });
    };
    const onEnd = () => {
      if (!session.done) session.closeStdin();
    };
    input.on('data', onData);
    input.once('end', onEnd);
    input.resume();
    cleanups.push(() => {
      input.off('data', onData);
      input.off('end', onEnd);
      input.pause();
      // A TTY or pipe read handle keeps the process alive; let it go.
      (input as unknown as { unref?: () => void }).unref?.();
    });
  }

  if (options.tty && process.stdout.isTTY) {
    const onResize = () => {
      const size = terminalSize();
      if (size && !session.done) session.resize(Math.min(size.cols, 1000), Math.min(size.rows, 1000));
    };
    // Node's TTY stream turns SIGWINCH into 'resize', with columns and rows already updated.
    process.stdout.on('resize', onResize);
    cleanups.push(() => process.stdout.off('resize', onResize));
  }

  // Signals sent to the CLI itself (kill, or Ctrl-C when no raw terminal catches it) go to the
  // process in the microVM; the CLI then waits for its exit like any other.
  const forward = (signal: NodeJS.Signals) => () => {
    if (!session.done) session.signal(signal);
  };
  for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
    const handler = forward(signal);
    process.on(signal, handler);
    cleanups.push(() => process.off(signal, handler));
  }

  let undone = false;
  return () => {
    if (undone) return;
    undone = true;
    for (const cleanup of cleanups.reverse()) {
      try {
        cleanup();
      } catch {
        // the terminal went away
      }
    }
  };
}
