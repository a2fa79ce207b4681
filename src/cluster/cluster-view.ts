import { EventEmitter } from 'node:events'
import type { NodeStatus, NodeView, SchedulerNode } from '../core/cluster.js'
import type { Logger } from '../core/logger.js'
import type { ClusterStore } from '../core/ports/cluster-store.js'
import { keys, lastPart, nodeAndReplica } from './cluster-keys.js'
import { Informer } from './informer.js'
import { parseNodeStatus, parseRecord, PlacementSchema, ReplicaReportSchema, VolumeHomeSchema, type LeaderRecord, type Placement, type ReplicaReport, type VolumeHome } from './cluster-records.js'

/** A template's name without its hash: `svc-api-g3`, what the scheduler's template locality matches on. */
export const templateFamily = (name: string): string => name.replace(/-[0-9a-f]{8}$/, '')

/**
 * What every node knows of the cluster, kept current by watches: the nodes
 * (with those whose lease ran out as `lost`), cordons, placements and
 * replica reports. It answers the API's cluster-wide reads and feeds the
 * scheduler. Events: 'nodes' when a node joins, changes or is lost
 * ('node-lost' with its name too), 'replica' (key, report | undefined, previous).
 */
export class ClusterView extends EventEmitter {
  readonly nodes: Informer<NodeStatus>
  readonly cordons: Informer<true>
  readonly placements: Informer<Placement>
  readonly replicas: Informer<ReplicaReport>
  /** Which node holds each volume: a replica with a volume goes to that node. */
  readonly volumes: Informer<VolumeHome>
  /** Nodes seen since this daemon started, by name, with their last status: a lost node is still listed. */
  readonly #seen = new Map<string, NodeStatus>()
  leader: LeaderRecord | null = null

  constructor (store: ClusterStore, log: Logger) {
    super()
    this.nodes = new Informer({
      store,
      prefix: keys.nodes,
      parse: parseNodeStatus,
      onChange: (key, value, previous) => {
        if (value !== undefined) this.#seen.set(value.name, value)
        this.emit('nodes')
        if (value === undefined && previous !== undefined) this.emit('node-lost', lastPart(key))
      },
      log
    })
    this.cordons = new Informer({ store, prefix: keys.cordons, parse: () => true as const, onChange: () => this.emit('nodes'), log })
    this.placements = new Informer({ store, prefix: keys.placements, parse: (raw) => parseRecord(PlacementSchema, raw), onChange: () => this.emit('nodes'), log })
    this.replicas = new Informer({
      store,
      prefix: keys.replicas,
      parse: (raw) => parseRecord(ReplicaReportSchema, raw),
      onChange: (key, value, previous) => this.emit('replica', key, value, previous),
      log
    })
    this.volumes = new Informer({ store, prefix: keys.volumes, parse: (raw) => parseRecord(VolumeHomeSchema, raw), onChange: () => this.emit('nodes'), log })
  }

  async start (): Promise<void> {
    await Promise.all([this.nodes.start(), this.cordons.start(), this.placements.start(), this.replicas.start(), this.volumes.start()])
  }

  close (): void {
    for (const i of [this.nodes, this.cordons, this.placements, this.replicas, this.volumes]) i.close()
  }

  /** The node whose disk holds the volume, if any node made it. */
  volumeNode (name: string): string | undefined {
    return this.volumes.items.get(keys.volume(name))?.node
  }

  node (name: string): NodeStatus | undefined {
    return this.nodes.items.get(keys.node(name))
  }

  isCordoned (name: string): boolean {
    return this.cordons.items.has(keys.cordon(name))
  }

  nodeViews (): NodeView[] {
    const live = new Map([...this.nodes.items.values()].map((n) => [n.name, n]))
    const all = new Map([...this.#seen, ...live])
    return [...all.values()].sort((a, b) => a.name.localeCompare(b.name)).map((n) => {
      const cordoned = this.isCordoned(n.name)
      return { ...n, state: !live.has(n.name) ? 'lost' : cordoned ? 'cordoned' : 'ready', cordoned, leader: this.leader?.node === n.name }
    })
  }

  placementsOn (node: string): Placement[] {
    return [...this.placements.items.values()].filter((p) => p.node === node)
  }

  report (node: string, replica: string): ReplicaReport | undefined {
    return this.replicas.items.get(keys.replica(node, replica))
  }

  /**
   * The live nodes as the scheduler reads them. A placement whose replica
   * has not been reported yet counts against its node's room, so that two
   * decisions in a row do not both take the same free memory.
   */
  schedulerNodes (pending: Iterable<{ node: string, service: string, vcpus: number, memoryMiB: number }> = []): SchedulerNode[] {
    const extra = new Map<string, { vcpus: number, memoryMiB: number, services: string[] }>()
    const add = (node: string, service: string, vcpus: number, memoryMiB: number): void => {
      const e = extra.get(node) ?? { vcpus: 0, memoryMiB: 0, services: [] }
      e.vcpus += vcpus
      e.memoryMiB += memoryMiB
      e.services.push(service)
      extra.set(node, e)
    }
    const replicasOf = new Map<string, Map<string, number>>()
    for (const p of this.placements.items.values()) {
      const m = replicasOf.get(p.node) ?? new Map<string, number>()
      m.set(p.service, (m.get(p.service) ?? 0) + 1)
      replicasOf.set(p.node, m)
      const reported = this.report(p.node, p.replica)?.vm
      if (reported === undefined) add(p.node, p.service, p.resources.vcpus, p.resources.memoryMiB)
    }
    for (const p of pending) {
      add(p.node, p.service, p.vcpus, p.memoryMiB)
      const m = replicasOf.get(p.node) ?? new Map<string, number>()
      m.set(p.service, (m.get(p.service) ?? 0) + 1)
      replicasOf.set(p.node, m)
    }
    return [...this.nodes.items.values()].map((n) => {
      const e = extra.get(n.name)
      return {
        name: n.name,
        labels: n.labels,
        accel: n.accel,
        cordoned: this.isCordoned(n.name),
        capacity: n.capacity,
        allocated: { vcpus: n.allocated.vcpus + (e?.vcpus ?? 0), memoryMiB: n.allocated.memoryMiB + (e?.memoryMiB ?? 0) },
        images: new Set(n.images.map((i) => i.digest)),
        templates: new Set(n.templates.map(templateFamily)),
        replicas: replicasOf.get(n.name) ?? new Map()
      }
    })
  }

  /** NODE/REPLICA of a replicas/ key. */
  static replicaKey (key: string): { node: string, replica: string } | undefined {
    return nodeAndReplica(key, keys.replicas)
  }
}
