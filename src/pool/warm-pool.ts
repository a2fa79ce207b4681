import { EventEmitter } from 'node:events'
import { UigniterError } from '../core/errors.js'

/** Makes and disposes of the pool's instances (VMs, in the daemon). */
export interface InstanceFactory<T> {
  create: () => Promise<T>
  destroy: (instance: T) => Promise<void>
}

export type EmptyPolicy = 'create' | 'queue' | 'reject'
export type ReleasePolicy = 'destroy' | 'recycle'

export interface PoolPolicy {
  /** Ready instances kept at all times (refilled in the background). */
  min: number
  /** Instances in all: ready, being made, and claimed. */
  max: number
  /** What a claim does when nothing is ready. */
  onEmpty: EmptyPolicy
  /** How long a queued claim waits before it fails. */
  queueTimeoutMs: number
  /** What happens to a released instance: destroyed, or replaced by a fresh one (never reused dirty). */
  onRelease: ReleasePolicy
  /** Instances made at once by the background refill, so that it cannot starve claims of CPU. */
  refillConcurrency: number
  /** After a failed make, the refill waits this long (default 1 s), doubling per failure in a row ... */
  retryBaseMs?: number
  /** ... up to this (default 30 s). */
  retryMaxMs?: number
}

export interface Claim<T> {
  instance: T
  /** `pool`: it was ready; `cold`: made for this claim. */
  path: 'pool' | 'cold'
  waitedMs: number
}

export interface PoolStats {
  ready: number
  creating: number
  claimed: number
  hits: number
  misses: number
  waits: number
  failures: number
  /** Makes that failed in a row; 0 once one succeeds. */
  consecutiveFailures: number
  lastError: string | null
  /** When the refill tries again after failures (ISO 8601), or null when it is not backing off. */
  retryAt: string | null
}

/** Emitted as 'create-failed' after a failed make of the refill. */
export interface CreateFailure { error: Error, consecutiveFailures: number, retryInMs: number }

/**
 * A warm pool: keeps `min` instances ready, hands them out on `claim`, and
 * refills in the background with bounded concurrency. An empty pool
 * follows its policy (create one beyond the pool, queue until one is ready,
 * or reject), and so does a release (destroy, or recycle: destroy and make a
 * fresh one). A failed make is retried with an exponential backoff until the
 * pool is back at `min`, whether or not anyone claims. Events: 'changed'
 * after any change of the counts; 'create-failed' (CreateFailure) after a
 * failed make; 'recovered' when a make succeeds after failures.
 */
export class WarmPool<T> extends EventEmitter {
  readonly #factory: InstanceFactory<T>
  #policy: PoolPolicy
  readonly #ready: T[] = []
  readonly #claimed = new Set<T>()
  #creating = 0
  readonly #waiters: Array<{ resolve: (claim: Claim<T>) => void, reject: (err: Error) => void, timer: NodeJS.Timeout, since: number }> = []
  readonly #stats = { hits: 0, misses: 0, waits: 0, failures: 0 }
  #consecutiveFailures = 0
  #lastError: string | null = null
  /** Set while the refill backs off after failures; its timer refills when it fires. */
  #retry: { at: number, timer: NodeJS.Timeout } | undefined
  #closed = false
  /** The daemon stops: no more instances are made, none is destroyed. */
  #stopped = false

  constructor (factory: InstanceFactory<T>, policy: PoolPolicy) {
    super()
    validatePolicy(policy)
    this.#factory = factory
    this.#policy = { ...policy }
  }

  get policy (): Readonly<PoolPolicy> {
    return this.#policy
  }

  stats (): PoolStats {
    return {
      ready: this.#ready.length,
      creating: this.#creating,
      claimed: this.#claimed.size,
      ...this.#stats,
      consecutiveFailures: this.#consecutiveFailures,
      lastError: this.#lastError,
      retryAt: this.#retry !== undefined ? new Date(this.#retry.at).toISOString() : null
    }
  }

  /** Starts filling to `min`. */
  start (): void {
    this.#refill()
  }

  /** Changes the bounds; extra ready instances beyond the new bounds are destroyed. */
  async resize (min: number, max: number): Promise<void> {
    const next = { ...this.#policy, min, max }
    validatePolicy(next)
    this.#policy = next
    const excess: T[] = []
    while (this.#ready.length > 0 && this.#total() > max) excess.push(this.#ready.pop() as T)
    this.#changed()
    await Promise.all(excess.map(async (i) => await this.#destroy(i)))
    this.#refill()
  }

  /** Hands out an instance following the empty-pool policy (overridable per claim). */
  async claim (options: { onEmpty?: EmptyPolicy, queueTimeoutMs?: number } = {}): Promise<Claim<T>> {
    if (this.#closed) throw new UigniterError('UIG_ERR_POOL_CLOSED', 'the pool is being deleted')
    const started = performance.now()
    const ready = this.#ready.shift()
    if (ready !== undefined) {
      this.#stats.hits++
      this.#claimed.add(ready)
      this.#changed()
      this.#refill()
      return { instance: ready, path: 'pool', waitedMs: performance.now() - started }
    }
    this.#stats.misses++
    const onEmpty = options.onEmpty ?? this.#policy.onEmpty
    if (onEmpty === 'reject') {
      this.#changed()
      throw new UigniterError('UIG_ERR_POOL_EMPTY', `the pool has no ready instance (${this.#creating} being made) and its policy is "reject"`)
    }
    if (onEmpty === 'create') {
      // Beyond the pool: this one does not count against max, and is made for this caller alone.
      this.#changed()
      const instance = await this.#create()
      this.#claimed.add(instance)
      this.#changed()
      return { instance, path: 'cold', waitedMs: performance.now() - started }
    }
    this.#stats.waits++
    const timeoutMs = options.queueTimeoutMs ?? this.#policy.queueTimeoutMs
    const claim = new Promise<Claim<T>>((resolve, reject) => {
      const timer = setTimeout(() => {
        const i = this.#waiters.findIndex((w) => w.timer === timer)
        if (i >= 0) this.#waiters.splice(i, 1)
        reject(new UigniterError('UIG_ERR_POOL_TIMEOUT', `no instance became ready within ${timeoutMs} ms; raise the pool's minimum or the queue timeout`))
      }, timeoutMs)
      this.#waiters.push({ resolve, reject, timer, since: started })
    })
    this.#changed()
    this.#refill()
    return await claim
  }

  /** Gives an instance back: destroyed, or recycled (destroyed and replaced by a fresh one). */
  async release (instance: T, options: { onRelease?: ReleasePolicy } = {}): Promise<void> {
    if (!this.#claimed.delete(instance)) throw new UigniterError('UIG_ERR_POOL_NOT_CLAIMED', 'this instance was not claimed from this pool')
    this.#changed()
    await this.#destroy(instance)
    // Recycle and destroy differ only in what follows: the refill makes a fresh one when recycling.
    if ((options.onRelease ?? this.#policy.onRelease) === 'recycle') this.#refill(1)
  }

  /**
   * Takes in an instance that already exists (found again after a daemon
   * restart). No refill here: adopt them all, then `start()`.
   */
  adopt (instance: T, claimed: boolean): void {
    if (claimed) this.#claimed.add(instance)
    else this.#ready.push(instance)
    this.#changed()
  }

  /** Forgets an instance that ended on its own (a crash); the refill replaces a ready one. */
  discard (instance: T): void {
    const i = this.#ready.indexOf(instance)
    if (i >= 0) this.#ready.splice(i, 1)
    this.#claimed.delete(instance)
    this.#changed()
    this.#refill()
  }

  /**
   * Stops making instances and fails queued claims, destroying nothing: the
   * daemon is going away, and the next one adopts the instances.
   */
  stop (): void {
    this.#stopped = true
    this.#cancelRetry()
    for (const w of this.#waiters.splice(0)) {
      clearTimeout(w.timer)
      w.reject(new UigniterError('UIG_ERR_POOL_CLOSED', 'the daemon is stopping'))
    }
  }

  /** Destroys every ready instance and fails queued claims; claimed ones stay with their holders. */
  async close (): Promise<void> {
    this.#closed = true
    this.#cancelRetry()
    for (const w of this.#waiters.splice(0)) {
      clearTimeout(w.timer)
      w.reject(new UigniterError('UIG_ERR_POOL_CLOSED', 'the pool was deleted while this claim waited'))
    }
    const ready = this.#ready.splice(0)
    this.#changed()
    await Promise.all(ready.map(async (i) => await this.#destroy(i)))
  }

  #total (): number {
    return this.#ready.length + this.#creating + this.#claimed.size
  }

  /**
   * Makes instances until `min` are ready (plus one per waiter, plus `extra`),
   * never more than `max` in all nor more than `refillConcurrency` at once.
   */
  #refill (extra = 0): void {
    // While backing off, claims and releases do not retry early: that would be the tight loop the backoff prevents.
    if (this.#closed || this.#stopped || this.#retry !== undefined) return
    const want = this.#policy.min + this.#waiters.length + extra
    while (this.#ready.length + this.#creating < want &&
      this.#total() < this.#policy.max &&
      this.#creating < this.#policy.refillConcurrency) {
      this.#creating++
      this.#changed()
      this.#factory.create().then((instance) => {
        this.#creating--
        if (this.#consecutiveFailures > 0) {
          this.#consecutiveFailures = 0
          this.emit('recovered')
        }
        this.#arrive(instance)
      }, (err: unknown) => {
        this.#creating--
        this.#failed(err)
      })
    }
  }

  /** Counts a failed make and schedules the next refill after the backoff. */
  #failed (err: unknown): void {
    this.#stats.failures++
    this.#consecutiveFailures++
    const error = err instanceof Error ? err : new Error(String(err))
    this.#lastError = error.message
    const base = this.#policy.retryBaseMs ?? 1000
    const retryInMs = Math.min(this.#policy.retryMaxMs ?? 30_000, base * 2 ** (this.#consecutiveFailures - 1))
    if (!this.#closed && !this.#stopped) {
      this.#cancelRetry()
      const timer = setTimeout(() => {
        this.#retry = undefined
        this.#refill()
        this.#changed()
      }, retryInMs)
      // The backoff alone must not keep a process alive.
      timer.unref()
      this.#retry = { at: Date.now() + retryInMs, timer }
    }
    this.#changed()
    this.emit('create-failed', { error, consecutiveFailures: this.#consecutiveFailures, retryInMs } satisfies CreateFailure)
  }

  #cancelRetry (): void {
    if (this.#retry !== undefined) clearTimeout(this.#retry.timer)
    this.#retry = undefined
  }

  #arrive (instance: T): void {
    if (this.#closed) {
      void this.#destroy(instance)
      return
    }
    const waiter = this.#waiters.shift()
    if (waiter !== undefined) {
      clearTimeout(waiter.timer)
      this.#claimed.add(instance)
      waiter.resolve({ instance, path: 'pool', waitedMs: performance.now() - waiter.since })
    } else {
      this.#ready.push(instance)
    }
    this.#changed()
    this.#refill()
  }

  async #create (): Promise<T> {
    try {
      return await this.#factory.create()
    } catch (err) {
      this.#stats.failures++
      throw err
    }
  }

  async #destroy (instance: T): Promise<void> {
    try {
      await this.#factory.destroy(instance)
    } catch {
      this.#stats.failures++
    }
  }

  #changed (): void {
    this.emit('changed', this.stats())
  }
}

function validatePolicy (p: PoolPolicy): void {
  const bad = (why: string): never => { throw new UigniterError('UIG_ERR_POOL_POLICY_INVALID', `invalid pool policy: ${why}`) }
  if (!Number.isInteger(p.min) || p.min < 0) bad(`min must be an integer ≥ 0, not ${p.min}`)
  if (!Number.isInteger(p.max) || p.max < 1) bad(`max must be an integer ≥ 1, not ${p.max}`)
  if (p.min > p.max) bad(`min (${p.min}) is larger than max (${p.max})`)
  if (!Number.isInteger(p.refillConcurrency) || p.refillConcurrency < 1) bad(`refillConcurrency must be ≥ 1, not ${p.refillConcurrency}`)
  if (!(p.queueTimeoutMs >= 0)) bad(`queueTimeoutMs must be ≥ 0, not ${p.queueTimeoutMs}`)
  if (p.retryBaseMs !== undefined && !(p.retryBaseMs >= 1)) bad(`retryBaseMs must be ≥ 1, not ${p.retryBaseMs}`)
  if (p.retryMaxMs !== undefined && !(p.retryMaxMs >= (p.retryBaseMs ?? 1))) bad(`retryMaxMs must be ≥ retryBaseMs, not ${p.retryMaxMs}`)
}
