import type { Logger } from '../core/logger.js'
import type { GatewayEndpoint, GatewayRoute } from './gateway-route.js'
import { HoldQueue, type HeldItem } from './hold-queue.js'
import { createStrategy } from './strategies/create-strategy.js'
import type { Strategy } from './strategies/strategy.js'
import { UpstreamEndpoint } from './upstream-endpoint.js'

/** Outlier detection settings (see GatewayOptions.outlier). */
export interface OutlierSettings {
  consecutiveFailures: number
  ejectionMs: number
  maxEjectionMs: number
}

/** Where a service's request durations go (the gateway's histogram, one child per service). */
export interface DurationObserver {
  observe (seconds: number): void
}

/**
 * One TCP port of the service at the gateway, as the service keeps it (the
 * gateway opens and closes it; TcpListener is the one kind). Declared here so
 * that the service needs nothing of the listener, which needs the service.
 */
export interface ServiceListener {
  readonly gatewayPort: number
  /** The endpoints' port it proxies to; a route update may change it. */
  port: number
  /** Stops accepting; open connections go on. */
  close (): void
  /** Stops accepting and cuts every connection. */
  destroy (): void
}

/** What every service shares with the gateway. */
export interface ServiceContext {
  outlier: OutlierSettings
  connectTimeoutMs: number
  log: Logger
  durationOf (service: string): DurationObserver
  wake (service: string): void
  ejected (service: string, endpointId: string, reason: string): void
  readmitted (service: string, endpointId: string, reason: string): void
}

/** What a consistent-hash key is taken from, parsed once per configure. */
export type HashOn =
  | { kind: 'header', name: string }
  | { kind: 'cookie', name: string }
  | { kind: 'path' }
  | { kind: 'client-address' }

/**
 * Everything the gateway keeps about one service: its route, its endpoints
 * (routable ones, and removed ones still finishing their requests), the
 * strategy over the non-ejected ones, the held requests, the TCP listeners
 * and its counters. The counters are plain numbers that the metrics read at
 * scrape time, so that the request path touches no metric library.
 */
export class GatewayService {
  route: GatewayRoute
  strategy: Strategy<UpstreamEndpoint>
  /** Set for consistent-hash only: what its key is. */
  hashOn: HashOn | undefined
  /** Every endpoint it knows: routable, ejected, or removed with requests in flight. */
  readonly endpoints = new Map<string, UpstreamEndpoint>()
  /** Routable and not ejected: what the strategy picks from. */
  candidates: UpstreamEndpoint[] = []
  readonly held = new HoldQueue()
  readonly listeners = new Map<number, ServiceListener>()
  /** wake() was called since the service last had an endpoint. */
  woken = false
  removed = false

  inFlight = 0
  tcpOpen = 0
  lastRequestAt = 0
  /** Answered requests by status class: index 1 = 1xx ... 5 = 5xx. */
  readonly statusCounts = new Float64Array(6)
  retries = 0
  rejectedHoldLimit = 0
  rejectedTimeout = 0
  tcpConnections = 0
  upstreamFailures = 0
  ejections = 0
  private readonly duration: DurationObserver

  constructor (route: GatewayRoute, private readonly ctx: ServiceContext) {
    this.route = route
    this.strategy = createStrategy(route.loadBalancing.strategy)
    this.hashOn = parseHashOn(route)
    this.duration = ctx.durationOf(route.service)
  }

  get name (): string {
    return this.route.service
  }

  get log (): Logger {
    return this.ctx.log
  }

  /** Takes a new route; a new strategy only when the strategy changed. */
  applyRoute (route: GatewayRoute): void {
    const previous = this.route
    this.route = route
    this.hashOn = parseHashOn(route)
    if (previous.loadBalancing.strategy !== route.loadBalancing.strategy) {
      this.strategy = createStrategy(route.loadBalancing.strategy)
      this.strategy.update(this.candidates)
    }
  }

  /** Counts one answered request. */
  observe (seconds: number, statusCode: number): void {
    this.duration.observe(seconds)
    const cls = (statusCode / 100) | 0
    if (cls >= 1 && cls <= 5) this.statusCounts[cls] = (this.statusCounts[cls] as number) + 1
  }

  /**
   * The new routable set. An endpoint left out takes no new request and is
   * forgotten once its last one ends; one that stays keeps its state
   * (latency, ejection). A changed host is a new endpoint.
   */
  setEndpoints (list: readonly GatewayEndpoint[]): void {
    const wanted = new Set<string>()
    for (const e of list) {
      wanted.add(e.id)
      let ep = this.endpoints.get(e.id)
      if (ep !== undefined && (ep.host !== e.host || ep.dead)) {
        this.unroute(ep)
        ep = undefined
      }
      if (ep === undefined) {
        ep = new UpstreamEndpoint(e.id, e.host, e.weight, e.priority, this.ctx.connectTimeoutMs)
        this.endpoints.set(e.id, ep)
      }
      ep.weight = e.weight
      ep.priority = e.priority
      ep.routable = true
    }
    for (const ep of [...this.endpoints.values()]) if (!wanted.has(ep.id)) this.unroute(ep)
    this.rebuild()
  }

  /** The VM is gone: it takes nothing more, and what is open to it is cut (and retried, where safe). */
  endpointDied (id: string): void {
    const ep = this.endpoints.get(id)
    if (ep === undefined) return
    ep.dead = true
    this.unroute(ep)
    this.rebuild()
    ep.abortAll()
  }

  /** Stops routing to every endpoint; each is forgotten once idle. */
  unrouteAll (): void {
    for (const ep of [...this.endpoints.values()]) this.unroute(ep)
    this.rebuild()
  }

  /** An endpoint for a request or connection; see Strategy.pick. */
  pick (key: string | undefined, tried: readonly UpstreamEndpoint[] | undefined): UpstreamEndpoint | undefined {
    const ep = this.strategy.pick(key, tried)
    // Every candidate was tried: a fresh pick beats an error while there are endpoints.
    return ep ?? (tried === undefined ? undefined : this.strategy.pick(key, undefined))
  }

  acquire (ep: UpstreamEndpoint): void {
    ep.begin()
    this.inFlight++
  }

  release (ep: UpstreamEndpoint): void {
    ep.end()
    this.inFlight--
    if (ep.inFlight === 0 && !ep.routable) this.forget(ep)
  }

  /** A response (headers) or a TCP connect: the endpoint works. */
  recordSuccess (ep: UpstreamEndpoint): void {
    ep.consecutiveFailures = 0
    ep.timesEjected = 0
  }

  /**
   * A connection-level failure (refused, reset, timed out, hung up before
   * answering). HTTP 5xx answers do not count: the app answered, and
   * ejecting on an overloaded app's 503s would pile its load on the others.
   */
  recordFailure (ep: UpstreamEndpoint): void {
    ep.failures++
    ep.consecutiveFailures++
    this.upstreamFailures++
    if (ep.ejected || !ep.routable || ep.consecutiveFailures < this.ctx.outlier.consecutiveFailures) return
    // Fail open: the last endpoint standing is never ejected; a bad endpoint beats none.
    if (this.candidates.length <= 1) return
    ep.ejected = true
    ep.timesEjected++
    this.ejections++
    const ms = Math.min(this.ctx.outlier.ejectionMs * 2 ** (ep.timesEjected - 1), this.ctx.outlier.maxEjectionMs)
    ep.ejectionTimer = setTimeout(() => this.readmit(ep, `ejection of ${ms} ms ended`), ms)
    ep.ejectionTimer.unref()
    this.rebuild()
    const reason = `${ep.consecutiveFailures} consecutive connection failures; ejected for ${ms} ms`
    this.ctx.log.warn({ service: this.name, endpoint: ep.id, ms }, 'endpoint ejected')
    this.ctx.ejected(this.name, ep.id, reason)
  }

  /** Asks for an endpoint, once per stretch without one. */
  wakeOnce (): void {
    if (this.woken) return
    this.woken = true
    try {
      this.ctx.wake(this.name)
    } catch (err) {
      this.ctx.log.error({ err, service: this.name }, 'wake failed')
    }
  }

  /** Holds a request or connection until an endpoint appears; false when the hold limit is reached. */
  hold (item: HeldItem): boolean {
    if (this.held.size >= this.route.hold.maxRequests) return false
    this.held.add(item, this.route.hold.timeoutMs)
    return true
  }

  /** Forwards what was held, oldest first. */
  releaseHeld (): void {
    if (this.held.size === 0 || this.candidates.length === 0) return
    for (const item of this.held.take()) item.release()
  }

  close (): void {
    for (const ep of this.endpoints.values()) ep.close()
    this.endpoints.clear()
    this.candidates = []
  }

  private readmit (ep: UpstreamEndpoint, reason: string): void {
    if (!this.unEject(ep)) return
    if (this.endpoints.get(ep.id) === ep && ep.routable) {
      this.rebuild()
      this.ctx.log.info({ service: this.name, endpoint: ep.id }, 'endpoint re-admitted')
      this.ctx.readmitted(this.name, ep.id, reason)
    }
  }

  private unEject (ep: UpstreamEndpoint): boolean {
    clearTimeout(ep.ejectionTimer)
    ep.ejectionTimer = undefined
    if (!ep.ejected) return false
    ep.ejected = false
    // A fresh start: it must fail `consecutiveFailures` times again to go.
    ep.consecutiveFailures = 0
    return true
  }

  private unroute (ep: UpstreamEndpoint): void {
    ep.routable = false
    // Out of the set, its ejection ends too: were it set again while still
    // draining, it must not stay ejected with no timer to re-admit it.
    this.unEject(ep)
    if (ep.inFlight === 0) this.forget(ep)
  }

  private forget (ep: UpstreamEndpoint): void {
    if (this.endpoints.get(ep.id) === ep) this.endpoints.delete(ep.id)
    ep.close()
  }

  private rebuild (): void {
    const candidates: UpstreamEndpoint[] = []
    let routable = 0
    for (const ep of this.endpoints.values()) {
      if (!ep.routable) continue
      routable++
      if (!ep.ejected) candidates.push(ep)
    }
    if (candidates.length === 0 && routable > 0) {
      // Only ejected endpoints are left (the others were removed): fail open.
      for (const ep of this.endpoints.values()) {
        if (!ep.routable || !this.unEject(ep)) continue
        candidates.push(ep)
        this.ctx.readmitted(this.name, ep.id, 'fail-open: no other endpoint is left')
      }
    }
    this.candidates = candidates
    if (candidates.length > 0) this.woken = false
    this.strategy.update(candidates)
  }
}

function parseHashOn (route: GatewayRoute): HashOn | undefined {
  if (route.loadBalancing.strategy !== 'consistent-hash') return undefined
  const on = route.loadBalancing.hashOn ?? 'client-address'
  if (on === 'path') return { kind: 'path' }
  if (on.startsWith('header:')) return { kind: 'header', name: on.slice(7).toLowerCase() }
  if (on.startsWith('cookie:')) return { kind: 'cookie', name: on.slice(7) }
  return { kind: 'client-address' }
}
