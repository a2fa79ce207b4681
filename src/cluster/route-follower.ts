import type { Logger } from '../core/logger.js'
import type { ClusterStore } from '../core/ports/cluster-store.js'
import type { ServiceGateway } from '../service/service-controller.js'
import { keys, lastPart } from './cluster-keys.js'
import { Informer } from './informer.js'
import { parseRecord, RouteRecordSchema, type RouteRecord } from './cluster-records.js'

/** What the follower drives: the node's own gateway. */
export type LocalGateway = Pick<ServiceGateway, 'configure' | 'setEndpoints' | 'endpointDied' | 'remove' | 'load' | 'inFlight' | 'whenIdle'>

/**
 * Keeps this node's gateway routing every service of the cluster: it reads
 * the routes the leader writes (routes/SERVICE) and configures the local
 * gateway with them, endpoints on any node (their addresses are routed
 * between the nodes). With `preferLocal`, a service that has healthy
 * endpoints on this node is routed to those only, and to the others when it
 * has none here. The store out of reach changes nothing: the gateway keeps
 * the last routes it had.
 */
export class RouteFollower {
  readonly #routes: Informer<RouteRecord>
  readonly #gateway: LocalGateway
  readonly #node: string
  readonly #preferLocal: boolean
  readonly #log: Logger
  readonly #applied = new Map<string, string>()
  /** Endpoints a drain took out here before the leader's route said so. */
  readonly #excluded = new Map<string, Set<string>>()
  readonly #onPorts: (ports: number[]) => void

  constructor (options: { store: ClusterStore, gateway: LocalGateway, node: string, preferLocal: boolean, onPorts: (ports: number[]) => void, log: Logger }) {
    this.#gateway = options.gateway
    this.#node = options.node
    this.#preferLocal = options.preferLocal
    this.#log = options.log
    this.#onPorts = options.onPorts
    this.#routes = new Informer({
      store: options.store,
      prefix: keys.routes,
      parse: (raw) => parseRecord(RouteRecordSchema, raw),
      onChange: (key, value) => { void this.#apply(lastPart(key), value) },
      log: options.log
    })
  }

  async start (): Promise<void> { await this.#routes.start() }
  close (): void { this.#routes.close() }

  /** The services this gateway routes, for the leader's load collection. */
  services (): string[] {
    return [...this.#applied.keys()]
  }

  /** Stops routing to the endpoint here at once, and resolves once nothing here is in flight to it. */
  async drain (service: string, endpointId: string, timeoutMs: number): Promise<boolean> {
    const set = this.#excluded.get(service) ?? new Set<string>()
    set.add(endpointId)
    this.#excluded.set(service, set)
    const record = this.#routes.items.get(keys.route(service))
    if (record !== undefined) this.#setEndpoints(service, record)
    // Forgotten once the leader's route no longer lists it (or after a minute, whatever happens).
    setTimeout(() => { this.#excluded.get(service)?.delete(endpointId) }, 60_000).unref()
    return await this.#gateway.whenIdle(service, endpointId, timeoutMs)
  }

  async #apply (service: string, record: RouteRecord | undefined): Promise<void> {
    try {
      if (record === undefined) {
        this.#applied.delete(service)
        this.#excluded.delete(service)
        await this.#gateway.remove(service)
      } else {
        const route = JSON.stringify(record.route)
        if (this.#applied.get(service) !== route) {
          await this.#gateway.configure(record.route)
          this.#applied.set(service, route)
        }
        this.#setEndpoints(service, record)
      }
      this.#onPorts([...this.#routes.items.values()].flatMap((r) => r.route.tcp.map((t) => t.gatewayPort)))
    } catch (err) {
      this.#log.warn({ err, service }, 'this node\'s gateway could not take the cluster route')
    }
  }

  #setEndpoints (service: string, record: RouteRecord): void {
    const excluded = this.#excluded.get(service)
    const ended = record.ended ?? []
    const listed = record.endpoints.filter((e) => excluded?.has(e.id) !== true && !ended.includes(e.id))
    if (excluded !== undefined) for (const id of excluded) if (!record.endpoints.some((e) => e.id === id)) excluded.delete(id)
    const local = listed.filter((e) => e.node === this.#node)
    const chosen = this.#preferLocal && local.length > 0 ? local : listed
    this.#gateway.setEndpoints(service, chosen.map((e) => ({ id: e.id, host: e.host, weight: e.weight, priority: e.priority })))
    // A dead endpoint's open requests are cut (and retried elsewhere where safe); one this gateway has forgotten is a no-op.
    for (const id of ended) this.#gateway.endpointDied(service, id)
  }
}
