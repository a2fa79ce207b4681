/**
 * The scheduler at cluster scale, with a real etcd and no VMs (issue 12):
 *   - starts one etcd member of its own (Debian's /usr/bin/etcd) on loopback,
 *     in a temporary data directory, removed at the end whatever happens;
 *   - writes 1,000 simulated node records (NodeView JSON: varied capacity,
 *     zones, disks, accelerators, images, templates, a few cordoned), reads
 *     them back with one prefix get into SchedulerNode values;
 *   - places 10,000 replicas of 100 services, interleaved as a leader
 *     reconciling many services would: spread everywhere, required
 *     anti-affinity on self for some, preferred affinity to another service
 *     or anti-affinity for some, a nodeSelector for some. Each decision
 *     updates the chosen node's allocated resources and replicas;
 *   - writes each binding (/bench/placements/<service>/<replica> → JSON with
 *     node and epoch) in etcd transactions of up to 128 puts (etcd's default
 *     --max-txn-ops), flushed when full or when the oldest binding waited
 *     FLUSH_MS, with a few transactions in flight while deciding goes on.
 * A decision's latency runs from the moment the scheduler takes the replica
 * up to the commit of the transaction that holds its binding; compute time
 * is schedule() alone. Progress to stderr on a TTY; results (markdown) to stdout.
 *   node dist/bench/scheduler.js [--nodes 1000] [--replicas 10000] [--services 100] [--scoring least-allocated]
 *     [--flush-ms 2] [--in-flight 4]
 * etcd's data directory goes under TMPDIR (default /tmp: this machine's disk, whose fsync etcd waits for).
 */
import { spawn, type ChildProcess } from 'node:child_process'
import { rmSync } from 'node:fs'
import { mkdtemp } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { setImmediate as yieldToIo } from 'node:timers/promises'
import { parseArgs } from 'node:util'
import { Etcd3 } from 'etcd3'
import type { ClusterImage, NodeView, PlacementRules, Resources, ScheduleRequest, SchedulerNode, Scoring } from '../src/core/cluster.js'
import { freePort } from '../src/core/free-port.js'
import { schedule } from '../src/cluster/scheduler.js'
import { percentile } from './lib/measure.js'

const { values } = parseArgs({
  options: {
    nodes: { type: 'string', default: '1000' },
    replicas: { type: 'string', default: '10000' },
    services: { type: 'string', default: '100' },
    scoring: { type: 'string', default: 'least-allocated' },
    'flush-ms': { type: 'string', default: '2' },
    'in-flight': { type: 'string', default: '4' }
  }
})
const wholeNumber = (flag: string, text: string, min: number, max: number): number => {
  const v = Number(text)
  if (!/^\d+$/.test(text) || v < min || v > max) throw new Error(`--${flag} takes a whole number from ${min} to ${max}, not "${text}"`)
  return v
}
const NODES = wholeNumber('nodes', values.nodes, 1, 100_000)
const REPLICAS = wholeNumber('replicas', values.replicas, 1, 1_000_000)
const SERVICES = wholeNumber('services', values.services, 1, 10_000)
if (values.scoring !== 'least-allocated' && values.scoring !== 'most-allocated') throw new Error(`--scoring takes least-allocated or most-allocated, not "${values.scoring}"`)
const SCORING: Scoring = values.scoring

const ETCD = '/usr/bin/etcd'
const MAX_TXN_OPS = 128
const FLUSH_MS = wholeNumber('flush-ms', values['flush-ms'], 0, 1000)
/** Commits in flight at once: etcd puts the proposals that wait together into one raft entry batch and one WAL fsync. */
const MAX_IN_FLIGHT = wholeNumber('in-flight', values['in-flight'], 1, 1000)
const EPOCH = 1
const ZONES = ['z1', 'z2', 'z3', 'z4']
const TARGET_RATE = 500
const TARGET_P99_MS = 20

const began = performance.now()
const progress = (msg: string): void => {
  if (process.stderr.isTTY) process.stderr.write(`[${((performance.now() - began) / 1000).toFixed(1).padStart(6)} s] ${msg}\n`)
}

/** mulberry32: a seeded generator, so every run places the same cluster and breaks ties the same way. */
function seeded (seed: number): () => number {
  let a = seed >>> 0
  return () => {
    a = (a + 0x6D2B79F5) >>> 0
    let t = a
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}
const rand = seeded(12)
const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rand() * xs.length)] as T

// ---------------------------------------------------------------- etcd, one member, ours alone

interface Member { child: ChildProcess, dataDir: string, url: string, stderr: () => string }

async function startEtcd (): Promise<Member> {
  const dataDir = await mkdtemp(join(tmpdir(), 'uig-bench-etcd-'))
  const [clientPort, peerPort] = [await freePort(), await freePort()]
  const url = `http://127.0.0.1:${clientPort}`
  const peer = `http://127.0.0.1:${peerPort}`
  const child = spawn(ETCD, [
    '--name', 'default', '--data-dir', dataDir,
    '--listen-client-urls', url, '--advertise-client-urls', url,
    '--listen-peer-urls', peer, '--initial-advertise-peer-urls', peer,
    '--initial-cluster', `default=${peer}`, '--log-level', 'warn', '--logger', 'zap'
  ], { stdio: ['ignore', 'ignore', 'pipe'] })
  let stderr = ''
  child.stderr?.on('data', (c: Buffer) => { stderr = (stderr + c.toString()).slice(-4000) })
  return { child, dataDir, url, stderr: () => stderr }
}

async function untilEtcdAnswers (client: Etcd3, member: Member, timeoutMs: number): Promise<void> {
  const deadline = performance.now() + timeoutMs
  for (;;) {
    if (member.child.exitCode !== null) throw new Error(`etcd exited at start (code ${member.child.exitCode}):\n${member.stderr()}`)
    try {
      await client.get('/bench/ping').string()
      return
    } catch (err) {
      if (performance.now() > deadline) throw new Error(`etcd did not answer on ${member.url} within ${timeoutMs} ms: ${String(err)}\n${member.stderr()}`)
      await new Promise(resolve => setTimeout(resolve, 100))
    }
  }
}

/** SIGTERM, SIGKILL after a deadline, then the data directory goes. Synchronous enough for an exit handler. */
async function stopEtcd (member: Member): Promise<void> {
  const { child } = member
  if (child.exitCode === null && child.signalCode === null) {
    const exited = new Promise(resolve => child.once('exit', resolve))
    child.kill('SIGTERM')
    const timer = setTimeout(() => child.kill('SIGKILL'), 3000)
    await exited
    clearTimeout(timer)
  }
  rmSync(member.dataDir, { recursive: true, force: true })
}

// ---------------------------------------------------------------- the simulated cluster

interface Service {
  name: string
  replicas: number
  resources: Resources
  digest: string
  rules: PlacementRules
}

function makeServices (): Service[] {
  const names = Array.from({ length: SERVICES }, (_, i) => `svc-${String(i).padStart(3, '0')}`)
  // Counts vary (about 40 to 160) but add up to REPLICAS.
  const weights = names.map(() => 0.4 + 1.2 * rand())
  const sum = weights.reduce((s, w) => s + w, 0)
  const counts = weights.map(w => Math.floor(REPLICAS * w / sum))
  for (let i = 0, left = REPLICAS - counts.reduce((s, c) => s + c, 0); left > 0; i++, left--) counts[i % SERVICES]! += 1
  return names.map((name, i) => {
    const other = names[(i + 1) % SERVICES] as string
    const rules: PlacementRules = {
      nodeSelector: {},
      affinity: { required: [], preferred: [] },
      antiAffinity: { required: [], preferred: [] },
      spread: true
    }
    // At most one replica per node: the classic HA service.
    if (i % 4 === 0) rules.antiAffinity.required.push(name)
    if (i % 3 === 0) rules.affinity.preferred.push({ service: other, weight: 50 })
    if (i % 5 === 1) rules.antiAffinity.preferred.push({ service: other, weight: 30 })
    if (i % 7 === 2) rules.nodeSelector.zone = ZONES[i % ZONES.length] as string
    if (i % 11 === 3) rules.nodeSelector.disk = 'ssd'
    return {
      name,
      replicas: counts[i] as number,
      resources: { vcpus: pick([1, 1, 1, 2]), memoryMiB: pick([256, 512, 512, 1024, 2048]) },
      digest: `sha256:${(i + 1).toString(16).padStart(64, '0')}`,
      rules
    }
  })
}

function makeNodeRecords (services: Service[]): NodeView[] {
  return Array.from({ length: NODES }, (_, i): NodeView => {
    const name = `node-${String(i).padStart(4, '0')}`
    const capacity = { vcpus: pick([16, 32, 48, 64]), memoryMiB: pick([32_768, 65_536, 98_304, 131_072]) }
    const held = services.filter(() => rand() < 0.1)
    const images: ClusterImage[] = held.map(s => ({ ref: `${s.name}:1`, digest: s.digest, vcpus: s.resources.vcpus, memoryMiB: s.resources.memoryMiB, init: true }))
    const cordoned = rand() < 0.01
    return {
      name,
      apiUrl: `http://10.250.${i >> 8}.${i & 255}:7070`,
      underlay: `10.250.${i >> 8}.${i & 255}`,
      subnet: `10.${100 + (i >> 8)}.${i & 255}.0/24`,
      labels: { zone: ZONES[i % ZONES.length] as string, disk: rand() < 0.4 ? 'ssd' : 'hdd' },
      accel: rand() < 0.2 ? 'kvm' : 'tcg',
      capacity,
      // Something already runs there: system VMs, other tenants.
      allocated: { vcpus: Math.floor(rand() * 4), memoryMiB: Math.floor(rand() * 4) * 1024 },
      vms: 0,
      images,
      templates: held.filter(() => rand() < 0.5).map(s => `${s.name}-g1`),
      version: '0.2.0',
      startedAt: new Date(0).toISOString(),
      state: cordoned ? 'cordoned' : 'ready',
      cordoned,
      leader: i === 0
    }
  })
}

/** What the bench changes as it places: the same objects the scheduler reads. */
interface LiveNode extends SchedulerNode { allocated: Resources, replicas: Map<string, number> }

function toSchedulerNode (v: NodeView): LiveNode {
  return {
    name: v.name,
    labels: v.labels,
    accel: v.accel,
    cordoned: v.cordoned,
    capacity: v.capacity,
    allocated: { ...v.allocated },
    images: new Set(v.images.map(i => i.digest)),
    templates: new Set(v.templates),
    replicas: new Map()
  }
}

async function putAll (client: Etcd3, entries: Array<[string, string]>): Promise<number> {
  let txns = 0
  for (let i = 0; i < entries.length; i += MAX_TXN_OPS) {
    const slice = entries.slice(i, i + MAX_TXN_OPS)
    await client.kv.txn({ success: slice.map(([k, v]) => ({ request_put: { key: Buffer.from(k), value: Buffer.from(v) } })) })
    txns++
  }
  return txns
}

// ---------------------------------------------------------------- placing, with batched bindings

interface Pending { key: string, value: string, requestedAt: number }

interface PlacementRun {
  placed: number
  unschedulable: number
  txns: number
  computeMs: number[]
  latencyMs: number[]
  /** One per transaction: sent → committed. */
  commitMs: number[]
  wallMs: number
  firstUnschedulable: string | undefined
}

async function placeAll (client: Etcd3, services: Service[], nodes: LiveNode[]): Promise<PlacementRun> {
  const byName = new Map(nodes.map(n => [n.name, n]))
  const computeMs: number[] = []
  const latencyMs: number[] = []
  const inFlight = new Set<Promise<void>>()
  let batch: Pending[] = []
  let txns = 0
  let placed = 0
  let unschedulable = 0
  let firstUnschedulable: string | undefined
  const commitMs: number[] = []
  let failure: Error | undefined

  const flush = (): void => {
    const ops = batch
    batch = []
    txns++
    const sentAt = performance.now()
    const commit = client.kv.txn({ success: ops.map(o => ({ request_put: { key: Buffer.from(o.key), value: Buffer.from(o.value) } })) })
      .then(() => {
        const now = performance.now()
        commitMs.push(now - sentAt)
        for (const o of ops) latencyMs.push(now - o.requestedAt)
      }, (err: unknown) => { failure ??= err instanceof Error ? err : new Error(String(err)) })
      .finally(() => { inFlight.delete(commit) })
    inFlight.add(commit)
  }

  // Round-robin over services, one replica of each per round, as a leader reconciling them all would.
  const order: Array<{ service: Service, index: number }> = []
  for (let round = 0; order.length < REPLICAS; round++) {
    for (const service of services) if (round < service.replicas) order.push({ service, index: round })
  }
  const random = seeded(99)
  const start = performance.now()
  let lastReport = start
  for (const { service, index } of order) {
    if (failure !== undefined) throw failure
    const requestedAt = performance.now()
    const request: ScheduleRequest = {
      replica: `${service.name}-${index}`,
      service: service.name,
      resources: service.resources,
      imageDigest: service.digest,
      template: `${service.name}-g1`,
      rules: service.rules
    }
    const decision = schedule(request, nodes, { scoring: SCORING, random })
    computeMs.push(performance.now() - requestedAt)
    if (decision.placed) {
      placed++
      const node = byName.get(decision.node) as LiveNode
      node.allocated.vcpus += service.resources.vcpus
      node.allocated.memoryMiB += service.resources.memoryMiB
      node.replicas.set(service.name, (node.replicas.get(service.name) ?? 0) + 1)
      batch.push({ key: `/bench/placements/${service.name}/${request.replica}`, value: JSON.stringify({ node: decision.node, epoch: EPOCH, score: decision.score }), requestedAt })
    } else {
      unschedulable++
      firstUnschedulable ??= decision.message
    }
    const now = performance.now()
    if (batch.length >= MAX_TXN_OPS || (batch.length > 0 && now - (batch[0] as Pending).requestedAt >= FLUSH_MS)) {
      while (inFlight.size >= MAX_IN_FLIGHT) await Promise.race(inFlight)
      flush()
    }
    // Let commits complete (and be timed) between decisions.
    await yieldToIo()
    if (now - lastReport > 1000) {
      lastReport = now
      progress(`${placed + unschedulable}/${REPLICAS} decided, ${txns} transactions`)
    }
  }
  if (batch.length > 0) flush()
  while (inFlight.size > 0) await Promise.race(inFlight)
  if (failure !== undefined) throw failure
  return { placed, unschedulable, txns, computeMs, latencyMs, commitMs, wallMs: performance.now() - start, firstUnschedulable }
}

/** What the decisions must have kept: capacity, one-per-node services, nodeSelectors, no cordoned node used. */
function checkRules (services: Service[], nodes: LiveNode[]): string[] {
  const broken: string[] = []
  for (const n of nodes) {
    if (n.allocated.vcpus > n.capacity.vcpus || n.allocated.memoryMiB > n.capacity.memoryMiB) broken.push(`${n.name} over capacity`)
    if (n.cordoned && n.replicas.size > 0) broken.push(`${n.name} cordoned but given replicas`)
    for (const s of services) {
      const c = n.replicas.get(s.name) ?? 0
      if (c === 0) continue
      if (s.rules.antiAffinity.required.includes(s.name) && c > 1) broken.push(`${n.name} runs ${c} of ${s.name}`)
      for (const [k, v] of Object.entries(s.rules.nodeSelector)) if (n.labels[k] !== v) broken.push(`${n.name} runs ${s.name} without ${k}=${v}`)
    }
  }
  return broken
}

/** etcd's floor on this machine now: one binding per transaction, one after another. */
async function etcdFloor (client: Etcd3, n: number): Promise<number[]> {
  const ms: number[] = []
  for (let i = 0; i < n; i++) {
    const t = performance.now()
    await client.kv.txn({ success: [{ request_put: { key: Buffer.from(`/bench/floor/${i}`), value: Buffer.from('{"node":"node-0000","epoch":1}') } }] })
    ms.push(performance.now() - t)
  }
  await client.delete().prefix('/bench/floor/')
  return ms
}

/** A quantile of one of etcd's Prometheus histograms (seconds → ms), read from its /metrics, interpolated within the bucket. */
async function etcdHistogramMs (url: string, metric: string, q: number): Promise<number> {
  const text = await (await fetch(`${url}/metrics`)).text()
  const buckets: Array<[number, number]> = []
  for (const m of text.matchAll(new RegExp(`^${metric}_bucket\\{le="([^"]+)"\\} (\\S+)$`, 'gm'))) buckets.push([m[1] === '+Inf' ? Infinity : Number(m[1]), Number(m[2])])
  const total = buckets.at(-1)?.[1] ?? 0
  if (total === 0) return NaN
  let prevLe = 0
  let prevCount = 0
  for (const [le, count] of buckets) {
    if (count >= q * total) return 1000 * (le === Infinity ? prevLe : prevLe + (le - prevLe) * ((q * total - prevCount) / Math.max(1, count - prevCount)))
    prevLe = le
    prevCount = count
  }
  return NaN
}

// ---------------------------------------------------------------- the run

const fmt = (ms: number): string => ms < 1 ? ms.toFixed(3) : ms.toFixed(2)
const num = (n: number): string => Math.round(n).toLocaleString('en-US')

async function main (): Promise<void> {
  progress(`starting etcd (${ETCD})`)
  const member = await startEtcd()
  const onExit = (): void => {
    if (member.child.exitCode === null) member.child.kill('SIGKILL')
    rmSync(member.dataDir, { recursive: true, force: true })
  }
  process.once('exit', onExit)
  for (const sig of ['SIGINT', 'SIGTERM'] as const) process.once(sig, () => process.exit(130))
  const client = new Etcd3({ hosts: member.url })
  try {
    await untilEtcdAnswers(client, member, 15_000)
    const services = makeServices()
    const records = makeNodeRecords(services)
    progress(`writing ${NODES} node records`)
    const t0 = performance.now()
    const nodeTxns = await putAll(client, records.map(r => [`/bench/nodes/${r.name}`, JSON.stringify(r)]))
    const writeMs = performance.now() - t0
    const t1 = performance.now()
    const read = await client.getAll().prefix('/bench/nodes/').strings()
    const nodes = Object.values(read).map(text => toSchedulerNode(JSON.parse(text) as NodeView))
    const readMs = performance.now() - t1
    if (nodes.length !== NODES) throw new Error(`read back ${nodes.length} node records, wrote ${NODES}`)
    const recordBytes = Object.values(read).reduce((s, t) => s + Buffer.byteLength(t), 0) / nodes.length

    progress('etcd floor: 200 single-put transactions')
    const floor = await etcdFloor(client, 200)
    progress(`placing ${REPLICAS} replicas of ${SERVICES} services on ${NODES} nodes`)
    const run = await placeAll(client, services, nodes)
    const stored = await client.getAll().prefix('/bench/placements/').count()
    const broken = checkRules(services, nodes)
    const fsync = { p50: await etcdHistogramMs(member.url, 'etcd_disk_wal_fsync_duration_seconds', 0.5), p99: await etcdHistogramMs(member.url, 'etcd_disk_wal_fsync_duration_seconds', 0.99) }

    const rate = run.placed / (run.wallMs / 1000)
    const p50 = percentile(run.latencyMs, 50)
    const p99 = percentile(run.latencyMs, 99)
    const computeTotal = run.computeMs.reduce((s, x) => s + x, 0)
    const used = nodes.filter(n => n.replicas.size > 0).length
    const perNode = nodes.map(n => [...n.replicas.values()].reduce((s, c) => s + c, 0)).filter(c => c > 0)
    const rows: Array<[string, string, string, string]> = [
      ['decisions/s, end to end (bindings committed)', num(rate), `≥ ${TARGET_RATE}`, rate >= TARGET_RATE ? 'PASS' : 'MISS'],
      ['decision latency p50, request → binding committed (ms)', fmt(p50), '', ''],
      ['decision latency p99 (ms)', fmt(p99), `< ${TARGET_P99_MS}`, p99 < TARGET_P99_MS ? 'PASS' : 'MISS'],
      ['compute only (schedule()) p50 (ms)', fmt(percentile(run.computeMs, 50)), '', ''],
      ['compute only p99 (ms)', fmt(percentile(run.computeMs, 99)), '', ''],
      ['compute only, decisions/s of one core', num(run.computeMs.length / (computeTotal / 1000)), '', ''],
      ['replicas placed / unschedulable', `${num(run.placed)} / ${num(run.unschedulable)}`, '', ''],
      ['bindings in etcd afterwards', num(stored), `= ${num(run.placed)}`, stored === run.placed ? 'PASS' : 'MISS'],
      ['etcd transaction, sent → committed, p50 / p99 (ms)', `${fmt(percentile(run.commitMs, 50))} / ${fmt(percentile(run.commitMs, 99))}`, '', ''],
      ['etcd floor: one put per txn, sequential, p50 / p99 (ms)', `${fmt(percentile(floor, 50))} / ${fmt(percentile(floor, 99))}`, '', ''],
      ['etcd WAL fsync (its /metrics, whole run) p50 / p99 (ms)', `${fmt(fsync.p50)} / ${fmt(fsync.p99)}`, '', ''],
      ['decision latency p99 / etcd floor p99', (p99 / percentile(floor, 99)).toFixed(2), '', ''],
      ['etcd transactions for bindings (mean puts each)', `${num(run.txns)} (${(run.placed / run.txns).toFixed(1)})`, `≤ ${MAX_TXN_OPS} puts`, ''],
      ['wall time placing (s)', (run.wallMs / 1000).toFixed(2), '', ''],
      ['node records: write (txns) / prefix get (ms), bytes each', `${num(writeMs)} ms (${nodeTxns}) / ${num(readMs)} ms, ${num(recordBytes)} B`, '', ''],
      ['nodes used; replicas per used node min/median/max', `${num(used)}; ${Math.min(...perNode)}/${percentile(perNode, 50)}/${Math.max(...perNode)}`, '', ''],
      ['rules held (capacity, one per node, nodeSelector, cordon)', broken.length === 0 ? 'yes' : `${broken.length} broken: ${broken.slice(0, 3).join('; ')}`, 'yes', broken.length === 0 ? 'PASS' : 'MISS']
    ]
    console.log(`## Scheduler: ${num(REPLICAS)} replicas of ${SERVICES} services on ${num(NODES)} simulated nodes (etcd ${member.url}, ${SCORING})\n`)
    console.log('| measure | value | target | result |')
    console.log('|---|---|---|---|')
    for (const r of rows) console.log(`| ${r.join(' | ')} |`)
    console.log(`\nBindings go in transactions of up to ${MAX_TXN_OPS} puts, flushed when full or after ${FLUSH_MS} ms, at most ${MAX_IN_FLIGHT} in flight. ` +
      'Reference: the Kubernetes scheduler\'s scalability tests hold about 100 pods/s at 5,000 nodes.')
    if (run.firstUnschedulable !== undefined) console.log(`\nFirst unschedulable: ${run.firstUnschedulable.slice(0, 400)}`)
  } finally {
    client.close()
    await stopEtcd(member)
    process.removeListener('exit', onExit)
  }
}

main().catch((err: unknown) => {
  console.error(err instanceof Error ? err.stack ?? err.message : String(err))
  process.exitCode = 1
})
