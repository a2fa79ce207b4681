/**
 * SIGINT and SIGTERM stop a bench after the step under way, so that its
 * cleanup (VMs, daemons, namespaces) still runs; a second signal stops it
 * at once. Steps call `check()` between them.
 */
export class Interrupt {
  interrupted = false

  constructor (progress: (message: string) => void) {
    for (const signal of ['SIGINT', 'SIGTERM'] as const) {
      process.on(signal, () => {
        if (this.interrupted) process.exit(130)
        this.interrupted = true
        progress(`${signal}: stopping after this step (again to stop now)`)
      })
    }
  }

  /** Throws once a signal came: the bench goes on to its cleanup. */
  check (): void {
    if (this.interrupted) throw new Error('interrupted')
  }
}
