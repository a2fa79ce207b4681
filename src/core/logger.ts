import { pino, type Logger } from 'pino'

export type { Logger }

/**
 * The root logger. Components take child loggers (`logger.child({ component })`).
 * Level from UIGNITER_LOG_LEVEL; the CLI keeps it at "warn" so that its own
 * output stays readable.
 */
export function createLogger (level = process.env.UIGNITER_LOG_LEVEL ?? 'warn'): Logger {
  return pino({ level, base: undefined }, pino.destination(2))
}
