/**
 * Sealed copies of secrets the server must be able to read back later: AES-256-GCM under a key
 * kept in a file of the data directory (0600, made on first use). API keys are stored hashed for
 * Bearer authentication, but AWS SigV4 (src/compat/aws/) signs with the secret itself, so the
 * verifier needs the plain key: it keeps a sealed copy, bound to the API key's id (GCM's
 * associated data), so that a sealed value copied onto another row does not open.
 *
 * A stolen database alone does not give the keys; the database plus the key file does (the same
 * host trust as the admin key file). Sealed values and the key are never logged.
 */
import { createCipheriv, createDecipheriv, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { CocoonError } from '../common/errors.ts';

export const SEAL_KEY_FILE = 'secrets-seal.key';
const VERSION = 'v1';
const NONCE_BYTES = 12;
const TAG_BYTES = 16;
const KEY_BYTES = 32;
/** A sealed value longer than this is refused before decrypting (stored secrets are short). */
const MAX_SEALED_LENGTH = 1024;

export interface SecretSealer {
  /** `v1.<nonce>.<ciphertext+tag>` (base64url), bound to `context` (e.g. the API key id). */
  seal(plain: string, context: string): string;
  /** The plain secret, or undefined when the value is malformed, tampered with or bound to another context. */
  unseal(sealed: string, context: string): string | undefined;
}

export function sealerFromKey(key: Buffer): SecretSealer {
  if (key.length !== KEY_BYTES) throw new Error(`a seal key is ${KEY_BYTES} bytes`);
  return {
    seal(plain, context) {
      const nonce = randomBytes(NONCE_BYTES);
      const cipher = createCipheriv('aes-256-gcm', key, nonce);
      cipher.setAAD(Buffer.from(context, 'utf8'));
      const body = Buffer.concat([cipher.update(plain, 'utf8'), cipher.final(), cipher.getAuthTag()]);
      return `${VERSION}.${nonce.toString('base64url')}.${body.toString('base64url')}`;
    },
    unseal(sealed, context) {
      if (typeof sealed !== 'string' || sealed.length > MAX_SEALED_LENGTH) return undefined;
      const [version, nonceText, bodyText, extra] = sealed.split('.');
      if (version !== VERSION || nonceText === undefined || bodyText === undefined || extra !== undefined) return undefined;
      const nonce = Buffer.from(nonceText, 'base64url');
      const body = Buffer.from(bodyText, 'base64url');
      if (nonce.length !== NONCE_BYTES || body.length < TAG_BYTES) return undefined;
      try {
        const decipher = createDecipheriv('aes-256-gcm', key, nonce, { authTagLength: TAG_BYTES });
        decipher.setAAD(Buffer.from(context, 'utf8'));
        decipher.setAuthTag(body.subarray(body.length - TAG_BYTES));
        return Buffer.concat([decipher.update(body.subarray(0, body.length - TAG_BYTES)), decipher.final()]).toString('utf8');
      } catch {
        return undefined;
      }
    },
  };
}

const byDataDir = new Map<string, SecretSealer>();

/**
 * The sealer of a data directory: its key file is read (or made, 0600, exclusively so two
 * processes starting at once agree on one key) once per process.
 */
export function sealerForDataDir(dataDir: string): SecretSealer {
  const file = path.join(path.resolve(dataDir), SEAL_KEY_FILE);
  let sealer = byDataDir.get(file);
  if (!sealer) {
    sealer = sealerFromKey(readOrCreateKey(file));
    byDataDir.set(file, sealer);
  }
  return sealer;
}

function readOrCreateKey(file: string): Buffer {
  try {
    fs.writeFileSync(file, randomBytes(KEY_BYTES).toString('base64') + '\n', { mode: 0o600, flag: 'wx' });
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== 'EEXIST') throw error;
  }
  const stat = fs.statSync(file);
  if ((stat.mode & 0o077) !== 0) fs.chmodSync(file, 0o600);
  const key = Buffer.from(fs.readFileSync(file, 'utf8').trim(), 'base64');
  if (key.length !== KEY_BYTES) {
    throw new CocoonError('invalid_config', `${file} does not hold a ${KEY_BYTES}-byte base64 key; restore it from a backup (API keys sealed with it cannot sign AWS requests otherwise)`);
  }
  return key;
}
