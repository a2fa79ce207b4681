import type { StrategyEndpoint } from './strategies/strategy.js'
import { UpstreamPool } from './upstream-pool.js'

/** Upstream HTTP connections per endpoint; past it, requests wait for one. */
const MAX_CONNECTIONS = 256

/**
 * One endpoint of a service as the gateway sees it: its upstream connection
 * pool, what is in flight to it, its latency and its outlier state.
 */
export class UpstreamEndpoint implements StrategyEndpoint {
  readonly pool: UpstreamPool
  weight: number
  priority: number
  inFlight = 0
  requests = 0
  failures = 0
  consecutiveFailures = 0
  ewmaMs: number | null = null
  sampledAt = 0
  ejected = false
  timesEjected = 0
  ejectionTimer: NodeJS.Timeout | undefined
  /** In the routable set: takes new requests (ejection aside). */
  routable = true
  /** endpointDied was called: whatever fails on it now is its death, not an outlier. */
  dead = false
  /** TCP proxy connections open to it, to cut them when it dies. */
  readonly connections = new Set<{ destroy: () => void }>()
  /** whenIdle() callers, until the count drops to zero; none most of the time. */
  private idleWaiters: Set<() => void> | undefined

  constructor (readonly id: string, readonly host: string, weight: number, priority: number, connectTimeoutMs: number) {
    this.weight = weight
    this.priority = priority
    this.pool = new UpstreamPool(host, connectTimeoutMs, MAX_CONNECTIONS)
  }

  /** A request or TCP connection to it begins. */
  begin (): void {
    this.inFlight++
    this.requests++
  }

  /** One ends; at zero, whoever waits for it to be idle goes on. */
  end (): void {
    if (--this.inFlight > 0 || this.idleWaiters === undefined) return
    const waiters = this.idleWaiters
    this.idleWaiters = undefined
    for (const w of waiters) w()
  }

  /**
   * Resolves true once nothing is in flight to it (at once when nothing is),
   * false when `timeoutMs` passes first: what a drain waits on, instead of
   * polling the count.
   */
  async whenIdle (timeoutMs: number): Promise<boolean> {
    if (this.inFlight === 0) return true
    return await new Promise((resolve) => {
      const waiter = (): void => {
        clearTimeout(timer)
        resolve(true)
      }
      const timer = setTimeout(() => {
        this.idleWaiters?.delete(waiter)
        resolve(false)
      }, timeoutMs)
      ;(this.idleWaiters ??= new Set()).add(waiter)
    })
  }

  /** Folds a response-header latency into the EWMA. */
  sample (ms: number, now: number): void {
    this.ewmaMs = this.ewmaMs === null ? ms : this.ewmaMs + 0.3 * (ms - this.ewmaMs)
    this.sampledAt = now
  }

  /** Cuts everything open to it: upstream HTTP connections (their requests fail, and are retried) and TCP connections. */
  abortAll (): void {
    this.pool.destroy()
    for (const c of [...this.connections]) c.destroy()
  }

  close (): void {
    clearTimeout(this.ejectionTimer)
    this.pool.destroy()
  }
}
