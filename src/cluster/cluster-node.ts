import type { NodeStatus, Scoring } from '../core/cluster.js'
import type { Logger } from '../core/logger.js'
import type { ClusterStore } from '../core/ports/cluster-store.js'
import type { StoredService } from '../core/ports/state-store.js'
import { UigniterError } from '../core/errors.js'
import type { ServiceGateway } from '../service/service-controller.js'
import { ServiceManager, type ServiceRecords } from '../service/service-manager.js'
import { ClusterGateway } from './cluster-gateway.js'
import { keys } from './cluster-keys.js'
import { parseRecord, StoredServiceSchema } from './cluster-records.js'
import { ClusterReplicas, type ClusterDecisionEvent } from './cluster-replicas.js'
import { ClusterServices } from './cluster-services.js'
import { ClusterView } from './cluster-view.js'
import { LeaderElection } from './leader-election.js'
import { NodeAgent, type AgentDeps } from './node-agent.js'
import { PeerClient } from './peer-client.js'
import { RouteFollower, type LocalGateway } from './route-follower.js'

/** How often the leader reads every node's gateway load (for autoscaling and scale to zero). */
const LOAD_EVERY_MS = 1000
/** A placement no controller owns (its leader died while it started) is removed after this long. */
const ORPHAN_AFTER_MS = 60_000

type GatewayLoad = ReturnType<ServiceGateway['load']> & { perEndpoint: Record<string, number> }

export interface ClusterNodeDeps extends Omit<AgentDeps, 'log'> {
  gateway: LocalGateway
  /** Lets guests reach the gateway's TCP ports through this node's firewall. */
  allowGatewayPorts: (ports: number[]) => Promise<void>
  /** Keeps routes to the other nodes' VM subnets (null without the bridge network). */
  syncRoutes: ((peers: Array<{ node: string, subnet: string, via: string }>) => Promise<void>) | null
  token: string | undefined
  scoring: Scoring
  preferLocalEndpoints: boolean
  gatewayHttpPort: number
  log: Logger
}

/**
 * One node of a cluster: its agent, its gateway's routes, its view of the
 * others, and, while it is elected, the leader's part (the scheduler and
 * the service controllers).
 */
export class ClusterNode {
  readonly view: ClusterView
  readonly services: ClusterServices
  readonly agent: NodeAgent
  readonly routes: RouteFollower
  readonly election: LeaderElection
  readonly #deps: ClusterNodeDeps
  readonly #store: ClusterStore
  readonly #peers: PeerClient
  #leader: { manager: ServiceManager, replicas: ClusterReplicas, timers: NodeJS.Timeout[], loads: Map<string, Record<string, GatewayLoad>> } | null = null
  #routesTimer: NodeJS.Timeout | undefined

  constructor (deps: ClusterNodeDeps) {
    this.#deps = deps
    this.#store = deps.store
    this.#peers = new PeerClient(deps.token)
    const me = deps.identity.name
    this.view = new ClusterView(deps.store, deps.log.child({ component: 'cluster-view' }))
    this.services = new ClusterServices({ me, token: deps.token, log: deps.log.child({ component: 'cluster-services' }) })
    this.agent = new NodeAgent({ ...deps, log: deps.log.child({ component: 'agent' }) })
    this.routes = new RouteFollower({
      store: deps.store,
      gateway: deps.gateway,
      node: me,
      preferLocal: deps.preferLocalEndpoints,
      onPorts: (ports) => { void deps.allowGatewayPorts([deps.gatewayHttpPort, ...ports]).catch((err: unknown) => deps.log.warn({ err }, 'opening the gateway ports to guests failed')) },
      log: deps.log.child({ component: 'routes' })
    })
    this.election = new LeaderElection({
      store: deps.store,
      me: { node: me, apiUrl: deps.identity.apiUrl, since: new Date().toISOString() },
      events: {
        elected: (epoch) => {
          this.#lead(epoch).catch((err: unknown) => {
            deps.log.error({ err }, 'taking the lead failed; stepping down')
            this.#stepDown()
          })
        },
        deposed: () => { this.#stepDown() },
        leader: (leader) => {
          this.view.leader = leader
          this.services.setLeader(leader)
        }
      },
      log: deps.log.child({ component: 'election' })
    })
    this.view.on('nodes', () => {
      this.#leader?.manager.capacityChanged()
      this.#scheduleRouteSync()
    })
  }

  get name (): string { return this.#deps.identity.name }
  /** False once the node's lease is known expired: the store has been out of reach for the TTL. */
  get storeReachable (): boolean { return this.#store.leaseAlive }
  get epoch (): number | null { return this.election.epoch }

  async start (): Promise<void> {
    await this.#store.startLease({
      expired: () => { this.election.leaseExpired() },
      renewed: () => { this.agent.leaseRenewed().catch((err: unknown) => { this.#deps.log.warn({ err }, 'republishing after a new lease failed; the next sweep does it') }) }
    })
    await this.view.start()
    await this.agent.start()
    await this.routes.start()
    this.election.start()
    this.#scheduleRouteSync()
  }

  async close (): Promise<void> {
    clearTimeout(this.#routesTimer)
    this.#stepDown()
    await this.election.close()
    this.agent.close()
    this.routes.close()
    this.view.close()
    this.services.close()
    await this.#store.close()
  }

  /** This node's status, as the others read it. */
  async status (): Promise<NodeStatus> { return await this.agent.status() }

  /** Each live node's gateway load for every service it routes (this node's without a request). */
  localLoads (): Record<string, GatewayLoad> {
    const out: Record<string, GatewayLoad> = {}
    for (const service of this.routes.services()) {
      const load = this.#deps.gateway.load(service)
      out[service] = { ...load, perEndpoint: {} }
    }
    return out
  }

  async #lead (epoch: number): Promise<void> {
    const log = this.#deps.log.child({ component: 'leader' })
    const replicas = new ClusterReplicas({ store: this.#store, view: this.view, epoch: () => this.election.epoch, scoring: this.#deps.scoring, log })
    replicas.on('decision', (event: ClusterDecisionEvent) => this.services.publish({ ...event }))
    const loads = new Map<string, Record<string, GatewayLoad>>()
    const gateway = new ClusterGateway({
      store: this.#store,
      epoch: () => this.election.epoch,
      nodeOf: (id) => replicas.list({}).find((vm) => vm.id === id)?.node ?? null,
      peers: {
        load: () => {
          const sum = new Map<string, GatewayLoad>()
          for (const perService of [this.localLoads(), ...loads.values()]) {
            for (const [service, l] of Object.entries(perService)) {
              const s = sum.get(service) ?? { inFlight: 0, held: 0, lastRequestAt: 0, perEndpoint: {} }
              s.inFlight += l.inFlight
              s.held += l.held
              s.lastRequestAt = Math.max(s.lastRequestAt, l.lastRequestAt)
              sum.set(service, s)
            }
          }
          return sum
        },
        whenIdle: async (service, endpointId, timeoutMs) => await this.#whenIdleEverywhere(service, endpointId, timeoutMs)
      },
      log
    })
    const manager = new ServiceManager({
      vms: replicas,
      store: this.#records(),
      launcher: replicas,
      gateway,
      gatewayHttpPort: this.#deps.gatewayHttpPort,
      // Each node opens its own gateway ports as its routes arrive (RouteFollower).
      allowGatewayPorts: async () => {},
      log
    })
    const timers = [
      setInterval(() => { this.#collectLoads(loads).catch((err: unknown) => { log.debug({ err }, 'reading the nodes\' loads failed') }) }, LOAD_EVERY_MS),
      setInterval(() => { this.#removeOrphans(replicas).catch((err: unknown) => { log.warn({ err }, 'removing orphan placements failed') }) }, ORPHAN_AFTER_MS / 2)
    ]
    this.#leader = { manager, replicas, timers, loads }
    try {
      await this.#awaitReports(log)
      await manager.restore()
      this.services.setManager(manager)
      log.info({ epoch, services: manager.list().length }, 'leading: the service controllers run here')
    } catch (err) {
      log.error({ err }, 'taking over the services failed; stepping down')
      this.#stepDown()
    }
  }

  /**
   * A new leader adopts the replicas the nodes report. After an outage of
   * the store the reports (leased) are written again by their nodes as they
   * come back: wait for them, up to a TTL, so that running replicas are
   * adopted rather than started twice.
   */
  async #awaitReports (log: Logger): Promise<void> {
    const deadline = Date.now() + this.#store.leaseTtlS * 1000 + 2000
    const missing = (): number => [...this.view.placements.items.values()].filter((p) => this.view.node(p.node) !== undefined && this.view.report(p.node, p.replica) === undefined).length
    while (missing() > 0 && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 200))
    if (missing() > 0) log.warn({ missing: missing() }, 'taking over with placements their nodes have not reported; they are removed if no node reports them')
  }

  #stepDown (): void {
    const leader = this.#leader
    if (leader === null) return
    this.#leader = null
    for (const t of leader.timers) clearInterval(t)
    leader.manager.close()
    leader.replicas.close()
    this.services.setManager(null)
  }

  /** Services persist in the store; only the current leader may write them. */
  #records (): ServiceRecords {
    const guard = (): Array<{ key: string, createRevision: number }> => [{ key: keys.leader, createRevision: this.election.epoch ?? -1 }]
    const write = async (ops: Parameters<ClusterStore['txn']>[0]): Promise<void> => {
      const { succeeded } = await this.#store.txn(ops, guard())
      if (!succeeded) throw new UigniterError('UIG_ERR_CLUSTER_NO_LEADER', 'this node no longer leads the cluster; the change was not made')
    }
    return {
      listServices: async (): Promise<StoredService[]> => (await this.#store.list(keys.services)).items.flatMap((kv) => {
        try { return [parseRecord(StoredServiceSchema, kv.value)] } catch { return [] }
      }),
      putService: async (record) => { await write([{ put: keys.service(record.spec.name), value: JSON.stringify(record) }]) },
      deleteService: async (name) => { await write([{ delete: keys.service(name) }, { delete: keys.route(name) }]) }
    }
  }

  async #collectLoads (loads: Map<string, Record<string, GatewayLoad>>): Promise<void> {
    const peers = [...this.view.nodes.items.values()].filter((n) => n.name !== this.name)
    await Promise.all(peers.map(async (n) => {
      try {
        loads.set(n.name, await this.#peers.call<Record<string, GatewayLoad>>(n.apiUrl, 'GET', '/v1/cluster/load', undefined, 900))
      } catch {
        loads.delete(n.name)
      }
    }))
    for (const name of [...loads.keys()]) if (this.view.node(name) === undefined) loads.delete(name)
  }

  /** A drain waits for every node's gateway: a request for the replica may be in flight from any of them. */
  async #whenIdleEverywhere (service: string, endpointId: string, timeoutMs: number): Promise<boolean> {
    const peers = [...this.view.nodes.items.values()].filter((n) => n.name !== this.name)
    const answers = await Promise.all([
      this.routes.drain(service, endpointId, timeoutMs),
      ...peers.map(async (n) => await this.#peers.call<{ idle: boolean }>(n.apiUrl, 'POST', '/v1/cluster/drain', { service, endpoint: endpointId, timeoutMs }, timeoutMs + 2000)
        .then((a) => a.idle, () => true))
    ])
    return answers.every(Boolean)
  }

  /** Placements no controller knows of: their leader died between placing and the node's report. */
  async #removeOrphans (replicas: ClusterReplicas): Promise<void> {
    const leader = this.#leader
    if (leader === null) return
    const owned = new Set(leader.manager.registry().flatMap((e) => e.endpoints.map((ep) => ep.vm)))
    const now = Date.now()
    for (const p of this.view.placements.items.values()) {
      if (owned.has(p.replica) || replicas.isStarting(p.replica) || now - Date.parse(p.at) < ORPHAN_AFTER_MS) continue
      if (leader.manager.list().some((s) => s.spec.name === p.service && s.endpoints.some((e) => e.vm === p.replica))) continue
      this.#deps.log.warn({ replica: p.replica, node: p.node }, 'removing a placement no service controller owns')
      await replicas.remove(p.replica).catch(() => {})
    }
  }

  #scheduleRouteSync (): void {
    const sync = this.#deps.syncRoutes
    if (sync === null || this.#routesTimer !== undefined) return
    this.#routesTimer = setTimeout(() => {
      this.#routesTimer = undefined
      const peers = [...this.view.nodes.items.values()].filter((n) => n.name !== this.name && n.underlay !== '').map((n) => ({ node: n.name, subnet: n.subnet, via: n.underlay }))
      sync(peers).catch((err: unknown) => { this.#deps.log.warn({ err }, 'routing to the other nodes\' subnets failed') })
    }, 100)
  }
}
