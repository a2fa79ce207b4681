import type { Command } from '../cli/args.js'
import { loadConfig } from '../core/config.js'
import { createLogger } from '../core/logger.js'
import { startDaemon } from './daemon.js'

/** `uigniter daemon`: the composition root in the foreground, until SIGINT or SIGTERM. */
export const daemonCommand: Command = {
  name: 'daemon',
  summary: 'Run the daemon in the foreground (the CLI starts one in the background when needed).',
  usage: 'uigniter daemon',
  options: {},
  help: ['Config: /etc/uigniter/config.json or UIGNITER_CONFIG; see README.md. Log level: UIGNITER_LOG_LEVEL (default info).'],
  run: async () => {
    const log = createLogger(process.env.UIGNITER_LOG_LEVEL ?? 'info')
    const daemon = await startDaemon(loadConfig(), log)
    await new Promise<void>((resolve) => {
      const stop = (): void => { resolve() }
      process.once('SIGINT', stop)
      process.once('SIGTERM', stop)
    })
    log.info('shutting down; VMs keep running')
    await daemon.close()
    // Everything is closed; a handle someone forgot must not keep a stopped daemon alive.
    setTimeout(() => {
      log.warn('a handle kept the process alive after shutdown; exiting anyway')
      process.exit(0)
    }, 3000).unref()
    return 0
  }
}
