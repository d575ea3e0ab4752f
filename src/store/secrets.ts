import { createHash, randomBytes } from 'node:crypto';

/**
 * API keys and microVM tokens: 256 random bits, base64url, behind a recognisable prefix (so
 * secret scanners and humans can tell what leaked). Only the SHA-256 of a secret is stored. A
 * plain hash is enough for a 256-bit random secret (no dictionary to attack). API keys are
 * looked up by hash (timing can reveal at most bits of the hash of a guess); tokens carry their
 * id and are compared in constant time (see tokens.ts).
 */
export const API_KEY_PREFIX = 'cocoon_ak_';
export const TOKEN_PREFIX = 'cocoon_tk_';
/** Longer presented secrets are refused before hashing. */
export const MAX_SECRET_LENGTH = 200;

export function newSecret(prefix: string): string {
  return prefix + randomBytes(32).toString('base64url');
}

export function hashSecret(secret: string): string {
  return createHash('sha256').update(secret, 'utf8').digest('hex');
}

/** The part of a secret safe to show again (list views, logs): its type prefix and 4 characters. */
export function displayPrefix(secret: string, prefix: string): string {
  return secret.slice(0, prefix.length + 4);
}

export function isPlausibleSecret(value: unknown, prefix: string): value is string {
  return typeof value === 'string' && value.length <= MAX_SECRET_LENGTH && value.startsWith(prefix);
}
