import { EventEmitter } from 'node:events'
import { request, type ClientRequest } from 'node:http'
import { eventStreamParser } from '../core/event-stream.js'
import { UigniterError } from '../core/errors.js'
import type { Logger } from '../core/logger.js'
import type { ServiceStatus } from '../core/service.js'
import type { Vm } from '../core/vm.js'
import type { RegistryEntry, ServiceManager } from '../service/service-manager.js'
import type { LeaderRecord } from './cluster-records.js'
import { PeerClient } from './peer-client.js'

/** Event types a follower relays from the leader's stream: the cluster's decisions, not the leader's own VMs. */
const RELAYED = /^(service|cluster|node)\./

/**
 * The services of a cluster, as this node's API and gateway see them. On
 * the leader it is the leader's ServiceManager, with the cluster's
 * replicas; on a follower the API forwards service requests to the leader
 * (src/api/cluster-routes.ts), a gateway's wake goes there too, and the
 * leader's decisions are relayed into this node's event stream so that a
 * client following any node's events sees them.
 */
export class ClusterServices extends EventEmitter {
  readonly #peers: PeerClient
  readonly #token: string | undefined
  readonly #log: Logger
  #manager: ServiceManager | null = null
  #leader: LeaderRecord | null = null
  #me: string
  #relay: ClientRequest | undefined
  #relayTimer: NodeJS.Timeout | undefined
  #closed = false

  constructor (options: { me: string, token: string | undefined, log: Logger }) {
    super()
    this.#me = options.me
    this.#token = options.token
    this.#peers = new PeerClient(options.token)
    this.#log = options.log
  }

  get leader (): LeaderRecord | null { return this.#leader }
  get isLeader (): boolean { return this.#manager !== null }

  setManager (manager: ServiceManager | null): void {
    this.#manager = manager
    if (manager !== null) {
      manager.on('service', (e) => this.emit('service', e))
      manager.on('registry', (e) => this.emit('registry', e))
    }
    this.#restartRelay()
  }

  setLeader (leader: LeaderRecord | null): void {
    this.#leader = leader
    this.#restartRelay()
  }

  /** An event of this node's own (a decision of the leader, an image fetch) into the stream. */
  publish (event: { type: string } & Record<string, unknown>): void {
    this.emit('service', event)
  }

  list (app?: string): ServiceStatus[] { return this.#local().list(app) }
  get (name: string): ServiceStatus { return this.#local().get(name) }
  registry (service?: string): RegistryEntry[] { return this.#local().registry(service) }
  async apply (input: unknown, app: string | null = null): Promise<ServiceStatus> { return await this.#local().apply(input, app) }
  async applyApp (input: unknown): Promise<ServiceStatus[]> { return await this.#local().applyApp(input) }
  async remove (name: string): Promise<ServiceStatus> { return await this.#local().remove(name) }
  async removeApp (app: string): Promise<string[]> { return await this.#local().removeApp(app) }
  evict (evicted: (vm: Vm) => boolean): number { return this.#local().evict(evicted) }

  /** A request is held for the service by this node's gateway: the leader wakes it. */
  wake (service: string): void {
    if (this.#manager !== null) { this.#manager.wake(service); return }
    const leader = this.#leader
    if (leader === null) return
    this.#peers.call(leader.apiUrl, 'POST', `/v1/cluster/wake/${encodeURIComponent(service)}`, {}).catch((err: unknown) => {
      this.#log.warn({ err, service }, 'the leader could not be asked to wake the service; the gateway asks again at the next held request')
    })
  }

  close (): void {
    this.#closed = true
    clearTimeout(this.#relayTimer)
    this.#relay?.destroy()
  }

  #local (): ServiceManager {
    if (this.#manager === null) throw new UigniterError('UIG_ERR_CLUSTER_NO_LEADER', this.#leader === null ? 'the cluster has no leader right now; try again within the lease TTL' : `node ${this.#leader.node} leads the cluster: ask its API (${this.#leader.apiUrl})`)
    return this.#manager
  }

  /** Followers relay the leader's decision events; the leader has them first hand. */
  #restartRelay (): void {
    clearTimeout(this.#relayTimer)
    this.#relay?.destroy()
    this.#relay = undefined
    const leader = this.#leader
    if (this.#closed || this.#manager !== null || leader === null || leader.node === this.#me) return
    const headers: Record<string, string> = this.#token !== undefined ? { authorization: `Bearer ${this.#token}` } : {}
    const parse = eventStreamParser((e) => {
      if (!RELAYED.test(e.type)) return
      try {
        const data = JSON.parse(e.data) as Record<string, unknown>
        this.emit('service', { ...data, type: e.type })
      } catch { /* a malformed event from the leader is dropped */ }
    })
    const again = (): void => {
      if (this.#closed || this.#leader !== leader) return
      this.#relayTimer = setTimeout(() => { this.#restartRelay() }, 1000)
    }
    const req = request(new URL('/v1/events', leader.apiUrl), { headers }, (res) => {
      res.setEncoding('utf8')
      res.on('data', (chunk: string) => parse(chunk))
      res.on('end', again)
      res.on('error', again)
    })
    req.on('error', again)
    req.end()
    this.#relay = req
  }
}
