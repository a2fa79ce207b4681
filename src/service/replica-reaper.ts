import { UigniterError } from '../core/errors.js'
import type { Logger } from '../core/logger.js'
import type { Vm } from '../core/vm.js'

/** What the reaper needs of the VM side (VmManager does it). */
export interface ReapableVms {
  stop: (idOrName: string, graceMs?: number) => Promise<Vm>
  remove: (idOrName: string, force?: boolean) => Promise<Vm>
}

export interface ReaperOptions {
  /** First retry after this long, doubling up to `maxRetryMs`. */
  baseRetryMs?: number
  maxRetryMs?: number
}

/** Told of every failed attempt, with the delay before the next one. */
export type ReapFailure = (err: Error, attempt: number, retryInMs: number) => void

/**
 * Stops and removes the VMs a controller no longer wants. A removal that
 * fails (QEMU would not die, a tap would not go) is logged, told to
 * `onFailure` and retried with a backoff until it succeeds or the VM is gone,
 * so that no VM leaks without a word. One reaper serves every controller, so
 * that a deleted service's removals go on after its controller is gone.
 * `close()` drops the retries when the daemon stops: the next daemon adopts
 * what is left, and its controllers reap it again.
 */
export class ReplicaReaper {
  readonly #vms: ReapableVms
  readonly #log: Logger
  readonly #options: Required<ReaperOptions>
  readonly #retries = new Map<string, NodeJS.Timeout>()
  #closed = false

  constructor (vms: ReapableVms, log: Logger, options: ReaperOptions = {}) {
    this.#vms = vms
    this.#log = log
    this.#options = { baseRetryMs: options.baseRetryMs ?? 1000, maxRetryMs: options.maxRetryMs ?? 30_000 }
  }

  /** VMs whose removal failed and waits for its next try. */
  get pending (): number {
    return this.#retries.size
  }

  /**
   * Stops the VM (gracefully for `graceMs` when given) and removes it.
   * Resolves after the first attempt, whether it took or a retry is due.
   */
  async reap (vm: { id: string, name: string }, options: { graceMs?: number, onFailure?: ReapFailure } = {}): Promise<void> {
    await this.#attempt(vm, options.graceMs, options.onFailure, 1)
  }

  close (): void {
    this.#closed = true
    for (const timer of this.#retries.values()) clearTimeout(timer)
    this.#retries.clear()
  }

  async #attempt (vm: { id: string, name: string }, graceMs: number | undefined, onFailure: ReapFailure | undefined, attempt: number): Promise<void> {
    this.#retries.delete(vm.id)
    try {
      if (graceMs !== undefined) {
        // A failed graceful stop is not fatal: the forced removal kills it.
        await this.#vms.stop(vm.id, graceMs).catch((err: unknown) => {
          if (!isGone(err)) this.#log.debug({ err, vm: vm.id }, 'a graceful stop failed; removing by force')
        })
      }
      await this.#vms.remove(vm.id, true)
    } catch (err) {
      if (isGone(err) || this.#closed) return
      const retryInMs = Math.min(this.#options.maxRetryMs, this.#options.baseRetryMs * 2 ** (attempt - 1))
      this.#log.warn({ err, vm: vm.id, attempt, retryInMs }, `removing VM ${vm.name} failed; trying again in ${retryInMs} ms`)
      onFailure?.(err as Error, attempt, retryInMs)
      const timer = setTimeout(() => { void this.#attempt(vm, undefined, onFailure, attempt + 1) }, retryInMs)
      timer.unref()
      this.#retries.set(vm.id, timer)
    }
  }
}

function isGone (err: unknown): boolean {
  return err instanceof UigniterError && err.code === 'UIG_ERR_VM_NOT_FOUND'
}
