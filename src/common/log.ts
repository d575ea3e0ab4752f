import { pino, type Logger } from 'pino';
import { setting } from './settings.ts';

/**
 * The platform logger. Secrets never reach it: fields that may carry one are redacted here,
 * once, instead of at every call site.
 */
export const log: Logger = pino({
  level: initialLevel(),
  redact: {
    paths: [
      'token', '*.token', 'apiKey', '*.apiKey', 'authorization', '*.authorization',
      'req.headers.authorization', 'req.headers["x-cocoon-token"]', 'req.headers.cookie',
      'headers.authorization', 'headers["x-cocoon-token"]', 'headers.cookie',
    ],
    censor: '[redacted]',
  },
});

/** COCOON_LOG_LEVEL, or the default while it is bad (the server's start check reports it). */
function initialLevel(): string {
  try {
    return setting('COCOON_LOG_LEVEL');
  } catch {
    return 'info';
  }
}

export type { Logger };
