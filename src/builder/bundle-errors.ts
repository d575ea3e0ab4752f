import { CocoonError } from '../common/errors.ts';

/** The one error a bad bundle raises: 400 with a reason the user can act on. */
export function invalidBundle(reason: string): CocoonError {
  return new CocoonError('invalid_bundle', `invalid bundle: ${reason}`, { status: 400 });
}

/**
 * An entry name as it may appear in a message: control characters escaped (names come from an
 * untrusted archive and end up in logs and terminals) and long names shortened.
 */
export function quoteName(name: string): string {
  // eslint-disable-next-line no-control-regex
  const printable = name.replace(/[\u0000-\u001f\u007f-\u009f]/g, (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`);
  return `'${printable.length > 160 ? `${printable.slice(0, 160)}…` : printable}'`;
}
