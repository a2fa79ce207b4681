import { parseConsoleMarker, type ConsoleMarker } from './console-markers.js'

/**
 * What the serial console says about a guest's life, gathered line by line:
 * the init's markers and the kernel's panic message. The exit of a VM is
 * decided from these facts together with what QEMU and the host report.
 */
export class ConsoleFacts {
  init = false
  appStartedPid: number | undefined
  exit: { code?: number, signal?: number } | undefined
  execFailed: { errno: number, error: string } | undefined
  initFailed: string | undefined
  /** The kernel's "Kernel panic - not syncing: ..." line, if it panicked. */
  panic: string | undefined
  #partial = ''

  /** Takes console text in any chunks; returns the markers of the lines it completed. */
  feed (text: string): ConsoleMarker[] {
    const lines = (this.#partial + text).split('\n')
    this.#partial = lines.pop() ?? ''
    if (this.#partial.length > 8192) this.#partial = this.#partial.slice(-8192)
    const markers: ConsoleMarker[] = []
    for (const raw of lines) {
      const m = this.#line(raw.replace(/\r$/, ''))
      if (m !== undefined) markers.push(m)
    }
    return markers
  }

  /** Treats a last line without its newline as complete (QEMU has ended, nothing more will come). */
  end (): ConsoleMarker[] {
    const rest = this.#partial
    this.#partial = ''
    const m = rest === '' ? undefined : this.#line(rest)
    return m === undefined ? [] : [m]
  }

  #line (line: string): ConsoleMarker | undefined {
    const panic = /Kernel panic - not syncing:.*/.exec(line)
    if (panic !== null) this.panic ??= panic[0].trim()
    const marker = parseConsoleMarker(line)
    if (marker === undefined) return undefined
    switch (marker.kind) {
      case 'init': this.init = true; break
      case 'app-started': this.appStartedPid = marker.pid; break
      case 'exit': this.exit = marker.signal !== undefined ? { signal: marker.signal } : { code: marker.code }; break
      case 'exec-failed': this.execFailed = { errno: marker.errno, error: marker.error }; break
      case 'init-failed': this.initFailed = marker.error; break
      default: break
    }
    return marker
  }
}
