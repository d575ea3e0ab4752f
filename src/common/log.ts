import { pino, type Logger } from 'pino';

/**
 * The platform logger. Secrets never reach it: fields that may carry one are redacted here,
 * once, instead of at every call site.
 */
export const log: Logger = pino({
  level: process.env.COCOON_LOG_LEVEL ?? (process.env.NODE_ENV === 'test' ? 'warn' : 'info'),
  redact: {
    paths: [
      'token', '*.token', 'apiKey', '*.apiKey', 'authorization', '*.authorization',
      'req.headers.authorization', 'req.headers["x-cocoon-token"]', 'req.headers.cookie',
      'headers.authorization', 'headers["x-cocoon-token"]', 'headers.cookie',
    ],
    censor: '[redacted]',
  },
});

export type { Logger };
