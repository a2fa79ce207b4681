import type { Logger } from '../core/logger.js'
import type { ClusterStore } from '../core/ports/cluster-store.js'
import type { ServiceGateway } from '../service/service-controller.js'
import { keys } from './cluster-keys.js'
import type { RouteEndpoint, RouteRecord } from './cluster-records.js'

/**
 * Dead endpoints a route keeps naming. A gateway acts on a death when it
 * reads the route, within seconds; by the time 16 more replicas of the same
 * service have died, every gateway has long forgotten this one.
 */
const ENDED_KEPT = 16

type Route = Parameters<ServiceGateway['configure']>[0]
type Load = ReturnType<ServiceGateway['load']>

/** What the leader asks of every node's gateway, over the nodes' APIs (src/api/cluster-routes.ts serves it). */
export interface PeerGateways {
  /** Each live node's load per service (the leader's own included). */
  load: () => Map<string, Load & { perEndpoint: Record<string, number> }>
  /** Resolves true once no node's gateway has a request in flight to the endpoint (it stops routing to it first). */
  whenIdle: (service: string, endpointId: string, timeoutMs: number) => Promise<boolean>
}

/**
 * The leader's gateway, as its service controllers see it: a route or an
 * endpoint change is written to the store (routes/SERVICE), where every
 * node's gateway reads it (RouteFollower). Load and drains are the sum of
 * every node's gateway, since requests for one service arrive at all of
 * them. Writes that change nothing are skipped: a controller republishes
 * often, and each write costs the whole cluster a watch event.
 */
export class ClusterGateway implements ServiceGateway {
  readonly #store: ClusterStore
  readonly #epoch: () => number | null
  readonly #peers: PeerGateways
  readonly #nodeOf: (endpointId: string) => string | null
  readonly #log: Logger
  readonly #routes = new Map<string, RouteRecord>()
  readonly #written = new Map<string, string>()
  #queue: Promise<unknown> = Promise.resolve()

  constructor (options: { store: ClusterStore, epoch: () => number | null, peers: PeerGateways, nodeOf: (endpointId: string) => string | null, log: Logger }) {
    this.#store = options.store
    this.#epoch = options.epoch
    this.#peers = options.peers
    this.#nodeOf = options.nodeOf
    this.#log = options.log
  }

  async configure (route: Route): Promise<void> {
    const existing = this.#routes.get(route.service)
    const record: RouteRecord = { route: { ...route }, endpoints: existing?.endpoints ?? [], epoch: this.#epoch() ?? 0 }
    this.#routes.set(route.service, record)
    await this.#write(route.service)
  }

  setEndpoints (service: string, endpoints: Array<{ id: string, host: string, weight: number, priority: number }>): void {
    const record = this.#routes.get(service)
    if (record === undefined) return
    record.endpoints = endpoints.map((e): RouteEndpoint => ({ ...e, node: e.id.startsWith('external:') ? null : this.#nodeOf(e.id) }))
    void this.#write(service).catch((err: unknown) => { this.#log.warn({ err, service }, 'publishing the service\'s endpoints failed; the next change publishes them') })
  }

  endpointDied (service: string, endpointId: string): void {
    const record = this.#routes.get(service)
    if (record === undefined) return
    record.endpoints = record.endpoints.filter((e) => e.id !== endpointId)
    record.ended = [...(record.ended ?? []).filter((id) => id !== endpointId), endpointId].slice(-ENDED_KEPT)
    void this.#write(service).catch((err: unknown) => { this.#log.warn({ err, service }, 'publishing the death of an endpoint failed; the gateways cut it when its node\'s report comes') })
  }

  async remove (service: string): Promise<void> {
    this.#routes.delete(service)
    this.#written.delete(service)
    await this.#serial(async () => await this.#store.txn([{ delete: keys.route(service) }], this.#guard()))
  }

  load (service: string): Load {
    const load = this.#peers.load().get(service)
    return { inFlight: load?.inFlight ?? 0, held: load?.held ?? 0, lastRequestAt: load?.lastRequestAt ?? 0 }
  }

  inFlight (service: string, endpointId: string): number {
    return this.#peers.load().get(service)?.perEndpoint[endpointId] ?? 0
  }

  async whenIdle (service: string, endpointId: string, timeoutMs: number): Promise<boolean> {
    return await this.#peers.whenIdle(service, endpointId, timeoutMs)
  }

  /** Forgets what was written, so that a new leader writes every route once (its epoch in it). */
  reset (): void {
    this.#written.clear()
  }

  async #write (service: string): Promise<void> {
    await this.#serial(async () => {
      const record = this.#routes.get(service)
      if (record === undefined) return
      record.epoch = this.#epoch() ?? 0
      const text = JSON.stringify(record)
      if (this.#written.get(service) === text) return
      const { succeeded } = await this.#store.txn([{ put: keys.route(service), value: text }], this.#guard())
      if (succeeded) this.#written.set(service, text)
    })
  }

  #guard (): Array<{ key: string, createRevision: number }> {
    const epoch = this.#epoch()
    return epoch === null ? [{ key: keys.leader, createRevision: -1 }] : [{ key: keys.leader, createRevision: epoch }]
  }

  async #serial<T> (work: () => Promise<T>): Promise<T> {
    const next = this.#queue.then(work, work)
    this.#queue = next.catch(() => {})
    return await next
  }
}
