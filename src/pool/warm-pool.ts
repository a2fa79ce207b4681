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
}

export interface Claim<T> {
  instance: T
  /** `pool`: it was ready; `cold`: made for this claim. */
  path: 'pool' | 'cold'
  waitedMs: number
}

export interface PoolStats { ready: number, creating: number, claimed: number, hits: number, misses: number, waits: number, failures: number }

/**
 * A warm pool: keeps `min` instances ready, hands them out on `claim`, and
 * refills in the background with bounded concurrency. An empty pool
 * follows its policy (create one beyond the pool, queue until one is ready,
 * or reject), and so does a release (destroy, or recycle: destroy and make a
 * fresh one). Events: 'changed' after any change of the counts.
 */
export class WarmPool<T> extends EventEmitter {
  readonly #factory: InstanceFactory<T>
  #policy: PoolPolicy
  readonly #ready: T[] = []
  readonly #claimed = new Set<T>()
  #creating = 0
  readonly #waiters: Array<{ resolve: (claim: Claim<T>) => void, reject: (err: Error) => void, timer: NodeJS.Timeout, since: number }> = []
  readonly #stats = { hits: 0, misses: 0, waits: 0, failures: 0 }
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
    return { ready: this.#ready.length, creating: this.#creating, claimed: this.#claimed.size, ...this.#stats }
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
    for (const w of this.#waiters.splice(0)) {
      clearTimeout(w.timer)
      w.reject(new UigniterError('UIG_ERR_POOL_CLOSED', 'the daemon is stopping'))
    }
  }

  /** Destroys every ready instance and fails queued claims; claimed ones stay with their holders. */
  async close (): Promise<void> {
    this.#closed = true
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
    if (this.#closed || this.#stopped) return
    const want = this.#policy.min + this.#waiters.length + extra
    while (this.#ready.length + this.#creating < want &&
      this.#total() < this.#policy.max &&
      this.#creating < this.#policy.refillConcurrency) {
      this.#creating++
      this.#changed()
      this.#factory.create().then((instance) => {
        this.#creating--
        this.#arrive(instance)
      }, () => {
        this.#creating--
        this.#stats.failures++
        this.#changed()
        // A failed make is retried by the next claim or release, not in a tight loop.
      })
    }
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
}
