import { EventEmitter } from 'node:events'
import type { ClusterImage, ScheduleDecision, Scoring } from '../core/cluster.js'
import { UigniterError } from '../core/errors.js'
import type { Logger } from '../core/logger.js'
import type { ClusterStore } from '../core/ports/cluster-store.js'
import type { ServiceSpec } from '../core/service.js'
import type { Vm, VmState } from '../core/vm.js'
import { replicaVolumeName } from '../core/volume.js'
import type { ReplicaStarter } from '../service/service-controller.js'
import type { ServiceVms } from '../service/service-manager.js'
import { keys } from './cluster-keys.js'
import type { Placement, ReplicaReport } from './cluster-records.js'
import { ClusterView } from './cluster-view.js'
import { schedule } from './scheduler.js'

/** A placed replica has this long to be reported running: an image fetch and a template making may come first. */
const START_TIMEOUT_MS = 240_000
/** A replica whose placement was deleted has this long to be reported gone before it is taken as gone. */
const REMOVE_TIMEOUT_MS = 30_000

export interface ClusterDecisionEvent {
  type: 'cluster.placed' | 'cluster.unschedulable' | 'cluster.replica-lost'
  service: string
  replica: string
  node?: string
  message: string
  at: string
}

interface Waiter { resolve: (report: ReplicaReport) => void, reject: (err: Error) => void }

/**
 * The leader's replicas: what a service controller starts, watches and
 * stops, when replicas run on any node. A start is a scheduling decision
 * (filter, score) and a placement written under the leader's epoch; the
 * chosen node's agent runs it and reports its VM. A stop deletes the
 * placement; the node stops the VM. A node that is lost ends its replicas
 * (`node-lost`), so the controllers place them again elsewhere.
 * Events: 'vm' ({ vm }) as VmManager's, 'decision' (ClusterDecisionEvent).
 */
export class ClusterReplicas extends EventEmitter implements ServiceVms, ReplicaStarter {
  readonly #store: ClusterStore
  readonly #view: ClusterView
  readonly #epoch: () => number | null
  readonly #scoring: Scoring
  readonly #log: Logger
  /** Decisions made whose placement the view does not show yet. */
  readonly #pending = new Map<string, { node: string, service: string, vcpus: number, memoryMiB: number }>()
  /** The last VM each replica reported: what a lost node's replicas were. */
  readonly #last = new Map<string, Vm>()
  readonly #starts = new Map<string, Waiter>()
  readonly #removals = new Map<string, Array<() => void>>()
  readonly #onReplica: (key: string, report: ReplicaReport | undefined) => void
  readonly #onNodeLost: (node: string) => void

  constructor (options: { store: ClusterStore, view: ClusterView, epoch: () => number | null, scoring: Scoring, log: Logger }) {
    super()
    this.#store = options.store
    this.#view = options.view
    this.#epoch = options.epoch
    this.#scoring = options.scoring
    this.#log = options.log
    for (const r of this.#view.replicas.items.values()) if (r.vm !== undefined) this.#last.set(r.replica, r.vm)
    this.#onReplica = (key, report) => { this.#replicaChanged(key, report) }
    this.#onNodeLost = (node) => { this.#nodeLost(node) }
    this.#view.on('replica', this.#onReplica)
    this.#view.on('node-lost', this.#onNodeLost)
  }

  close (): void {
    this.#view.off('replica', this.#onReplica)
    this.#view.off('node-lost', this.#onNodeLost)
    for (const w of this.#starts.values()) w.reject(new UigniterError('UIG_ERR_CLUSTER_NO_LEADER', 'this node stopped leading while the replica started'))
    this.#starts.clear()
  }

  /** True while a start of this replica waits for its node's report. */
  isStarting (replica: string): boolean {
    return this.#starts.has(replica)
  }

  // ------------------------------------------------------------ ServiceVms

  list (filter: { state?: VmState[] }): Vm[] {
    const vms: Vm[] = []
    for (const r of this.#view.replicas.items.values()) {
      if (r.vm === undefined) continue
      if (this.#view.placements.items.get(keys.placement(r.node, r.replica)) === undefined) continue
      if (filter.state === undefined || filter.state.includes(r.vm.state)) vms.push(r.vm)
    }
    return vms
  }

  get (idOrName: string): Vm {
    const placement = this.#placement(idOrName)
    const vm = placement !== undefined ? (this.#view.report(placement.node, placement.replica)?.vm ?? this.#last.get(placement.replica)) : undefined
    if (vm === undefined) throw new UigniterError('UIG_ERR_VM_NOT_FOUND', `no replica in the cluster is "${idOrName}"`)
    return vm
  }

  async stop (idOrName: string): Promise<Vm> {
    return await this.remove(idOrName)
  }

  /** Deletes the placement, then waits for its node to report the VM gone (a lost node's are gone already). */
  async remove (idOrName: string): Promise<Vm> {
    const placement = this.#placement(idOrName)
    const last = this.#last.get(placement?.replica ?? idOrName)
    if (placement === undefined) {
      if (last !== undefined) return last
      throw new UigniterError('UIG_ERR_VM_NOT_FOUND', `no replica in the cluster is "${idOrName}"`)
    }
    const gone = new Promise<void>((resolve) => {
      const list = this.#removals.get(placement.replica) ?? []
      list.push(resolve)
      this.#removals.set(placement.replica, list)
      setTimeout(resolve, REMOVE_TIMEOUT_MS).unref()
    })
    await this.#guarded([{ delete: keys.placement(placement.node, placement.replica) }])
    if (this.#view.node(placement.node) !== undefined && this.#view.report(placement.node, placement.replica) !== undefined) await gone
    this.#removals.delete(placement.replica)
    return last ?? this.#stub(placement, 'exited')
  }

  async checkImage (ref: string): Promise<{ init: unknown }> {
    const image = this.#image(ref)
    if (image === undefined) throw new UigniterError('UIG_ERR_IMAGE_NOT_FOUND', `no node of the cluster holds image "${ref}"; build it on one node (uigniter image build), the others fetch it from there`)
    return await Promise.resolve({ init: image.init ? {} : null })
  }

  // ------------------------------------------------------------ ReplicaStarter

  /** Templates are per node: each node makes its own when it is given its first clone of a generation. */
  async prepare (): Promise<string | null> { return await Promise.resolve(null) }

  async cleanup (): Promise<void> {}

  async start (spec: ServiceSpec, generation: number, name: string, index?: number): Promise<Vm> {
    const epoch = this.#epoch()
    if (epoch === null) throw new UigniterError('UIG_ERR_CLUSTER_NO_LEADER', 'this node no longer leads the cluster')
    const image = this.#image(spec.image ?? '')
    if (image === undefined) throw new UigniterError('UIG_ERR_IMAGE_NOT_FOUND', `no node of the cluster holds image "${spec.image ?? ''}"`)
    const resources = { vcpus: spec.resources.vcpus ?? image.vcpus, memoryMiB: spec.resources.memoryMiB ?? image.memoryMiB }
    const decision = this.decide(spec, generation, name, resources, image.digest, this.#volumeNodes(spec, index))
    if (!decision.placed) throw new UigniterError('UIG_ERR_CLUSTER_UNSCHEDULABLE', decision.message)
    const placement: Placement = {
      replica: name, node: decision.node, service: spec.name, generation, epoch, spec, imageDigest: image.digest, resources, ...(index !== undefined ? { index } : {}), at: new Date().toISOString()
    }
    this.#pending.set(name, { node: decision.node, service: spec.name, ...resources })
    const reported = new Promise<ReplicaReport>((resolve, reject) => { this.#starts.set(name, { resolve, reject }) })
    // It may be rejected (leadership ended, the node lost) while the placement is still being written: handled below, not unhandled.
    reported.catch(() => {})
    const timer = setTimeout(() => {
      this.#starts.get(name)?.reject(new UigniterError('UIG_ERR_VM_TIMEOUT', `node ${decision.node} did not report replica ${name} running within ${START_TIMEOUT_MS / 1000} s`))
    }, START_TIMEOUT_MS)
    try {
      await this.#guarded([{ put: keys.placement(decision.node, name), value: JSON.stringify(placement) }])
      const report = await reported
      if (report.vm === undefined) throw new UigniterError('UIG_ERR_VM_BOOT_FAILED', `node ${decision.node} could not start replica ${name}: ${report.error ?? 'no reason given'}`)
      return report.vm
    } catch (err) {
      // Nothing may run a placement nobody waits for: it goes, and the controller tries again.
      await this.#guarded([{ delete: keys.placement(decision.node, name) }]).catch(() => {})
      throw err
    } finally {
      clearTimeout(timer)
      this.#starts.delete(name)
      this.#pending.delete(name)
    }
  }

  /** Filter and score the nodes for one replica; the decision is an event, with its reasons. */
  /**
   * The replica's volumes that exist, with their nodes. A per-replica
   * volume not made yet is made where the replica lands; once made, it
   * holds its index's replicas to that node, even while the node is lost
   * (they are pending: the data is there, not elsewhere).
   */
  #volumeNodes (spec: ServiceSpec, index: number | undefined): Record<string, string> {
    const homes: Record<string, string> = {}
    for (const v of spec.volumes ?? []) {
      const name = v.perReplica ? replicaVolumeName(spec.name, v.name, index ?? 0) : v.name
      const node = this.#view.volumeNode(name)
      if (node !== undefined) homes[name] = node
    }
    return homes
  }

  decide (spec: ServiceSpec, _generation: number, name: string, resources: { vcpus: number, memoryMiB: number }, imageDigest: string, volumeNodes: Record<string, string> = {}): ScheduleDecision {
    const nodes = this.#view.schedulerNodes(this.#pending.values())
    const decision = schedule({
      replica: name,
      service: spec.name,
      resources,
      imageDigest,
      template: `svc-${spec.name}-g${_generation}`,
      rules: spec.placement,
      volumeNodes
    }, nodes, { scoring: this.#scoring })
    this.#decision({
      type: decision.placed ? 'cluster.placed' : 'cluster.unschedulable',
      service: spec.name,
      replica: name,
      ...(decision.placed ? { node: decision.node } : {}),
      message: decision.message,
      at: new Date().toISOString()
    })
    return decision
  }

  #decision (event: ClusterDecisionEvent): void {
    this.#log.info({ service: event.service, replica: event.replica, node: event.node }, event.message)
    this.emit('decision', event)
  }

  #replicaChanged (key: string, report: ReplicaReport | undefined): void {
    const at = ClusterView.replicaKey(key)
    if (at === undefined) return
    if (report === undefined) {
      for (const done of this.#removals.get(at.replica) ?? []) done()
      return
    }
    const waiter = this.#starts.get(report.replica)
    if (waiter !== undefined && (report.vm !== undefined || report.error !== undefined)) waiter.resolve(report)
    if (report.vm === undefined) return
    this.#last.set(report.replica, report.vm)
    if (report.vm.state === 'exited' || report.vm.state === 'failed') this.emit('vm', { vm: report.vm })
  }

  /** A lost node's replicas ended with it, as far as the services can tell: they are placed again elsewhere. */
  #nodeLost (node: string): void {
    for (const p of this.#view.placementsOn(node)) {
      const vm = this.#last.get(p.replica) ?? this.#stub(p, 'failed')
      this.#decision({ type: 'cluster.replica-lost', service: p.service, replica: p.replica, node, message: `replica ${p.replica} is lost with node ${node} (its lease expired); it is replaced elsewhere`, at: new Date().toISOString() })
      this.#starts.get(p.replica)?.reject(new UigniterError('UIG_ERR_VM_BOOT_FAILED', `node ${node} was lost while it started replica ${p.replica}`))
      this.emit('vm', { vm: { ...vm, state: 'failed', exit: { reason: 'node-lost', detail: `node ${node} was lost`, at: new Date().toISOString() } } })
    }
  }

  #placement (idOrName: string): Placement | undefined {
    for (const p of this.#view.placements.items.values()) {
      if (p.replica === idOrName) return p
      const vm = this.#view.report(p.node, p.replica)?.vm ?? this.#last.get(p.replica)
      if (vm?.id === idOrName) return p
    }
    return undefined
  }

  #image (ref: string): ClusterImage | undefined {
    const wanted = ref.includes(':') || ref.startsWith('sha256:') ? ref : `${ref}:latest`
    for (const n of this.#view.nodes.items.values()) {
      const image = n.images.find((i) => i.ref === wanted || i.digest === ref)
      if (image !== undefined) return image
    }
    return undefined
  }

  /** A write only the current leader can make: it fails once another node holds the leader key. */
  async #guarded (ops: Parameters<ClusterStore['txn']>[0]): Promise<void> {
    const epoch = this.#epoch()
    if (epoch === null) throw new UigniterError('UIG_ERR_CLUSTER_NO_LEADER', 'this node no longer leads the cluster')
    const { succeeded } = await this.#store.txn(ops, [{ key: keys.leader, createRevision: epoch }])
    if (!succeeded) throw new UigniterError('UIG_ERR_CLUSTER_NO_LEADER', `this node's leadership (epoch ${epoch}) ended; the write was refused`)
  }

  #stub (p: Placement, state: VmState): Vm {
    return {
      id: p.replica, node: p.node, name: p.replica, image: p.spec.image ?? '', imageDigest: p.imageDigest, state, vcpus: p.resources.vcpus, memoryMiB: p.resources.memoryMiB,
      network: 'bridge', ipAddress: null, macAddress: null, tap: null, publish: [], pid: null, accel: '', stateDir: '', createdAt: p.at, startedAt: null,
      exit: null, pool: null, startPath: p.spec.startPath === 'cold' ? 'cold' : 'clone', template: null, startTimings: null, service: { name: p.service, generation: p.generation }
    }
  }
}
