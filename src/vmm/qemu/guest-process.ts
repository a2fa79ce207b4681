import { spawn, type ChildProcess } from 'node:child_process'
import { EventEmitter } from 'node:events'
import { UigniterError } from '../../core/errors.js'
import { parseConsoleMarker, type ConsoleMarker } from './console-markers.js'

/** How a guest ended: the app's status when the init reported it, else why QEMU ended. */
export interface GuestExit {
  appExitCode?: number
  appSignal?: number
  qemuExitCode: number | null
  qemuSignal: NodeJS.Signals | null
  reason: 'app-exited' | 'exec-failed' | 'killed' | 'qemu-error' | 'guest-crashed'
  /** QEMU's own error output, when it said anything. */
  qemuError: string
}

export interface GuestTimings {
  spawnedAt: number
  initAt?: number
  appStartedAt?: number
  firstOutputAt?: number
  exitedAt?: number
}

/**
 * One QEMU process whose serial console is its stdout. It splits the console
 * into lines, recognises the init's markers, and records when each stage was
 * reached (for `image test` and the boot benchmark). Events: 'line' (every
 * console line that is not a marker), 'marker', 'exit'.
 */
export class GuestProcess extends EventEmitter {
  readonly timings: GuestTimings
  readonly exited: Promise<GuestExit>
  readonly #child: ChildProcess
  #marker: { appExit?: ConsoleMarker, execFailed?: boolean } = {}
  #stderr = ''
  #appStarted = false

  constructor (qemuBinary: string, args: string[]) {
    super()
    this.timings = { spawnedAt: performance.now() }
    this.#child = spawn(qemuBinary, args, { stdio: ['ignore', 'pipe', 'pipe'] })
    let partial = ''
    this.#child.stdout?.on('data', (chunk: Buffer) => {
      const lines = (partial + chunk.toString('utf8')).split('\n')
      partial = lines.pop() ?? ''
      for (const line of lines) this.#onLine(line.replace(/\r$/, ''))
    })
    this.#child.stderr?.on('data', (chunk: Buffer) => { this.#stderr = (this.#stderr + chunk.toString()).slice(-8192) })
    this.exited = new Promise((resolve, reject) => {
      this.#child.on('error', (err) => {
        reject(new UigniterError('UIG_ERR_HOST_MISSING_TOOL', `cannot start ${qemuBinary}: ${err.message}; run "npm run setup" to install qemu-system-x86`, { cause: err }))
      })
      this.#child.on('close', (code, signal) => {
        if (partial !== '') this.#onLine(partial)
        this.timings.exitedAt = performance.now()
        const result = this.#describeExit(code, signal)
        this.emit('exit', result)
        resolve(result)
      })
    })
    // 'exit' listeners are optional; the promise is the main way to wait.
    this.exited.catch(() => {})
  }

  get pid (): number | undefined {
    return this.#child.pid
  }

  /** Ends QEMU at once (the graceful path goes through the control channel). */
  kill (signal: NodeJS.Signals = 'SIGKILL'): void {
    this.#child.kill(signal)
  }

  /** Resolves when a marker of that kind appears; rejects on exit or deadline. */
  async waitForMarker (kind: ConsoleMarker['kind'], timeoutMs: number): Promise<ConsoleMarker> {
    return await new Promise((resolve, reject) => {
      const timer = setTimeout(() => { cleanup(); reject(new UigniterError('UIG_ERR_VM_TIMEOUT', `the guest did not report ${kind} within ${timeoutMs} ms`)) }, timeoutMs)
      const onMarker = (m: ConsoleMarker): void => { if (m.kind === kind) { cleanup(); resolve(m) } }
      const onExit = (e: GuestExit): void => {
        cleanup()
        reject(new UigniterError(e.reason === 'exec-failed' ? 'UIG_ERR_VM_APP_NOT_STARTED' : 'UIG_ERR_VM_BOOT_FAILED',
          `the guest ended before ${kind}: ${describeGuestExit(e)}`))
      }
      const cleanup = (): void => { clearTimeout(timer); this.off('marker', onMarker); this.off('exit', onExit) }
      this.on('marker', onMarker)
      this.on('exit', onExit)
    })
  }

  #onLine (line: string): void {
    const marker = parseConsoleMarker(line)
    const now = performance.now()
    if (marker === undefined) {
      if (this.#appStarted && this.timings.firstOutputAt === undefined && line.trim() !== '') this.timings.firstOutputAt = now
      this.emit('line', line)
      return
    }
    if (marker.kind === 'init') this.timings.initAt = now
    if (marker.kind === 'app-started') { this.timings.appStartedAt = now; this.#appStarted = true }
    if (marker.kind === 'exit') this.#marker.appExit = marker
    if (marker.kind === 'exec-failed') this.#marker.execFailed = true
    this.emit('marker', marker)
  }

  #describeExit (code: number | null, signal: NodeJS.Signals | null): GuestExit {
    const base = { qemuExitCode: code, qemuSignal: signal, qemuError: this.#stderr.trim() }
    const appExit = this.#marker.appExit
    if (appExit?.kind === 'exit') {
      return { ...base, appExitCode: appExit.code, appSignal: appExit.signal, reason: this.#marker.execFailed === true ? 'exec-failed' : 'app-exited' }
    }
    if (signal !== null) return { ...base, reason: 'killed' }
    if (code !== 0) return { ...base, reason: 'qemu-error' }
    // QEMU exited cleanly but the init never reported the app's end: the guest rebooted on a panic.
    return { ...base, reason: 'guest-crashed' }
  }
}

/** One line for people: "app exited with code 0", "QEMU was killed by SIGKILL", ... */
export function describeGuestExit (e: GuestExit): string {
  switch (e.reason) {
    case 'app-exited': return e.appSignal !== undefined ? `app killed by signal ${e.appSignal}` : `app exited with code ${e.appExitCode ?? '?'}`
    case 'exec-failed': return 'the app could not be started (exec failed)'
    case 'killed': return `QEMU was killed by ${e.qemuSignal ?? 'a signal'}`
    case 'qemu-error': return `QEMU failed with exit code ${e.qemuExitCode ?? '?'}${e.qemuError !== '' ? `: ${e.qemuError.split('\n').slice(-3).join(' ')}` : ''}`
    case 'guest-crashed': return 'the guest stopped without the init reporting the app\'s end (kernel panic or crash)'
  }
}
