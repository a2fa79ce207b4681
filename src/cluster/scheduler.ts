import type { NodeRejection, PlacementRules, ScheduleDecision, ScheduleRequest, SchedulerNode, Scoring } from '../core/cluster.js'
import { decisionMessage, groupDigits } from './scheduler-message.js'

/**
 * The most each score part can add; together they make 100. Every part is
 * an integer (rounded), so the total is their sum and equal totals are
 * real ties, broken at random as kube-scheduler does.
 *
 * - `spread`    30 · (max − c) / (max − min), where c is the node's replicas
 *               of the request's service and min/max are over the feasible
 *               nodes (30 for all when they are equal). Being the node with
 *               the fewest replicas is worth the most: a one-replica skew
 *               costs the whole part, so spread beats locality and
 *               resources unless the skew is already wide.
 * - `free`      25 · (cpu free share + memory free share) / 2, the shares
 *   (least-    taken after this replica is added. Emptier nodes win.
 *   allocated)
 * - `packed`    25 · (cpu used share + memory used share) / 2 after the
 *   (most-     replica: fuller nodes win (bin-packing).
 *   allocated)
 * - `affinity`  20 · (raw + A) / (P + A), where raw = Σ weights of preferred
 *               affinity services the node runs − Σ weights of preferred
 *               anti-affinity services it runs, P and A the sums of all
 *               preferred affinity and anti-affinity weights: the best node
 *               (runs every preferred service, none of the avoided) scores 20.
 * - `template`  17 when the node holds the request's clone template: a clone
 *               starts in about a tenth of a cold boot.
 * - `image`     8 when the node holds the image digest (no fetch).
 *
 * A part is absent when it cannot tell nodes apart for this request (no
 * service, spread off, no preferred terms, no template or digest asked).
 */
export const SCORE_WEIGHTS = Object.freeze({ spread: 30, resources: 25, affinity: 20, template: 17, image: 8 })

export interface ScheduleOptions {
  scoring: Scoring
  /** In [0, 1), as Math.random (the default); a seeded one makes decisions repeatable. */
  random?: () => number
}

/** The request's rules, flattened once per call so the per-node loop allocates nothing. */
interface Plan {
  request: ScheduleRequest
  service: string | null
  selectorKeys: string[]
  selectorValues: string[]
  affinityRequired: string[]
  /** Required affinity on the service itself, while no node runs one yet: the first replica goes anywhere. */
  selfAffinityOpen: boolean
  antiRequired: string[]
  preferAffinity: Preferred[]
  preferAnti: Preferred[]
  preferTotal: number
  preferAntiTotal: number
  leastAllocated: boolean
  spreadOn: boolean
  vcpus: number
  memoryMiB: number
  template: string | undefined
  imageDigest: string | undefined
}

interface Preferred { service: string, weight: number }

/**
 * Replica counts of the request's service per node (-1: filtered), reused
 * across calls. Module scratch is safe: a call runs to completion without
 * yielding, and nothing of it outlives the call.
 */
let counts = new Int32Array(1024)

const PART_SPREAD = 0
const PART_RESOURCES = 1
const PART_AFFINITY = 2
const PART_TEMPLATE = 3
const PART_IMAGE = 4
const parts = new Int32Array(5)

/**
 * Chooses a node for one replica, kube-scheduler's way: filter out every node
 * that cannot take it (each with a reason), score the rest (see SCORE_WEIGHTS),
 * pick the highest, a tie at random. Pure: it changes neither the request nor
 * the nodes; the caller records the placement (allocated, replicas) itself.
 * Two passes over the nodes, no sorting, no allocation per feasible node.
 *
 * @example
 * const d = schedule(request, nodes, { scoring: 'least-allocated' })
 * if (d.placed) bind(request.replica, d.node); else markPending(request.replica, d.message)
 */
export function schedule (request: ScheduleRequest, nodes: readonly SchedulerNode[], options: ScheduleOptions): ScheduleDecision {
  const plan = compile(request, nodes, options.scoring)
  if (counts.length < nodes.length) counts = new Int32Array(nodes.length * 2)
  const filtered: NodeRejection[] = []
  let min = Number.MAX_SAFE_INTEGER
  let max = -1
  for (let i = 0; i < nodes.length; i++) {
    const node = nodes[i] as SchedulerNode
    const reason = rejection(node, plan)
    if (reason !== undefined) {
      filtered.push({ node: node.name, reason })
      counts[i] = -1
      continue
    }
    const c = plan.service === null ? 0 : (node.replicas.get(plan.service) ?? 0)
    counts[i] = c
    if (c < min) min = c
    if (c > max) max = c
  }
  if (max < 0) return { placed: false, filtered, message: decisionMessage(request.replica, undefined, filtered) }

  const random = options.random ?? Math.random
  let best = -1
  let bestScore = -1
  let ties = 0
  for (let i = 0; i < nodes.length; i++) {
    const c = counts[i] as number
    if (c < 0) continue
    const total = score(nodes[i] as SchedulerNode, plan, c, min, max, false)
    if (total > bestScore) {
      best = i
      bestScore = total
      ties = 1
    } else if (total === bestScore) {
      // Reservoir sampling: each of k tied nodes ends up chosen with chance 1/k, in one pass.
      ties++
      if (random() * ties < 1) best = i
    }
  }
  const chosen = nodes[best] as SchedulerNode
  const total = score(chosen, plan, counts[best] as number, min, max, true)
  const named = namedParts(plan)
  return { placed: true, node: chosen.name, score: total, parts: named, filtered, message: decisionMessage(request.replica, { node: chosen.name, score: total, parts: named }, filtered) }
}

function compile (request: ScheduleRequest, nodes: readonly SchedulerNode[], scoring: Scoring): Plan {
  const rules: PlacementRules = request.rules
  const selector = rules.nodeSelector ?? {}
  const selectorKeys = Object.keys(selector)
  const affinityRequired = rules.affinity?.required ?? []
  const service = request.service
  let selfAffinityOpen = false
  if (service !== null && affinityRequired.includes(service)) {
    selfAffinityOpen = !nodes.some(n => (n.replicas.get(service) ?? 0) > 0)
  }
  const preferAffinity = rules.affinity?.preferred ?? []
  const preferAnti = rules.antiAffinity?.preferred ?? []
  return {
    request,
    service,
    selectorKeys,
    selectorValues: selectorKeys.map(k => selector[k] as string),
    affinityRequired,
    selfAffinityOpen,
    antiRequired: rules.antiAffinity?.required ?? [],
    preferAffinity,
    preferAnti,
    preferTotal: preferAffinity.reduce((s, p) => s + p.weight, 0),
    preferAntiTotal: preferAnti.reduce((s, p) => s + p.weight, 0),
    leastAllocated: scoring === 'least-allocated',
    spreadOn: rules.spread !== false && service !== null,
    vcpus: request.resources.vcpus,
    memoryMiB: request.resources.memoryMiB,
    template: request.template,
    imageDigest: request.imageDigest
  }
}

/**
 * Why the node cannot take the replica, or undefined when it can. Cheap checks
 * first. No reason holds ", " (only thousands separators), since messages
 * join reasons with it.
 */
function rejection (node: SchedulerNode, plan: Plan): string | undefined {
  const { rules, resources } = plan.request
  if (rules.node !== undefined && rules.node !== node.name) return `rules.node pins the replica to ${rules.node}`
  for (const [volume, home] of Object.entries(plan.request.volumeNodes ?? {})) {
    if (home !== node.name) return `volume ${volume} lives on node ${home}`
  }
  if (node.cordoned) return 'cordoned (uncordon it to place here)'
  if (rules.accel !== undefined && rules.accel !== node.accel) return `accelerator ${node.accel} (the replica asks for ${rules.accel})`
  for (let k = 0; k < plan.selectorKeys.length; k++) {
    const key = plan.selectorKeys[k] as string
    const want = plan.selectorValues[k] as string
    const has = node.labels[key]
    if (has === undefined) return `label ${key}=${want} missing`
    if (has !== want) return `label ${key} is ${has} (nodeSelector wants ${want})`
  }
  const freeCpu = node.capacity.vcpus - node.allocated.vcpus
  const freeMem = node.capacity.memoryMiB - node.allocated.memoryMiB
  const shortCpu = freeCpu < resources.vcpus
  const shortMem = freeMem < resources.memoryMiB
  if (shortCpu || shortMem) {
    const cpu = `vCPUs ${groupDigits(Math.max(0, freeCpu))} free < ${groupDigits(resources.vcpus)} asked`
    const mem = `memory ${groupDigits(Math.max(0, freeMem))} MiB free < ${groupDigits(resources.memoryMiB)} MiB asked`
    return shortCpu && shortMem ? `${cpu} and ${mem}` : shortCpu ? cpu : mem
  }
  for (const other of plan.affinityRequired) {
    if ((node.replicas.get(other) ?? 0) === 0 && !(other === plan.service && plan.selfAffinityOpen)) {
      return `runs no replica of ${other} (required affinity)`
    }
  }
  for (const other of plan.antiRequired) {
    const n = node.replicas.get(other) ?? 0
    if (n > 0) {
      return other === plan.service
        ? `already runs ${replicasOf(n, other)} (anti-affinity with itself: one per node)`
        : `runs ${replicasOf(n, other)} (required anti-affinity)`
    }
  }
  return undefined
}

function replicasOf (n: number, service: string): string {
  return n === 1 ? `a replica of ${service}` : `${groupDigits(n)} replicas of ${service}`
}

/**
 * The node's total (0..100). Locals only, for the loop over every feasible
 * node; with `record`, the parts also go into `parts` (for the winner).
 */
function score (node: SchedulerNode, plan: Plan, count: number, min: number, max: number, record: boolean): number {
  let spread = 0
  if (plan.spreadOn) spread = max === min ? SCORE_WEIGHTS.spread : Math.round(SCORE_WEIGHTS.spread * (max - count) / (max - min))
  const free = (freeShare(node.capacity.vcpus, node.allocated.vcpus + plan.vcpus) +
    freeShare(node.capacity.memoryMiB, node.allocated.memoryMiB + plan.memoryMiB)) / 2
  const resources = Math.round(SCORE_WEIGHTS.resources * (plan.leastAllocated ? free : 1 - free))
  let affinity = 0
  const range = plan.preferTotal + plan.preferAntiTotal
  if (range > 0) {
    let raw = plan.preferAntiTotal
    for (let k = 0; k < plan.preferAffinity.length; k++) {
      const p = plan.preferAffinity[k] as Preferred
      if ((node.replicas.get(p.service) ?? 0) > 0) raw += p.weight
    }
    for (let k = 0; k < plan.preferAnti.length; k++) {
      const p = plan.preferAnti[k] as Preferred
      if ((node.replicas.get(p.service) ?? 0) > 0) raw -= p.weight
    }
    affinity = Math.round(SCORE_WEIGHTS.affinity * raw / range)
  }
  const template = plan.template !== undefined && node.templates.has(plan.template) ? SCORE_WEIGHTS.template : 0
  const image = plan.imageDigest !== undefined && node.images.has(plan.imageDigest) ? SCORE_WEIGHTS.image : 0
  if (record) {
    parts[PART_SPREAD] = spread
    parts[PART_RESOURCES] = resources
    parts[PART_AFFINITY] = affinity
    parts[PART_TEMPLATE] = template
    parts[PART_IMAGE] = image
  }
  return spread + resources + affinity + template + image
}

/** The share of a capacity left after `used`, in [0, 1]; a zero capacity has none. */
function freeShare (capacity: number, used: number): number {
  if (capacity <= 0) return 0
  const share = (capacity - used) / capacity
  return share < 0 ? 0 : share > 1 ? 1 : share
}

/** The parts that apply to this request (zeros included), from the last recorded score. */
function namedParts (plan: Plan): Record<string, number> {
  const out: Record<string, number> = {}
  if (plan.spreadOn) out.spread = parts[PART_SPREAD] as number
  out[plan.leastAllocated ? 'free' : 'packed'] = parts[PART_RESOURCES] as number
  if (plan.preferTotal + plan.preferAntiTotal > 0) out.affinity = parts[PART_AFFINITY] as number
  if (plan.template !== undefined) out.template = parts[PART_TEMPLATE] as number
  if (plan.imageDigest !== undefined) out.image = parts[PART_IMAGE] as number
  return out
}
