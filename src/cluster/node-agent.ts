import type { ClusterImage, NodeStatus, Resources } from '../core/cluster.js'
import type { Logger } from '../core/logger.js'
import type { ClusterStore, TxnOp } from '../core/ports/cluster-store.js'
import type { ServiceSpec } from '../core/service.js'
import type { Vm } from '../core/vm.js'
import { keys, nodeAndReplica } from './cluster-keys.js'
import { Informer } from './informer.js'
import { parseRecord, PlacementSchema, type Placement, type ReplicaReport } from './cluster-records.js'

/** What the agent needs of the node's own VMs (VmManager). */
export interface AgentVms {
  list: (filter: Record<string, never>) => Vm[]
  get: (idOrName: string) => Vm
  stop: (idOrName: string, graceMs?: number) => Promise<Vm>
  remove: (idOrName: string, force?: boolean) => Promise<Vm>
  on: (event: 'vm', listener: (event: { vm: Vm }) => void) => unknown
}

/** What the node holds, for its status. */
export interface AgentInventory {
  images: () => Promise<ClusterImage[]>
  templates: () => Promise<string[]>
}

export interface AgentDeps {
  store: ClusterStore
  vms: AgentVms
  inventory: AgentInventory
  /** Starts a replica here (the node's ReplicaLauncher). */
  startReplica: (spec: ServiceSpec, generation: number, name: string, index?: number) => Promise<Vm>
  /** Makes sure the image is here, fetching it by digest from a peer that holds it. */
  ensureImage: (digest: string, ref: string) => Promise<void>
  /** The parts of the status that do not change while the daemon runs. */
  identity: Omit<NodeStatus, 'allocated' | 'vms' | 'images' | 'templates'>
  log: Logger
}

const LIVE: ReadonlySet<Vm['state']> = new Set(['starting', 'running', 'paused', 'stopping'])

/**
 * The node's agent: it never decides where anything runs. It publishes the
 * node's status under its lease, runs the replicas the leader placed here
 * (fetching the image first when the node lacks it), reports each one's VM,
 * and stops the VMs whose placement went away: the leader moved them while
 * this node was lost, and a node never serves two generations of the truth
 * (fencing). While the store is out of reach it changes nothing: its VMs
 * keep running with the last placements it saw.
 */
export class NodeAgent {
  readonly #deps: AgentDeps
  readonly #placements: Informer<Placement>
  readonly #starting = new Set<string>()
  readonly #stopping = new Set<string>()
  /** What was last written for each replica: a report that would say the same again is not written. */
  readonly #reported = new Map<string, string>()
  #lastStatus = ''
  #statusTimer: NodeJS.Timeout | undefined
  #sweepTimer: NodeJS.Timeout | undefined
  #closed = false

  constructor (deps: AgentDeps) {
    this.#deps = deps
    const me = deps.identity.name
    this.#placements = new Informer({
      store: deps.store,
      prefix: keys.nodePlacements(me),
      parse: (raw) => parseRecord(PlacementSchema, raw),
      onChange: (key, value) => {
        const at = nodeAndReplica(key, keys.placements)
        if (at === undefined) return
        if (value !== undefined) this.#run(value)
        else this.#placementGone(at.replica)
      },
      log: deps.log
    })
    deps.vms.on('vm', ({ vm }) => {
      if (vm.service !== null) this.#report(vm)
      this.statusChanged()
    })
  }

  get name (): string { return this.#deps.identity.name }

  async start (): Promise<void> {
    await this.publishStatus(true)
    await this.#placements.start()
    // A periodic pass, besides the watch: a start that failed is tried again, a stale VM found.
    this.#sweepTimer = setInterval(() => { this.#sweep() }, 2000)
    this.#sweep()
  }

  close (): void {
    this.#closed = true
    this.#placements.close()
    clearInterval(this.#sweepTimer)
    clearTimeout(this.#statusTimer)
  }

  /** After a new lease: everything leased is gone, so the status and every report go again. */
  async leaseRenewed (): Promise<void> {
    this.#lastStatus = ''
    this.#reported.clear()
    await this.publishStatus(true).catch((err: unknown) => { this.#deps.log.warn({ err }, 'republishing the node status failed') })
    for (const vm of this.#deps.vms.list({})) if (vm.service !== null && LIVE.has(vm.state)) this.#report(vm)
    this.#sweep()
  }

  /**
   * The status is written at most every 200 ms, and only when it changed.
   * While a placed replica starts, it waits: it goes with the replica's
   * report, in one write.
   */
  statusChanged (): void {
    if (this.#statusTimer !== undefined || this.#closed || this.#starting.size > 0) return
    this.#statusTimer = setTimeout(() => {
      this.#statusTimer = undefined
      void this.publishStatus(false).catch((err: unknown) => { this.#deps.log.debug({ err }, 'publishing the node status failed; the next change tries again') })
    }, 200)
  }

  async status (): Promise<NodeStatus> {
    const live = this.#deps.vms.list({}).filter((vm) => LIVE.has(vm.state))
    const allocated: Resources = { vcpus: 0, memoryMiB: 0 }
    for (const vm of live) { allocated.vcpus += vm.vcpus; allocated.memoryMiB += vm.memoryMiB }
    return {
      ...this.#deps.identity,
      allocated,
      vms: live.length,
      images: await this.#deps.inventory.images(),
      templates: await this.#deps.inventory.templates()
    }
  }

  async publishStatus (force: boolean, extra: TxnOp[] = []): Promise<void> {
    const text = JSON.stringify(await this.status())
    if (!force && text === this.#lastStatus && extra.length === 0) return
    await this.#deps.store.txn([...extra, ...(text !== this.#lastStatus || force ? [{ put: keys.node(this.name), value: text, leased: true }] : [])])
    this.#lastStatus = text
  }

  #sweep (): void {
    // An image built or a template made since the last change shows in the status too (it is written only when it changed).
    this.statusChanged()
    if (this.#closed || !this.#placements.synced) return
    for (const p of this.#placements.items.values()) this.#run(p)
    // Fencing: a replica VM here with no placement here was moved away (or deleted) by the leader.
    if (!this.#deps.store.leaseAlive) return
    const placed = new Set([...this.#placements.items.values()].map((p) => p.replica))
    for (const vm of this.#deps.vms.list({})) {
      if (vm.service === null || this.#starting.has(vm.name)) continue
      // A report that failed to go (the store out of reach) goes now; one already written is not written again.
      if (placed.has(vm.name)) this.#report(vm)
      else this.#placementGone(vm.name)
    }
  }

  /** Runs a placement here unless its VM already runs (or ran: its end is reported, and the leader decides). */
  #run (p: Placement): void {
    if (this.#closed || this.#starting.has(p.replica) || this.#stopping.has(p.replica)) return
    const existing = this.#find(p.replica)
    if (existing !== undefined) return
    this.#starting.add(p.replica)
    void (async () => {
      try {
        await this.#deps.ensureImage(p.imageDigest, p.spec.image ?? '')
        // A pool's instance keeps the pool's name, but a placed replica is known by its own: in a
        // cluster, `pool` replicas are clones of the same template, made on the node.
        const spec = p.spec.startPath === 'pool' ? { ...p.spec, startPath: 'clone' as const } : p.spec
        const vm = await this.#deps.startReplica(spec, p.generation, p.replica, p.index)
        this.#deps.log.info({ replica: p.replica, service: p.service, ms: Math.round(vm.startTimings?.totalMs ?? 0) }, 'started a placed replica')
        this.#report(this.#deps.vms.get(vm.id), p.epoch)
      } catch (err) {
        this.#deps.log.warn({ err, replica: p.replica }, 'a placed replica did not start')
        await this.#write([{ put: keys.replica(this.name, p.replica), value: JSON.stringify({ replica: p.replica, node: this.name, epoch: p.epoch, error: (err as Error).message }), leased: true }])
      } finally {
        this.#starting.delete(p.replica)
        this.statusChanged()
      }
    })()
  }

  /** Its placement was deleted: drain is the leader's part; here the VM stops and goes. */
  #placementGone (replica: string): void {
    if (this.#stopping.has(replica)) return
    const vm = this.#find(replica)
    this.#stopping.add(replica)
    void (async () => {
      try {
        if (vm !== undefined) {
          if (LIVE.has(vm.state)) await this.#deps.vms.stop(vm.id, 5000).catch(() => undefined)
          await this.#deps.vms.remove(vm.id, true)
          this.#deps.log.info({ replica }, 'removed a replica whose placement is gone')
        }
        await this.#write([{ delete: keys.replica(this.name, replica) }, ...await this.statusOps()])
        this.#reported.delete(replica)
      } catch (err) {
        this.#deps.log.warn({ err, replica }, 'removing a replica whose placement is gone failed; the next sweep tries again')
      } finally {
        this.#stopping.delete(replica)
      }
    })()
  }

  #find (replica: string): Vm | undefined {
    return this.#deps.vms.list({}).find((vm) => vm.name === replica)
  }

  /** Reports a replica's VM, with the node's status in the same write (one store write per start). */
  #report (vm: Vm, epoch?: number): void {
    const placement = this.#placements.items.get(keys.placement(this.name, vm.name))
    if (placement === undefined && epoch === undefined) return
    if (vm.state === 'starting') return
    const report: ReplicaReport = { replica: vm.name, node: this.name, epoch: epoch ?? placement?.epoch ?? 1, vm: { ...vm, node: this.name } }
    const text = JSON.stringify(report)
    // Compared by its state and start, not its text: the same record can come with its keys in another order.
    const summary = JSON.stringify([vm.id, vm.state, vm.ipAddress, vm.exit?.reason ?? null, report.epoch])
    if (this.#reported.get(vm.name) === summary) return
    this.#reported.set(vm.name, summary)
    void this.statusOps().then(async (ops) => {
      if (!await this.#write([{ put: keys.replica(this.name, vm.name), value: text, leased: true }, ...ops])) this.#reported.delete(vm.name)
    }).catch((err: unknown) => {
      this.#reported.delete(vm.name)
      this.#deps.log.warn({ err, replica: vm.name }, 'reporting a replica failed; the next sweep tries again')
    })
  }

  /** The status write, when the status changed: sent with a report so that a start costs one write. */
  async statusOps (): Promise<TxnOp[]> {
    const text = JSON.stringify(await this.status())
    if (text === this.#lastStatus) return []
    this.#lastStatus = text
    return [{ put: keys.node(this.name), value: text, leased: true }]
  }

  /** A write of the API's (a cordon): its failure is the caller's, UIG_ERR_CLUSTER_UNAVAILABLE when etcd is out of reach. */
  async write (ops: TxnOp[]): Promise<void> {
    await this.#deps.store.txn(ops)
  }

  /** True when written; out of reach, the next sweep or lease renewal writes the current state again. */
  async #write (ops: TxnOp[]): Promise<boolean> {
    try {
      await this.#deps.store.txn(ops)
      return true
    } catch (err) {
      this.#lastStatus = ''
      this.#deps.log.debug({ err }, 'a cluster write failed')
      return false
    }
  }
}
