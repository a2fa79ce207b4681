import { Type, type Static } from '@sinclair/typebox'

/**
 * The cluster's shared vocabulary: what a node tells the others about
 * itself, the placement rules a service may declare, and what the
 * scheduler reads and answers. etcd holds these (src/store/etcd-*.ts);
 * the scheduler (src/cluster/scheduler.ts) is a pure function over them.
 */

/** Node names: they become etcd key parts and VM name prefixes. */
export const NODE_NAME = /^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$/

export interface Resources { vcpus: number, memoryMiB: number }

export interface ClusterImage {
  /** name:tag */
  ref: string
  digest: string
  vcpus: number
  memoryMiB: number
  /** False for a unikernel (no uigniter init: no clones). */
  init: boolean
}

/** What a node publishes about itself (under its lease, so it vanishes with the node). */
export interface NodeStatus {
  name: string
  /** http://host:port of its API, where peers reach it (and fetch images from). */
  apiUrl: string
  /** Its address on the network the nodes share: the next hop for its VM subnet. */
  underlay: string
  /** Its VMs' subnet, out of the cluster range (CIDR). */
  subnet: string
  labels: Record<string, string>
  accel: 'kvm' | 'tcg'
  capacity: Resources
  /** What its VMs take now (reserved by running and starting VMs). */
  allocated: Resources
  vms: number
  /** The images it holds: what the leader needs to resolve a service's image without asking the node. */
  images: ClusterImage[]
  /** Clone templates it holds, by name. */
  templates: string[]
  version: string
  startedAt: string
}

/** A node as the cluster sees it. `lost`: its lease expired (it is gone, or cut off from etcd). */
export type NodeState = 'ready' | 'cordoned' | 'lost'

export interface NodeView extends NodeStatus {
  state: NodeState
  cordoned: boolean
  leader: boolean
}

const LABEL_KEY = '^[A-Za-z0-9]([A-Za-z0-9._/-]{0,62}[A-Za-z0-9])?$'
export const LabelsSchema = Type.Record(Type.String({ pattern: LABEL_KEY }), Type.String({ maxLength: 63, pattern: '^[A-Za-z0-9._-]*$' }), { default: {} })

const ServiceRef = Type.String({ pattern: '^[a-z][a-z0-9-]{0,30}$', description: 'A service name' })
const Preferred = Type.Object({
  service: ServiceRef,
  weight: Type.Integer({ minimum: 1, maximum: 100, default: 50 })
}, { additionalProperties: false })
const AffinityTerms = Type.Object({
  required: Type.Array(ServiceRef, { default: [], maxItems: 16, description: 'Only nodes with (affinity) or without (anti-affinity) a replica of each of these services' }),
  preferred: Type.Array(Preferred, { default: [], maxItems: 16, description: 'Nodes with (without) a replica of the service score its weight higher' })
}, { additionalProperties: false, default: {} })

/** Where a service's replicas may go and which nodes they prefer (a cluster only; a single host ignores it). */
export const PlacementRulesSchema = Type.Object({
  node: Type.Optional(Type.String({ pattern: NODE_NAME.source, description: 'Pins every replica to this node' })),
  nodeSelector: Type.Record(Type.String({ pattern: LABEL_KEY }), Type.String({ maxLength: 63 }), { default: {}, description: 'Labels a node must have, every one' }),
  accel: Type.Optional(Type.Union([Type.Literal('kvm'), Type.Literal('tcg')], { description: 'Only nodes whose VMs run on this accelerator' })),
  affinity: AffinityTerms,
  antiAffinity: AffinityTerms,
  spread: Type.Boolean({ default: true, description: 'Score nodes with fewer replicas of this service higher' })
}, { additionalProperties: false, default: {} })
export type PlacementRules = Static<typeof PlacementRulesSchema>

export type Scoring = 'least-allocated' | 'most-allocated'

/** One node as the scheduler reads it. */
export interface SchedulerNode {
  name: string
  labels: Record<string, string>
  accel: 'kvm' | 'tcg'
  cordoned: boolean
  capacity: Resources
  /** Taken, including placements made but not started yet. */
  allocated: Resources
  images: ReadonlySet<string>
  templates: ReadonlySet<string>
  /** Services of the replicas it runs or was given, one entry per replica. */
  replicas: ReadonlyMap<string, number>
}

export interface ScheduleRequest {
  /** The replica's (VM's) name, for the decision's message. */
  replica: string
  service: string | null
  resources: Resources
  /** The image digest: a node that holds it starts without fetching. */
  imageDigest?: string
  /** The template a clone would start from: a node that holds it starts without making one. */
  template?: string
  rules: PlacementRules
  /** The volumes it attaches that exist already, with the node each lives on: it can run only there. */
  volumeNodes?: Record<string, string>
}

export interface NodeRejection { node: string, reason: string }

export type ScheduleDecision =
  | { placed: true, node: string, score: number, parts: Record<string, number>, filtered: NodeRejection[], message: string }
  | { placed: false, filtered: NodeRejection[], message: string }
