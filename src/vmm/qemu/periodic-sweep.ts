/**
 * One timer for many: every `intervalMs` it runs `check` over the items it
 * holds, `concurrency` at a time, and skips a round while the last one still
 * runs. A daemon with a thousand VMs has one timer per kind of check, not a
 * thousand, and the timer runs only while there is something to check. It
 * never keeps the process alive (unref). A failed check is reported to
 * `onError` and does not stop the others.
 *
 * @example
 * const sweep = new PeriodicSweep<QemuVm>(10_000, async (vm) => { await vm.checkLiveness() }, (err, vm) => log.warn({ err, vm: vm.id }))
 * sweep.add(vm) // ... sweep.delete(vm)
 */
export class PeriodicSweep<T> {
  readonly #items = new Set<T>()
  readonly #intervalMs: number
  readonly #check: (item: T) => Promise<void>
  readonly #onError: (err: unknown, item: T) => void
  readonly #concurrency: number
  #timer: NodeJS.Timeout | undefined
  #running = false

  constructor (intervalMs: number, check: (item: T) => Promise<void>, onError: (err: unknown, item: T) => void, concurrency = 16) {
    if (!Number.isFinite(intervalMs) || intervalMs < 1) throw new TypeError(`a sweep interval must be a positive number of ms, not ${intervalMs}`)
    this.#intervalMs = intervalMs
    this.#check = check
    this.#onError = onError
    this.#concurrency = concurrency
  }

  get size (): number {
    return this.#items.size
  }

  add (item: T): void {
    this.#items.add(item)
    if (this.#timer === undefined) {
      this.#timer = setInterval(() => { void this.runOnce() }, this.#intervalMs)
      this.#timer.unref()
    }
  }

  delete (item: T): void {
    this.#items.delete(item)
    if (this.#items.size === 0 && this.#timer !== undefined) {
      clearInterval(this.#timer)
      this.#timer = undefined
    }
  }

  /** One round now (the timer's, or a caller's); resolves when every check of it settled. */
  async runOnce (): Promise<void> {
    if (this.#running) return
    this.#running = true
    try {
      const items = [...this.#items]
      let next = 0
      const worker = async (): Promise<void> => {
        while (next < items.length) {
          const item = items[next++] as T
          // An item deleted during the round is skipped.
          if (!this.#items.has(item)) continue
          try {
            await this.#check(item)
          } catch (err) {
            this.#onError(err, item)
          }
        }
      }
      await Promise.all(Array.from({ length: Math.min(this.#concurrency, items.length) }, worker))
    } finally {
      this.#running = false
    }
  }
}
