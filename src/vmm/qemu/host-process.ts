import { readFile } from 'node:fs/promises'
import { basename } from 'node:path'

/** Linux's USER_HZ: /proc reports process start times in these ticks on every architecture we run on. */
const CLOCK_TICKS_PER_SECOND = 100

/**
 * Reads what /proc says about a host process: whether it is alive (a zombie
 * is not), its command line, and when it started. Used to find a QEMU again
 * after a daemon restart without trusting a pid that may have been recycled.
 */
export class HostProcess {
  readonly pid: number

  constructor (pid: number) {
    this.pid = pid
  }

  /** True while the process exists and has not exited (zombies count as exited). */
  async alive (): Promise<boolean> {
    const stat = await this.#stat()
    return stat !== undefined && stat.state !== 'Z' && stat.state !== 'X'
  }

  async cmdline (): Promise<string[] | undefined> {
    try {
      const raw = await readFile(`/proc/${this.pid}/cmdline`, 'utf8')
      return raw.split('\0').filter((a, i, all) => a !== '' || i < all.length - 1)
    } catch {
      return undefined
    }
  }

  /**
   * True when this pid runs a QEMU whose arguments mention `stateDir`: a pid
   * from an old pidfile may belong to any process by now.
   */
  async isQemuOf (stateDir: string): Promise<boolean> {
    const argv = await this.cmdline()
    if (argv === undefined || argv.length === 0) return false
    return basename(argv[0] ?? '').startsWith('qemu-system') && argv.some((a) => a.includes(`${stateDir}/`))
  }

  /** When the process started, in microseconds since the host booted (the clock of /dev/kmsg). */
  async startedAtBootUs (): Promise<number | undefined> {
    const stat = await this.#stat()
    return stat === undefined ? undefined : stat.startTicks * (1_000_000 / CLOCK_TICKS_PER_SECOND)
  }

  async #stat (): Promise<{ state: string, startTicks: number } | undefined> {
    let text: string
    try {
      text = await readFile(`/proc/${this.pid}/stat`, 'utf8')
    } catch {
      return undefined
    }
    // The command name (field 2) is in parentheses and may hold spaces or ')'.
    const fields = text.slice(text.lastIndexOf(')') + 2).split(' ')
    return { state: fields[0] ?? '?', startTicks: Number(fields[19] ?? 0) }
  }
}
