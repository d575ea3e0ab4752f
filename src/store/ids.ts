import { randomBytes } from 'node:crypto';

/**
 * Resource ids: a short type prefix, '-', then 26 characters of lower-case Crockford base32:
 * 48 bits of milliseconds since the epoch and 80 random bits (the ULID layout), e.g.
 * `mvm-01jdq8w1x7e4k3r9s2tq6v5b0c`. Time first makes ids sort by creation, which keyset
 * pagination relies on; within one millisecond the random part counts up (ULID's monotonic
 * mode), so ids made by this process sort exactly in creation order. Lower case and '-' keep
 * them valid as a DNS label (the gateway routes `<microvm id>.<domain>`).
 */
export const ID_PREFIXES = {
  tenant: 'tnt',
  apiKey: 'key',
  bundle: 'bdl',
  image: 'img',
  microvm: 'mvm',
  token: 'tok',
} as const;
export type IdKind = keyof typeof ID_PREFIXES;

const ALPHABET = '0123456789abcdefghjkmnpqrstvwxyz';
export const ID_PATTERN = /^[a-z]{3}-[0-9a-hjkmnp-tv-z]{26}$/;
const RANDOM_BITS = 80n;
const RANDOM_LIMIT = 1n << RANDOM_BITS;

let lastTime = -1;
let lastRandom = 0n;

export function newId(kind: IdKind, now: number = Date.now()): string {
  let time = Math.max(0, Math.floor(now));
  let random: bigint;
  if (time <= lastTime) {
    // Same millisecond (or a clock that stepped back): continue after the previous id.
    time = lastTime;
    random = lastRandom + 1n;
    if (random >= RANDOM_LIMIT) {
      time += 1;
      random = BigInt(`0x${randomBytes(10).toString('hex')}`) >> 1n;
    }
  } else {
    // Fresh randomness; the top bit clear leaves room to count up within the millisecond.
    random = BigInt(`0x${randomBytes(10).toString('hex')}`) >> 1n;
  }
  lastTime = time;
  lastRandom = random;
  return `${ID_PREFIXES[kind]}-${encode(BigInt(time), 10)}${encode(random, 16)}`;
}

function encode(value: bigint, length: number): string {
  let text = '';
  for (let i = 0; i < length; i++) {
    text = (ALPHABET[Number(value & 31n)] as string) + text;
    value >>= 5n;
  }
  return text;
}

export function isId(value: unknown, kind?: IdKind): value is string {
  if (typeof value !== 'string' || !ID_PATTERN.test(value)) return false;
  return kind === undefined || value.startsWith(`${ID_PREFIXES[kind]}-`);
}
