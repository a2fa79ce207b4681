/**
 * Progress for long work (kernel builds, image builds). It draws one
 * self-overwriting line on an interactive terminal and stays silent in CI or
 * when stderr is not a TTY, so logs stay clean.
 */
export class Progress {
  readonly #label: string
  readonly #enabled: boolean
  readonly #started = Date.now()
  #last = 0

  constructor (label: string, stream: NodeJS.WriteStream = process.stderr) {
    this.#label = label
    this.#enabled = stream.isTTY && process.env.CI === undefined
    this.#stream = stream
  }

  readonly #stream: NodeJS.WriteStream

  /** Shows `label: text (elapsed)`; redraws at most 10 times a second. */
  update (text: string): void {
    if (!this.#enabled) return
    const now = Date.now()
    if (now - this.#last < 100) return
    this.#last = now
    const line = `${this.#label}: ${text} (${formatDuration(now - this.#started)})`
    this.#stream.write(`\r\x1b[2K${line.slice(0, (this.#stream.columns || 80) - 1)}`)
  }

  /** Clears the progress line; the caller prints the outcome itself. */
  done (): void {
    if (this.#enabled) this.#stream.write('\r\x1b[2K')
  }

  get elapsedMs (): number {
    return Date.now() - this.#started
  }
}

export function formatDuration (ms: number): string {
  if (ms < 1000) return `${Math.round(ms)}ms`
  const s = ms / 1000
  if (s < 60) return `${s.toFixed(1)}s`
  return `${Math.floor(s / 60)}m${String(Math.round(s % 60)).padStart(2, '0')}s`
}

export function formatBytes (n: number): string {
  if (n < 1024) return `${n} B`
  const units = ['KiB', 'MiB', 'GiB']
  let v = n
  let i = -1
  do { v /= 1024; i++ } while (v >= 1024 && i < units.length - 1)
  return `${v.toFixed(v < 10 ? 1 : 0)} ${units[i]}`
}
