/**
 * The cluster's own figures (issue 12, Benchmarks), on a lab of three nodes
 * (network namespaces, one real daemon and one etcd member each, real VMs
 * under TCG, kept few):
 *   1. failover: a service of hello (clone, min 3, spread); one node's daemon
 *      and its QEMUs are killed (kill -9); time until the service has 3
 *      healthy endpoints on the other nodes, beside the lease TTL and the
 *      replacement's clone start, PASS/MISS against TTL + one clone start;
 *      followers die in the first runs, the leader in one more (an election too);
 *   2. etcd writes (revisions) per VM start: scale up by exactly one, from
 *      quiet to quiet, with the keys each revision wrote;
 *   3. bytes on the wire per node heartbeat (lease keep-alive), counted by
 *      nft in an idle node's namespace, and the size of the node record;
 *   4. templates per node: remaking one on a node against copying its RAM and
 *      state files from another node over the underlay, and a clone from
 *      the copy.
 * Needs root. Results (markdown) on stdout; progress on stderr on a TTY (or --progress).
 *   node dist/bench/cluster.js [--runs 3] [--samples 3] [--idle-s 20] [--no-node-http] [--no-leader-run] [--figures 1,2,3,4] [--progress] [--keep-logs DIR]
 * --keep-logs copies the lab's logs (daemons, etcd) to DIR before the lab goes.
 */
import { execFileSync } from 'node:child_process'
import { readdirSync, readFileSync } from 'node:fs'
import { mkdir, readFile, rm, stat } from 'node:fs/promises'
import { join } from 'node:path'
import { parseArgs } from 'node:util'
import type { NodeView } from '../src/core/cluster.js'
import { loadConfig } from '../src/core/config.js'
import type { ServiceSpec, ServiceStatus } from '../src/core/service.js'
import type { TemplateInfo } from '../src/core/template.js'
import type { Vm } from '../src/core/vm.js'
import { ImageBuilder } from '../src/guest/image-builder.js'
import { createKernelSource } from '../src/guest/guest-kernel.js'
import { ImageStore } from '../src/guest/image-store.js'
import { Template } from '../src/snapshot/template.js'
import { ClusterDaemons } from '../test/helpers/cluster-daemons.js'
import { startClusterLab, type ClusterLab } from '../test/helpers/cluster-lab.js'
import { exampleSpec, packageRoot } from '../test/helpers/fixtures.js'
import { describeRevisions, EtcdRecorder, repeatedPuts, type RecordedChange } from './lib/etcd-recorder.js'
import { percentile, untilServing } from './lib/measure.js'
import { NetnsEtcdMeter } from './lib/netns-etcd-meter.js'
import { installCopiedTemplate, templateMemoryDir } from './lib/template-copy.js'

const { values } = parseArgs({
  options: {
    runs: { type: 'string', default: '3' },
    samples: { type: 'string', default: '3' },
    'idle-s': { type: 'string', default: '20' },
    'no-node-http': { type: 'boolean', default: false },
    progress: { type: 'boolean', default: false },
    'no-leader-run': { type: 'boolean', default: false },
    figures: { type: 'string', default: '1,2,3,4' },
    'keep-logs': { type: 'string' }
  }
})
const wholeNumber = (flag: string, text: string, min: number, max: number): number => {
  const v = Number(text)
  if (!/^\d+$/.test(text) || !Number.isSafeInteger(v) || v < min || v > max) throw new Error(`--${flag} takes a whole number from ${min} to ${max}, not "${text}"`)
  return v
}
const RUNS = wholeNumber('runs', values.runs, 1, 10)
const SAMPLES = wholeNumber('samples', values.samples, 1, 20)
const IDLE_S = wholeNumber('idle-s', values['idle-s'], 5, 600)
const WITH_NODE_HTTP = values['no-node-http'] !== true
/** One more failover run, in which the leader is the node that dies. */
const LEADER_RUN = values['no-leader-run'] !== true
const FIGURES = new Set(values.figures.split(',').map((f) => f.trim()))
if ([...FIGURES].some((f) => !['1', '2', '3', '4'].includes(f))) throw new Error(`--figures takes a comma-separated list of 1 to 4, not "${values.figures}"`)
/** What ClusterDaemons writes into every node's config (cluster.leaseTtlS); with it, the lab's subnet range and jail uids. */
const LEASE_TTL_S = 4
const SERVICE = 'fo'
const PREFIX = '/uigniter/'
const HEALTH = { intervalMs: 300, timeoutMs: 2000, unhealthyThreshold: 3 }
const FILE_PORT = 7399

const began = performance.now()
const showProgress = process.stderr.isTTY || values.progress === true
const progress = (msg: string): void => { if (showProgress) process.stderr.write(`[${((performance.now() - began) / 1000).toFixed(1).padStart(6)} s] ${msg}\n`) }
const sleep = async (ms: number): Promise<void> => await new Promise((resolve) => setTimeout(resolve, ms))
const ms = (x: number): string => Number.isFinite(x) ? Math.round(x).toLocaleString('en-US') : 'n/a'
const kib = (bytes: number): string => `${(bytes / 1024).toLocaleString('en-US', { maximumFractionDigits: 1 })} KiB`
const mib = (bytes: number): string => `${(bytes / 1048576).toLocaleString('en-US', { maximumFractionDigits: 1 })} MiB`
const table = (head: string[], rows: string[][]): string => [`| ${head.join(' | ')} |`, `|${head.map(() => '---').join('|')}|`, ...rows.map((r) => `| ${r.join(' | ')} |`)].join('\n')

async function until<T> (what: string, probe: () => Promise<T | undefined>, timeoutMs: number, everyMs = 250): Promise<T> {
  const deadline = performance.now() + timeoutMs
  let last: unknown
  while (performance.now() < deadline) {
    try {
      const v = await probe()
      if (v !== undefined) return v
    } catch (err) { last = err }
    await sleep(everyMs)
  }
  throw new Error(`${what}: not within ${timeoutMs} ms${last !== undefined ? ` (last error: ${(last as Error).message})` : ''}`)
}

// ---------------------------------------------------------------- the cluster

class Bench {
  readonly lab: ClusterLab
  readonly daemons: ClusterDaemons
  readonly recorder: EtcdRecorder

  constructor (lab: ClusterLab) {
    this.lab = lab
    this.daemons = new ClusterDaemons(lab, (i) => ({
      UIGNITER_NODE_LABELS: `zone=${['a', 'b', 'c'][i - 1] ?? 'x'}`,
      UIGNITER_NODE_MEMORY_MIB: '2048'
    }))
    this.recorder = new EtcdRecorder(lab.etcdEndpoints, PREFIX)
  }

  api (i: number): ReturnType<ClusterDaemons['api']> { return this.daemons.api(i) }
  index (name: string): number { return Number(name.replace(/^n/, '')) }

  async nodes (via: number): Promise<NodeView[]> { return await this.api(via).call<NodeView[]>('GET', '/v1/nodes') }
  async leader (): Promise<number> {
    for (const i of [1, 2, 3]) {
      const views = await this.nodes(i).catch(() => undefined)
      const leader = views?.find((n) => n.leader)
      if (leader !== undefined) return this.index(leader.name)
    }
    throw new Error('no node answers with a leader')
  }

  async service (via: number): Promise<ServiceStatus> { return await this.api(via).call<ServiceStatus>('GET', `/v1/services/${SERVICE}`) }

  async readyNodes (via: number): Promise<NodeView[]> {
    return await until('three ready nodes and a leader', async () => {
      const v = await this.nodes(via)
      return v.length === 3 && v.every((n) => n.state === 'ready') && v.filter((n) => n.leader).length === 1 ? v : undefined
    }, 90_000)
  }
}

const healthy = (s: ServiceStatus, exceptNode?: string): ServiceStatus['endpoints'] =>
  s.endpoints.filter((e) => e.health === 'healthy' && e.vm !== null && e.node !== exceptNode)

function spec (min: number): Partial<ServiceSpec> {
  return { image: 'hello', replicas: { min }, ports: [{ port: 8080, protocol: 'http' }], healthCheck: { ...HEALTH, path: '/', healthyThreshold: 1 }, startPath: 'clone', placement: { spread: true, nodeSelector: {}, affinity: { required: [], preferred: [] }, antiAffinity: { required: [], preferred: [] } } }
}

async function applyService (b: Bench, via: number, min: number): Promise<void> {
  await b.api(via).call('PUT', `/v1/services/${SERVICE}`, spec(min))
}

/** Pids in a node's namespace that a dead node would have lost: all but its etcd member (the lab's, and kept for quorum). */
function nodeProcesses (ns: string): number[] {
  const out = execFileSync('ip', ['netns', 'pids', ns], { encoding: 'utf8' })
  return out.split('\n').filter((p) => /^\d+$/.test(p)).map(Number).filter((pid) => {
    try { return readFileSync(`/proc/${pid}/comm`, 'utf8').trim() !== 'etcd' } catch { return false }
  })
}

// ---------------------------------------------------------------- 1. failover

interface FailoverRun {
  victim: string
  wasLeader: boolean
  killed: string[]
  replicasLost: number
  totalMs: number
  leaseGoneMs: number
  placedMs: number
  reportedMs: number
  cloneMs: number
  replacementNode: string
  plan: string
}

async function failover (b: Bench, run: number, killLeader: boolean): Promise<FailoverRun> {
  const leader = await b.leader()
  const before = await b.service(leader)
  const held = new Map<string, number>()
  for (const e of healthy(before)) held.set(e.node ?? '', (held.get(e.node ?? '') ?? 0) + 1)
  // A follower that holds replicas, the one with fewest; or the leader, whose death adds an election: a figure apart.
  const candidates = [...held.entries()].filter(([n]) => killLeader ? n === `n${leader}` : n !== `n${leader}`).sort((x, y) => x[1] - y[1])
  const victimName = candidates[0]?.[0]
  if (victimName === undefined) throw new Error(`no ${killLeader ? 'leader' : 'follower'} holds a replica of ${SERVICE}: ${JSON.stringify([...held])}`)
  const victim = b.index(victimName)
  // Asked on a node that survives: with the leader gone, a follower answers once a new leader is elected.
  const via = killLeader ? ([1, 2, 3].find((i) => i !== victim) ?? 1) : leader
  const beforeVms = new Set(before.endpoints.map((e) => e.vm))
  const procs = nodeProcesses(b.lab.node(victim).ns)
  const killed = procs.map((pid) => { try { return readFileSync(`/proc/${pid}/comm`, 'utf8').trim() } catch { return '?' } })
  progress(`failover run ${run}: killing ${victimName} (${killed.join(', ')}; ${held.get(victimName)} replica(s)); leader n${leader}`)
  const mark = b.recorder.changes.length
  const t0 = performance.now()
  for (const pid of procs) { try { process.kill(pid, 'SIGKILL') } catch { /* gone already */ } }
  const after = await until('3 healthy endpoints on the surviving nodes', async () => {
    const s = await b.service(via)
    return healthy(s, victimName).length >= 3 ? s : undefined
  }, 180_000, 50)
  const totalMs = performance.now() - t0
  const fresh = healthy(after, victimName).filter((e) => !beforeVms.has(e.vm))
  const seen = b.recorder.changes.slice(mark)
  const firstAt = (pred: (c: RecordedChange) => boolean): number => {
    const c = seen.find(pred)
    return c === undefined ? NaN : c.at - t0
  }
  const freshNames = new Set(fresh.map((e) => e.vm ?? ''))
  const reports = seen.filter((c) => c.type === 'put' && c.key.startsWith(`${PREFIX}replicas/`) && freshNames.has(c.key.slice(c.key.lastIndexOf('/') + 1)))
  const vms = reports.map((c) => (JSON.parse(c.value) as { vm?: Vm }).vm).filter((vm): vm is Vm => vm?.state === 'running')
  const cloneMs = Math.max(...vms.map((vm) => vm.startTimings?.totalMs ?? NaN))
  const result: FailoverRun = {
    victim: victimName,
    wasLeader: killLeader,
    killed,
    replicasLost: held.get(victimName) ?? 0,
    totalMs,
    leaseGoneMs: firstAt((c) => c.type === 'delete' && c.key === `${PREFIX}nodes/${victimName}`),
    placedMs: firstAt((c) => c.type === 'put' && c.key.startsWith(`${PREFIX}placements/`) && freshNames.has(c.key.slice(c.key.lastIndexOf('/') + 1))),
    reportedMs: Math.max(...reports.filter((c) => (JSON.parse(c.value) as { vm?: Vm }).vm?.state === 'running').map((c) => c.at - t0)),
    cloneMs,
    replacementNode: [...new Set(fresh.map((e) => e.node))].join(', '),
    plan: [...new Set(vms.map((vm) => vm.startTimings?.plan ?? '?'))].join(', ')
  }
  progress(`failover run ${run}: ${ms(totalMs)} ms (lease gone at ${ms(result.leaseGoneMs)}, clone ${ms(cloneMs)} ms); restarting ${victimName}`)
  await b.daemons.start(victim)
  await b.readyNodes(via)
  await b.recorder.quiet(2000, 90_000)
  return result
}

// ---------------------------------------------------------------- 2. writes per VM start

interface WritesSample { writes: number, startWrites: number, repeated: number, stopWrites: number, lines: string[], stopLines: string[], startMs: number }

async function writesPerStart (b: Bench, base: number): Promise<WritesSample> {
  const leader = await b.leader()
  const rev0 = await b.recorder.quiet(2000, 90_000)
  const t0 = performance.now()
  await applyService(b, leader, base + 1)
  await until(`${base + 1} healthy replicas`, async () => {
    const s = await b.service(leader)
    return healthy(s).length >= base + 1 ? s : undefined
  }, 120_000, 100)
  const startMs = performance.now() - t0
  const rev1 = await b.recorder.quiet(2000, 90_000)
  const changes = b.recorder.between(rev0, rev1)
  // The spec's own write is the request, not the start: counted apart.
  const specRevisions = new Set(changes.filter((c) => c.key.startsWith(`${PREFIX}services/`)).map((c) => c.revision))
  // Back to base, so that the VM count stays small; those writes are a stop's.
  await applyService(b, leader, base)
  await until(`${base} replicas again`, async () => {
    const s = await b.service(leader)
    return s.endpoints.filter((e) => e.vm !== null).length === base ? s : undefined
  }, 120_000, 200)
  const rev2 = await b.recorder.quiet(2000, 90_000)
  const stops = b.recorder.between(rev1, rev2)
  const stopSpec = new Set(stops.filter((c) => c.key.startsWith(`${PREFIX}services/`)).map((c) => c.revision))
  return {
    writes: rev1 - rev0,
    startWrites: rev1 - rev0 - specRevisions.size,
    repeated: repeatedPuts(changes),
    stopWrites: rev2 - rev1 - stopSpec.size,
    lines: describeRevisions(changes, PREFIX),
    stopLines: describeRevisions(stops, PREFIX),
    startMs
  }
}

// ---------------------------------------------------------------- 3. heartbeat bytes

interface HeartbeatFigure { node: string, seconds: number, bytes: number, packets: number, keepAlives: number, revisions: number, parts: Record<string, { bytes: number, packets: number }>, statusBytes: Record<string, number> }

async function heartbeat (b: Bench): Promise<HeartbeatFigure> {
  const leader = await b.leader()
  const h = [1, 2, 3].find((i) => i !== leader) ?? 1
  const node = b.lab.node(h)
  const meter = new NetnsEtcdMeter(node.ns)
  await b.recorder.quiet(2000, 90_000)
  await meter.start()
  try {
    const rev0 = await b.recorder.revision()
    const t0 = performance.now()
    const start = await meter.read()
    progress(`heartbeat: counting ${node.name}'s etcd traffic for ${IDLE_S} s`)
    await sleep(IDLE_S * 1000)
    const end = await meter.read()
    const seconds = (performance.now() - t0) / 1000
    const rev1 = await b.recorder.revision()
    const parts: HeartbeatFigure['parts'] = {}
    for (const [k, v] of Object.entries(end.parts)) parts[k] = { bytes: v.bytes - (start.parts[k]?.bytes ?? 0), packets: v.packets - (start.parts[k]?.packets ?? 0) }
    const statusBytes: Record<string, number> = {}
    for (const n of b.lab.nodes) statusBytes[n.name] = Buffer.byteLength(await b.recorder.value(`${PREFIX}nodes/${n.name}`) ?? '')
    return { node: node.name, seconds, bytes: end.bytes - start.bytes, packets: end.packets - start.packets, keepAlives: seconds / (LEASE_TTL_S / 3), revisions: rev1 - rev0, parts, statusBytes }
  } finally {
    await meter.close()
  }
}

// ---------------------------------------------------------------- 4. templates: remake against copy

interface TemplateFigure {
  image: string
  memoryMiB: number
  remakeMs: number[]
  bootMs: number[]
  saveMs: number[]
  ramBytes: number
  ramAllocated: number
  stateBytes: number
  rawCopyMs: number
  rawAllocated: number
  sparseCopyMs: number
  sparseAllocated: number
  installMs: number
  cloneFromCopyMs: number
  cloneFromCopyServes: boolean
  cloneFromCopyError: string
  cloneFromRemakeMs: number
}

async function makeTemplate (b: Bench, i: number, name: string, image: string): Promise<{ info: TemplateInfo, wallMs: number }> {
  const t0 = performance.now()
  const info = await b.api(i).call<TemplateInfo>('POST', '/v1/templates', { name, image, ready: 'app', port: 8080, httpPath: '/' })
  return { info, wallMs: performance.now() - t0 }
}

async function cloneAndServe (b: Bench, i: number, template: string, name: string): Promise<{ ms: number, serves: boolean, vm: Vm }> {
  const t0 = performance.now()
  const vm = await b.api(i).call<Vm>('POST', '/v1/vms', { name, template, network: 'bridge' })
  let serves = false
  if (vm.ipAddress !== null) serves = await untilServing(vm.ipAddress, 8080, 10_000).then(() => true, () => false)
  return { ms: performance.now() - t0, serves, vm }
}

async function templates (b: Bench, image: string): Promise<TemplateFigure> {
  const name = `tb-${image}`
  const src = b.lab.node(1)
  const dst = b.lab.node(3)
  progress(`template ${image}: making it on n1, then on n2`)
  const made = await makeTemplate(b, 1, name, image)
  const remade = await makeTemplate(b, 2, name, image)
  const ramPath = made.info.memoryPath
  const statePath = join(Template.dirOf(src.dataDir, name), 'state.bin')
  const ram = await stat(ramPath)

  const server = b.lab.spawn(1, process.execPath, [join(packageRoot, 'dist/bench/lib/template-file-server.js'), src.underlay, String(FILE_PORT), ramPath, statePath], { log: 'template-file-server.log' })
  const base = `http://${src.underlay}:${FILE_PORT}`
  try {
    await until('the template file server', async () => (await b.lab.exec(3, 'curl', ['-sf', `${base}/ready`])).stdout === 'ok' ? true : undefined, 10_000, 100)
    const memDir = templateMemoryDir(dst.dataDir, name)
    const tDir = Template.dirOf(dst.dataDir, name)
    await mkdir(memDir, { recursive: true, mode: 0o700 })
    await mkdir(tDir, { recursive: true, mode: 0o700 })
    progress(`template ${image}: copying ${mib(ram.size)} (${mib(ram.blocks * 512)} allocated) n1 → n3, raw and sparse`)
    // The client runs in n3's namespace: the bytes cross the underlay from n1 to n3.
    let t0 = performance.now()
    await b.lab.exec(3, 'sh', ['-c', `curl -sf -o '${memDir}/memory.ram' ${base}/raw/ram && curl -sf -o '${tDir}/state.bin' ${base}/raw/state`])
    const rawCopyMs = performance.now() - t0
    const rawCopied = await stat(join(memDir, 'memory.ram'))
    await rm(join(memDir, 'memory.ram'), { force: true })
    await rm(join(tDir, 'state.bin'), { force: true })
    t0 = performance.now()
    await b.lab.exec(3, 'sh', ['-c', `set -e; tmp=$(mktemp -d '${memDir}/in.XXXXXX'); curl -sf ${base}/sparse | tar -xSf - -C "$tmp"; mv "$tmp/memory.ram" '${memDir}/memory.ram'; mv "$tmp/state.bin" '${tDir}/state.bin'; rmdir "$tmp"`])
    const sparseCopyMs = performance.now() - t0
    const copied = await stat(join(memDir, 'memory.ram'))
    t0 = performance.now()
    await installCopiedTemplate({ fromDataDir: src.dataDir, toDataDir: dst.dataDir, id: name })
    const installMs = performance.now() - t0

    progress(`template ${image}: a clone on n3 from the copy, and one on n2 from its own`)
    const fromCopy = await cloneAndServe(b, 3, name, `cp-${image}`).catch((err: unknown) => err as Error)
    const fromRemake = await cloneAndServe(b, 2, name, `rm-${image}`)
    for (const [i, vm] of [[3, fromCopy instanceof Error ? undefined : fromCopy.vm], [2, fromRemake.vm]] as const) {
      if (vm !== undefined) await b.api(i).call('DELETE', `/v1/vms/${vm.id}?force=true`).catch(() => {})
    }
    for (const i of [1, 2, 3]) await b.api(i).call('DELETE', `/v1/templates/${name}`).catch(() => {})
    return {
      image,
      memoryMiB: made.info.memoryMiB,
      remakeMs: [made.wallMs, remade.wallMs],
      bootMs: [made.info.timings.bootMs, remade.info.timings.bootMs],
      saveMs: [made.info.timings.saveMs, remade.info.timings.saveMs],
      ramBytes: ram.size,
      ramAllocated: ram.blocks * 512,
      stateBytes: made.info.stateBytes,
      rawCopyMs,
      rawAllocated: rawCopied.blocks * 512,
      sparseCopyMs,
      sparseAllocated: copied.blocks * 512,
      installMs,
      cloneFromCopyMs: fromCopy instanceof Error ? NaN : fromCopy.ms,
      cloneFromCopyServes: !(fromCopy instanceof Error) && fromCopy.serves,
      cloneFromCopyError: fromCopy instanceof Error ? fromCopy.message.split('\n')[0] ?? '' : '',
      cloneFromRemakeMs: fromRemake.serves ? fromRemake.ms : NaN
    }
  } finally {
    server.kill('SIGTERM')
  }
}

// ---------------------------------------------------------------- the run

/** Each node's templates' RAM files live in /dev/shm, outside the lab's directory: removed by name, ours only. */
function discardTemplates (lab: ClusterLab): Promise<void[]> {
  return Promise.all(lab.nodes.flatMap((n) => {
    let names: string[] = []
    try { names = readdirSync(join(n.dataDir, 'templates')) } catch { /* none made */ }
    return names.map(async (name) => await Template.discard(n.dataDir, name))
  }))
}

type Emit = (...lines: string[]) => void

async function reportFailover (b: Bench, emit: Emit): Promise<void> {
  const runs: FailoverRun[] = []
  for (let r = 1; r <= RUNS + (LEADER_RUN ? 1 : 0); r++) {
    try {
      runs.push(await failover(b, r, r > RUNS))
    } catch (err) {
      emit(`(failover run ${r} failed: ${(err as Error).message}; the runs before it are below)`, '')
      break
    }
  }
  emit('## Failover (a node\'s daemon and QEMUs killed, until 3 healthy endpoints on the other nodes)', '',
    table(['run', 'node killed', 'replicas lost', 'lease TTL (ms)', 'lease gone at (ms)', 'placed again at (ms)', 'reported running at (ms)', 'back at min (ms)', 'clone start (ms)', 'on node', 'target TTL + clone (ms)', 'result'],
      runs.map((f, k) => {
        const target = LEASE_TTL_S * 1000 + f.cloneMs
        return [String(k + 1), `${f.victim}${f.wasLeader ? ' (the leader)' : ''}`, String(f.replicasLost), ms(LEASE_TTL_S * 1000), ms(f.leaseGoneMs), ms(f.placedMs), ms(f.reportedMs), ms(f.totalMs), `${ms(f.cloneMs)} (${f.plan})`, f.replacementNode, ms(target), f.totalMs <= target ? 'PASS' : 'MISS']
      })), '',
    `Killed in each run: ${runs.map((f, k) => `run ${k + 1}: ${f.killed.join(', ')}`).join('; ')} (the node's etcd member was left running: the lab's quorum).`, '',
    `Median back at min: ${ms(percentile(runs.map((f) => f.totalMs), 50))} ms. "lease gone" is when the node's key was deleted in etcd (its lease expired), as the bench's own watch saw it; "placed again" the leader's placement put; "reported running" the surviving node's replica report; "clone start" the slowest replacement's startTimings.totalMs.`, '')
}

async function reportWrites (b: Bench, emit: Emit): Promise<void> {
  const samples: WritesSample[] = []
  for (let k = 1; k <= SAMPLES; k++) {
    progress(`writes: sample ${k}: scaling ${SERVICE} 3 → 4 → 3`)
    samples.push(await writesPerStart(b, 3))
  }
  const starts = samples.map((s) => s.startWrites)
  emit('## etcd writes per VM start (revisions, scale 3 → 4, quiet to quiet)', '',
    table(['figure', 'value', 'target', 'result'], [
      ['revisions for the scale-up, all (list)', samples.map((s) => s.writes).join(', '), '', ''],
      ['of which the VM start (without the spec\'s own write), median', String(percentile(starts, 50)), '≤ 3', percentile(starts, 50) <= 3 ? 'PASS' : 'MISS'],
      ['VM start writes (list)', starts.join(', '), '', ''],
      ['of those, puts of a value the key already had (list)', samples.map((s) => s.repeated).join(', '), '', ''],
      ['VM stop writes (scale 4 → 3; list, without the spec write)', samples.map((s) => s.stopWrites).join(', '), '', ''],
      ['scale-up request to healthy (ms, list)', samples.map((s) => ms(s.startMs)).join(', '), '', '']
    ]), '',
    'What each revision wrote (first sample, start):', '', '```', ...(samples[0]?.lines ?? []), '```', '',
    'And the stop (first sample):', '', '```', ...(samples[0]?.stopLines ?? []), '```', '')
  if (samples.length > 1) emit('Other samples, start:', '', '```', ...samples.slice(1).flatMap((s, k) => [`-- sample ${k + 2}`, ...s.lines]), '```', '')
}

async function reportHeartbeat (b: Bench, emit: Emit): Promise<void> {
  const hb = await heartbeat(b)
  emit('## Bytes per node heartbeat (lease keep-alive every TTL/3, idle cluster)', '',
    table(['figure', 'value'], [
      ['node measured (a follower)', hb.node],
      ['window (s)', hb.seconds.toFixed(1)],
      ['etcd revisions in the window (0 = idle)', String(hb.revisions)],
      ['keep-alives in the window (window / (TTL/3))', hb.keepAlives.toFixed(1)],
      ['bytes on the wire, both ways (IP packets, the node\'s etcd clients ↔ port 2379)', `${hb.bytes.toLocaleString('en-US')} B in ${hb.packets} packets`],
      ['by counter', Object.entries(hb.parts).map(([k, v]) => `${k} ${v.bytes.toLocaleString('en-US')} B / ${v.packets} pkts`).join('; ')],
      ['bytes per keep-alive (all of it charged to the heartbeat)', `${Math.round(hb.bytes / hb.keepAlives).toLocaleString('en-US')} B in ${(hb.packets / hb.keepAlives).toFixed(1)} packets`],
      ['of which IPv4 + TCP headers (52 B a packet, with timestamps)', `${Math.round(hb.packets * 52 / hb.keepAlives).toLocaleString('en-US')} B`],
      ['bytes per second per node, idle', `${Math.round(hb.bytes / hb.seconds).toLocaleString('en-US')} B/s`],
      ['node status record (value of /uigniter/nodes/NAME), written on changes only', Object.entries(hb.statusBytes).map(([n, v]) => `${n} ${v.toLocaleString('en-US')} B`).join(', ')]
    ]), '')
}

async function reportTemplates (b: Bench, emit: Emit): Promise<void> {
  // Fewer VMs: the service's replicas are not needed any more.
  await b.api(await b.leader()).call('DELETE', `/v1/services/${SERVICE}`).catch(() => {})
  await until(`${SERVICE} gone`, async () => await b.service(await b.leader()).then(() => undefined, () => true), 60_000)
  const figures: TemplateFigure[] = []
  for (const image of ['hello', ...(WITH_NODE_HTTP ? ['node-http'] : [])]) figures.push(await templates(b, image))
  emit('## Clone templates per node: remake against copy (n1 makes it; n2 remakes it; n3 gets a copy from n1 over the underlay)', '',
    table(['image', 'RAM (apparent / allocated)', 'state file', 'remake on a node: wall (ms, n1, n2)', 'of which boot to ready / save (ms)', 'copy raw over HTTP: ms (bytes moved, allocated on n3)', 'copy sparse, tar -S over HTTP: ms (bytes moved ≈ allocated on n3)', 'record rewrite (ms)', 'first clone from the copy, to serving (ms)', 'first clone from the remake, to serving (ms)'],
      figures.map((f) => [
        `${f.image} (${f.memoryMiB} MiB)`, `${mib(f.ramBytes)} / ${mib(f.ramAllocated)}`, kib(f.stateBytes),
        f.remakeMs.map(ms).join(', '), `${f.bootMs.map(ms).join(', ')} / ${f.saveMs.map(ms).join(', ')}`,
        `${ms(f.rawCopyMs)} (${mib(f.ramBytes)}, ${mib(f.rawAllocated)})`, `${ms(f.sparseCopyMs)} (${mib(f.sparseAllocated)})`, f.installMs.toFixed(1),
        f.cloneFromCopyServes ? ms(f.cloneFromCopyMs) : `failed${f.cloneFromCopyError !== '' ? `: ${f.cloneFromCopyError}` : ' (no answer)'}`, ms(f.cloneFromRemakeMs)
      ])), '',
    'A copy is usable here because the nodes share one kernel cache, the same QEMU and the same image digest under the same store layout; the record (template.json) names the source node\'s absolute paths and must be rewritten. The clone wakes with the template\'s address and MAC from the source node\'s subnet until it takes its own identity.', '')
}

async function main (): Promise<void> {
  const lab = await startClusterLab({ nodes: 3, name: 'uigbench' })
  const b = new Bench(lab)
  const emit: Emit = (...lines) => { process.stdout.write(lines.join('\n') + '\n') }
  /** A figure that fails is said so, and the others still run. */
  const figure = async (n: string, title: string, work: (b: Bench, emit: Emit) => Promise<void>): Promise<void> => {
    if (!FIGURES.has(n)) return
    try { await work(b, emit) } catch (err) { emit(`## ${title}`, '', `FAILED: ${err instanceof Error ? err.message : String(err)}`, '') }
  }
  try {
    progress('building hello' + (WITH_NODE_HTTP ? ' and node-http' : '') + ' on n1 (copied to n2, n3 by file)')
    const env = { ...process.env, UIGNITER_DATA_DIR: lab.node(1).dataDir }
    const builder = new ImageBuilder(new ImageStore(lab.node(1).dataDir), createKernelSource(loadConfig(env)))
    await builder.build(JSON.parse(await readFile(exampleSpec('hello'), 'utf8')), join(packageRoot, 'examples', 'hello'))
    if (WITH_NODE_HTTP) await builder.build(JSON.parse(await readFile(exampleSpec('node-http'), 'utf8')), join(packageRoot, 'examples', 'node-http'))
    for (const i of [2, 3]) execFileSync('cp', ['-a', join(lab.node(1).dataDir, 'images'), join(lab.node(i).dataDir, 'images')])
    progress('starting three daemons')
    await Promise.all([1, 2, 3].map(async (i) => { await b.daemons.start(i) }))
    await b.readyNodes(1)
    await b.recorder.start()

    const leader = await b.leader()
    progress(`service ${SERVICE}: hello, clone, min 3, spread`)
    await applyService(b, leader, 3)
    await until('3 healthy replicas', async () => { const s = await b.service(leader); return healthy(s).length >= 3 ? s : undefined }, 240_000)
    await b.recorder.quiet(2000, 90_000)
    await figure('1', 'Failover', reportFailover)
    await figure('2', 'etcd writes per VM start', reportWrites)
    await figure('3', 'Bytes per node heartbeat', reportHeartbeat)
    await figure('4', 'Clone templates per node', reportTemplates)
  } finally {
    await b.recorder.close().catch(() => {})
    await b.daemons.stopAll().catch(() => {})
    await discardTemplates(lab).catch(() => {})
    if (values['keep-logs'] !== undefined) execFileSync('cp', ['-a', join(lab.dir, 'logs'), values['keep-logs']])
    await lab.close()
  }
}

main().then(() => process.exit(0), (err: unknown) => {
  process.stderr.write(`bench failed: ${err instanceof Error ? err.stack ?? err.message : String(err)}\n`)
  process.exit(1)
})
