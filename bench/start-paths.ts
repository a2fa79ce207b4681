/**
 * Start paths benchmark (issue 4), through a real daemon on its own bridge, in
 * one run, for the hello and node-http images:
 *   - start-to-serving (API call → GET http://<vm ip>:8080/ answers 200), p50
 *     and p99, for a cold boot, a claim from a prespawned and from a booted
 *     pool, a clone (POST /v1/vms {template}) and a claim from a clone pool,
 *     with the ratios against the cold boot of the same run;
 *   - the claim's API round trip;
 *   - PSS per instance for booted VMs and for clones (n of each alive), and
 *     their ratio;
 * then, with hello: host CPU per idle VM over a window (clones, and booted
 * VMs for comparison), and the largest number of live clones within a time
 * and memory budget.
 * Progress goes to stderr, results (markdown) to stdout.
 *   node dist/bench/start-paths.js [--n 5] [--images hello,node-http]
 *     [--max-clones 300] [--budget-s 600] [--density-concurrency 2] [--skip-density]
 *     [--idle-vms 10] [--idle-s 20]
 */
import { readFile } from 'node:fs/promises'
import { cpus, totalmem } from 'node:os'
import { join } from 'node:path'
import { parseArgs } from 'node:util'
import { run } from '../src/core/exec.js'
import type { ClaimResult, PoolStatus } from '../src/core/pool.js'
import type { TemplateInfo } from '../src/core/template.js'
import type { Vm } from '../src/core/vm.js'
import { DaemonProcess } from '../test/helpers/daemon-process.js'
import { createTestContext, exampleSpec, packageRoot } from '../test/helpers/fixtures.js'
import { cpuTicks, hostCpuTicks, httpStatus, mapLimit, memAvailableKiB, memoryKiB, percentile, untilServing } from './lib/measure.js'

const { values } = parseArgs({
  options: {
    n: { type: 'string', default: '5' },
    images: { type: 'string', default: 'hello,node-http' },
    'max-clones': { type: 'string', default: '300' },
    'budget-s': { type: 'string', default: '600' },
    'density-concurrency': { type: 'string', default: '2' },
    'skip-density': { type: 'boolean', default: false },
    'idle-vms': { type: 'string', default: '10' },
    'idle-s': { type: 'string', default: '20' }
  }
})
const positive = (flag: string, text: string): number => {
  const v = Number(text)
  if (!Number.isInteger(v) || v < 1) throw new Error(`--${flag} takes a whole number ≥ 1, not "${text}"`)
  return v
}
const n = positive('n', values.n)
const maxClones = positive('max-clones', values['max-clones'])
const budgetS = positive('budget-s', values['budget-s'])
const densityConcurrency = positive('density-concurrency', values['density-concurrency'])
const idleVms = positive('idle-vms', values['idle-vms'])
const idleS = positive('idle-s', values['idle-s'])
const images = values.images.split(',').map((s) => s.trim()).filter((s) => s !== '')
const known = ['hello', 'node-http']
for (const image of images) if (!known.includes(image)) throw new Error(`--images: "${image}" is not one of ${known.join(', ')}`)

const PORT = 8080
const MEM_FLOOR_KIB = 3 * 1024 * 1024
/** Density stops at this many failed clone starts (a saturated host fails identity handshakes); failed ones are deleted and do not count. */
const DENSITY_MAX_FAILURES = 10
const POOL_KINDS = ['prespawned', 'booted', 'clone'] as const
type PoolKind = typeof POOL_KINDS[number]

const began = performance.now()
const progress = (msg: string): void => { process.stderr.write(`[${((performance.now() - began) / 1000).toFixed(0).padStart(4)} s] ${msg}\n`) }
const sleep = async (ms: number): Promise<void> => await new Promise((resolve) => setTimeout(resolve, ms))
const message = (err: unknown): string => (err instanceof Error ? err.message : String(err)).split('\n')[0] ?? ''
const ms = (x: number): string => Number.isNaN(x) ? '—' : x < 100 ? x.toFixed(1) : x.toFixed(0)
const mib = (kib: number): string => Number.isNaN(kib) ? '—' : (kib / 1024).toFixed(1)
const ratio = (a: number, b: number): string => Number.isNaN(a / b) ? '—' : `${(a / b).toFixed(1)}×`
const counts = (xs: string[]): string => [...new Set(xs)].map((x) => `${x}×${xs.filter((y) => y === x).length}`).join(' ') || '—'

/** One start path's samples. */
interface Series { serve: number[], api: number[], paths: string[], pss: number[], rss: number[], error?: string }
const emptySeries = (): Series => ({ serve: [], api: [], paths: [], pss: [], rss: [] })

interface ImageResult {
  image: string
  cold: Series
  clone: Series
  pools: Record<PoolKind, Series>
  template?: { ms: number, info: TemplateInfo }
  templateError?: string
}

const ctx = await createTestContext()
const daemon = await DaemonProcess.create(ctx.dataDir, { UIGNITER_SUBNET: '10.246.0.0/22', UIGNITER_LOG_LEVEL: 'warn' })
const api = daemon.api
/** What this run made and has not removed yet, for the clean-up. */
const live = new Set<string>()
const pools = new Set<string>()
const templates = new Map<string, string>()
/** Every QEMU pid seen, to make sure none outlives the run. */
const pidsSeen = new Set<number>()

function track (vm: Vm): void {
  live.add(vm.id)
  if (vm.pid !== null) pidsSeen.add(vm.pid)
}

async function removeVm (id: string): Promise<void> {
  await api.call('DELETE', `/v1/vms/${id}?force=true`)
  live.delete(id)
}

/** Starts a VM through POST /v1/vms and waits until its app answers. */
async function startVm (body: Record<string, unknown>): Promise<{ vm: Vm, apiMs: number, serveMs: number }> {
  const t0 = performance.now()
  const vm = await api.call<Vm>('POST', '/v1/vms', body)
  const apiMs = performance.now() - t0
  track(vm)
  if (vm.ipAddress === null) throw new Error(`VM ${vm.id} has no address`)
  try {
    await untilServing(vm.ipAddress, PORT, 120_000)
  } catch (err) {
    const why = `${message(err)}; ${await diagnose(vm)}`
    await removeVm(vm.id).catch(() => {})
    throw new Error(why)
  }
  return { vm, apiMs, serveMs: performance.now() - t0 }
}

/** What the daemon and the host say of a VM that does not serve: its state, who else has its address, the host's neighbour entry, its console's end. */
async function diagnose (vm: Vm): Promise<string> {
  const now = await api.call<Vm>('GET', `/v1/vms/${vm.id}`).catch(() => undefined)
  const all = await api.call<Vm[]>('GET', '/v1/vms').catch(() => [] as Vm[])
  const sharing = all.filter((o) => o.id !== vm.id && o.ipAddress === vm.ipAddress).map((o) => `${o.id} (${o.state}, ${o.startPath}, pool ${o.pool?.name ?? '-'})`)
  const neigh = await run('ip', ['neigh', 'show', 'to', vm.ipAddress ?? '', 'dev', daemon.env.UIGNITER_BRIDGE ?? '']).then((r) => r.stdout.trim(), () => '?')
  const log = await api.call<string>('GET', `/v1/vms/${vm.id}/logs?tail=400`).catch(() => '')
  return `VM ${vm.id} is ${now?.state ?? 'gone'}, MAC ${vm.macAddress ?? '-'}; other live VMs with ${vm.ipAddress ?? '-'}: ${sharing.join(', ') || 'none'}; ` +
    `host neighbour entry: ${neigh || 'none'}; console ends: ${JSON.stringify(log.slice(-400))}`
}

/** PSS and RSS of each VM's QEMU process, into the series. */
async function measureMemory (series: Series, vms: Vm[]): Promise<void> {
  for (const vm of vms) {
    if (vm.pid === null) continue
    const m = await memoryKiB(vm.pid)
    series.pss.push(m.pss)
    series.rss.push(m.rss)
  }
}

/**
 * n VMs started one after another and kept alive (so that booted VMs and
 * clones are measured with the same number of their kind alive), then their
 * memory, then they go.
 */
async function startSeries (label: string, body: Record<string, unknown>): Promise<Series> {
  const series = emptySeries()
  const vms: Vm[] = []
  try {
    for (let i = 0; i < n; i++) {
      const r = await startVm(body)
      vms.push(r.vm)
      series.serve.push(r.serveMs)
      series.api.push(r.apiMs)
      series.paths.push(r.vm.startPath)
      progress(`${label} ${i + 1}/${n}: serving after ${ms(r.serveMs)} ms (API ${ms(r.apiMs)} ms, path ${r.vm.startPath})`)
    }
    await sleep(2000)
    await measureMemory(series, vms)
  } catch (err) {
    series.error = message(err)
    progress(`${label} failed: ${series.error}`)
  } finally {
    await mapLimit(vms, 4, async (vm) => { await removeVm(vm.id) })
  }
  return series
}

async function waitPoolFull (name: string, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs
  let last = ''
  for (;;) {
    const p = await api.call<PoolStatus>('GET', `/v1/pools/${name}`)
    if (p.ready >= n && p.creating === 0) return
    const now = `ready ${p.ready}/${n}, creating ${p.creating}, failures ${p.failures}`
    if (now !== last) { progress(`pool ${name}: ${now}`); last = now }
    if (Date.now() > deadline) throw new Error(`pool ${name} did not fill within ${timeoutMs / 1000} s (${now})`)
    await sleep(100)
  }
}

/** A pool of the kind, filled to n; n claims one after another, each released and the pool refilled in between. */
async function poolSeries (kind: PoolKind, image: string, source: Record<string, string>): Promise<Series> {
  const series = emptySeries()
  const name = `bench-${kind}-${image}`
  try {
    await api.call('POST', '/v1/pools', { name, kind, ...source, min: n, max: 2 * n + 2, onRelease: 'destroy', refillConcurrency: 2 })
    pools.add(name)
    await waitPoolFull(name, 900_000)
    for (let i = 0; i < n; i++) {
      const t0 = performance.now()
      const claim = await api.call<ClaimResult>('POST', `/v1/pools/${name}/claim`)
      const apiMs = performance.now() - t0
      track(claim.vm)
      if (claim.vm.ipAddress === null) throw new Error(`claimed VM ${claim.vm.id} has no address`)
      await untilServing(claim.vm.ipAddress, PORT, 120_000).catch(async (err: unknown) => { throw new Error(`${message(err)}; ${await diagnose(claim.vm)}`) })
      const serveMs = performance.now() - t0
      series.serve.push(serveMs)
      series.api.push(apiMs)
      series.paths.push(claim.path)
      progress(`pool ${name} claim ${i + 1}/${n}: serving after ${ms(serveMs)} ms (API ${ms(apiMs)} ms, path ${claim.path})`)
      await api.call('POST', `/v1/pools/${name}/release`, { vm: claim.vm.id })
      live.delete(claim.vm.id)
      await waitPoolFull(name, 900_000)
    }
  } catch (err) {
    series.error = message(err)
    progress(`pool ${name} failed: ${series.error}`)
  } finally {
    if (pools.has(name)) {
      await api.call('DELETE', `/v1/pools/${name}`).catch((err: unknown) => progress(`deleting pool ${name}: ${message(err)}`))
      pools.delete(name)
    }
  }
  return series
}

/** The image's `ready: app` template, made once. */
async function ensureTemplate (image: string): Promise<{ name: string, ms: number, info: TemplateInfo }> {
  const name = `${image}-app`
  const t0 = performance.now()
  progress(`template ${name}: creating`)
  const info = await api.call<TemplateInfo>('POST', '/v1/templates', { name, image, ready: 'app', port: PORT })
  templates.set(image, name)
  const took = performance.now() - t0
  progress(`template ${name}: ready in ${ms(took)} ms (${JSON.stringify(info.timings)})`)
  return { name, ms: took, info }
}

async function removeTemplate (image: string): Promise<void> {
  const name = templates.get(image)
  if (name === undefined) return
  await api.call('DELETE', `/v1/templates/${name}`)
  templates.delete(image)
}

async function benchImage (image: string): Promise<ImageResult> {
  const result: ImageResult = {
    image,
    cold: emptySeries(),
    clone: emptySeries(),
    pools: { prespawned: emptySeries(), booted: emptySeries(), clone: emptySeries() }
  }
  result.cold = await startSeries(`${image} cold`, { image })
  result.pools.prespawned = await poolSeries('prespawned', image, { image })
  result.pools.booted = await poolSeries('booted', image, { image })
  let template: string | undefined
  try {
    const t = await ensureTemplate(image)
    template = t.name
    result.template = { ms: t.ms, info: t.info }
  } catch (err) {
    result.templateError = message(err)
    progress(`template of ${image} failed: ${result.templateError}`)
  }
  if (template !== undefined) {
    result.clone = await startSeries(`${image} clone`, { template })
    result.pools.clone = await poolSeries('clone', image, { template })
  } else {
    result.clone.error = result.pools.clone.error = `no template: ${result.templateError ?? ''}`
  }
  return result
}

interface IdleResult { label: string, vms: number, windowS: number, perVmPct: number[], totalPct: number, error?: string }

/** idleVms VMs (clones or booted ones), serving and settled, then their QEMU processes' CPU time over the window. */
async function idleCpu (label: string, body: Record<string, unknown>, clkTck: number): Promise<IdleResult> {
  const result: IdleResult = { label, vms: 0, windowS: 0, perVmPct: [], totalPct: NaN }
  const vms: Vm[] = []
  try {
    for (let i = 0; i < idleVms; i++) vms.push((await startVm(body)).vm)
    progress(`idle: ${vms.length} ${label} serving; settling 5 s, then a ${idleS} s window`)
    await sleep(5000)
    const pids = vms.map((vm) => vm.pid ?? 0)
    const before = await Promise.all(pids.map(cpuTicks))
    const t0 = performance.now()
    await sleep(idleS * 1000)
    const after = await Promise.all(pids.map(cpuTicks))
    result.windowS = (performance.now() - t0) / 1000
    result.vms = vms.length
    result.perVmPct = after.map((a, i) => ((a - (before[i] ?? 0)) / clkTck) / result.windowS * 100)
    result.totalPct = result.perVmPct.reduce((s, x) => s + x, 0)
  } catch (err) {
    result.error = message(err)
    progress(`idle failed: ${result.error}`)
  } finally {
    await mapLimit(vms, 4, async (vm) => { await removeVm(vm.id) })
  }
  return result
}

interface DensityResult {
  started: number
  failures: string[]
  serving: number
  running: number
  /** What the API says of the clones that are not running, right after the fill and after the HTTP probes. */
  notRunning: string[]
  /** Clones whose QEMU process was gone when their memory was read. */
  gone: number
  /** Over a window with every clone idle: the host's busy CPU, the clones' QEMU processes', the daemon's, in % of one core. */
  atScale?: { windowS: number, clones: number, hostPct: number, clonesPct: number, daemonPct: number, cores: number }
  stop: string
  fillS: number
  memBeforeKiB: number
  memAfterKiB: number
  serve: number[]
  pssKiB: number[]
  deleteS: number
  error?: string
}

/**
 * Clones of hello, --density-concurrency at a time, until --max-clones,
 * --budget-s, MemAvailable under 3 GiB, or the tenth failed start; then how
 * many of them are running and answer HTTP, their memory, and the time to
 * delete them all. A clone that failed is deleted at once.
 */
async function density (template: string): Promise<DensityResult> {
  const result: DensityResult = { started: 0, failures: [], serving: 0, running: 0, notRunning: [], gone: 0, stop: '', fillS: NaN, memBeforeKiB: await memAvailableKiB(), memAfterKiB: NaN, serve: [], pssKiB: [], deleteS: NaN }
  const vms: Vm[] = []
  const t0 = performance.now()
  const deadline = t0 + budgetS * 1000
  let stop: string | undefined
  let inFlight = 0
  const worker = async (): Promise<void> => {
    while (stop === undefined) {
      const avail = await memAvailableKiB()
      if (avail < MEM_FLOOR_KIB) { stop ??= `MemAvailable ${mib(avail)} MiB < 3 GiB`; break }
      if (performance.now() > deadline) { stop ??= `--budget-s ${budgetS} spent`; break }
      // Failed starts are deleted: only the clones that serve count towards --max-clones.
      if (vms.length >= maxClones) { stop ??= `--max-clones ${maxClones} reached`; break }
      if (vms.length + inFlight >= maxClones) { await sleep(100); continue }
      result.started++
      inFlight++
      try {
        const r = await startVm({ template })
        vms.push(r.vm)
        result.serve.push(r.serveMs)
        if (vms.length % 25 === 0) progress(`density: ${vms.length} clones serving, MemAvailable ${mib(await memAvailableKiB())} MiB, last start ${ms(r.serveMs)} ms`)
      } catch (err) {
        result.failures.push(message(err))
        progress(`density: clone start ${result.started} failed: ${message(err)}`)
        if (result.failures.length >= DENSITY_MAX_FAILURES) stop ??= `${DENSITY_MAX_FAILURES} clone starts failed`
      } finally {
        inFlight--
      }
    }
  }
  try {
    await Promise.all(Array.from({ length: densityConcurrency }, worker))
    result.stop = stop ?? ''
    result.fillS = (performance.now() - t0) / 1000
    progress(`density: stopped (${result.stop}) with ${vms.length} clones after ${result.fillS.toFixed(0)} s`)
    await sleep(2000)
    result.memAfterKiB = await memAvailableKiB()
    const mine = new Set(vms.map((vm) => vm.id))
    const states = async (when: string): Promise<number> => {
      const listed = (await api.call<Vm[]>('GET', '/v1/vms?all=true')).filter((vm) => mine.has(vm.id))
      const others = listed.filter((vm) => vm.state !== 'running')
      const byState = [...new Set(others.map((vm) => vm.state))].map((st) => {
        const some = others.filter((vm) => vm.state === st)
        const why = some.find((vm) => vm.exit !== null)?.exit
        return `${some.length} ${st}${why !== undefined && why !== null ? ` (e.g. ${why.reason}: ${why.detail})` : ''}`
      })
      const missing = vms.length - listed.length
      result.notRunning.push(`${when}: ${[...byState, ...(missing > 0 ? [`${missing} not listed`] : [])].join(', ') || 'none'}`)
      return listed.length - others.length
    }
    result.running = await states('after the fill')
    result.atScale = await idleAtScale(vms)
    progress(`density: with ${result.atScale.clones} clones idle the host is ${result.atScale.hostPct.toFixed(0)} % of a core busy (clones ${result.atScale.clonesPct.toFixed(0)} %, daemon ${result.atScale.daemonPct.toFixed(1)} %)`)
    const pss = await mapLimit(vms, 16, async (vm) => await memoryKiB(vm.pid ?? 0).then((m) => m.pss, () => NaN))
    result.pssKiB = pss.filter((x) => !Number.isNaN(x))
    result.gone = pss.length - result.pssKiB.length
    const answers = await mapLimit(vms, 16, async (vm) => await httpStatus(vm.ipAddress ?? '', PORT, 10_000))
    const running = await states('after the HTTP probes')
    // An exited clone's address may belong to a newer clone by now: count only those running after the probes.
    const runningNow = new Set((await api.call<Vm[]>('GET', '/v1/vms')).filter((vm) => vm.state === 'running').map((vm) => vm.id))
    result.serving = vms.filter((vm, i) => runningNow.has(vm.id) && answers[i] === 200).length
    progress(`density: ${running} of the clones running after the probes`)
    progress(`density: ${result.running} running, ${result.serving} answering HTTP; not running: ${result.notRunning.join('; ')}`)
  } catch (err) {
    result.error = message(err)
    progress(`density failed: ${result.error}`)
  } finally {
    const d0 = performance.now()
    progress(`density: deleting ${vms.length} clones`)
    await mapLimit(vms, 8, async (vm) => { await removeVm(vm.id) })
    result.deleteS = (performance.now() - d0) / 1000
  }
  return result
}

/** The CPU the host, the clones and the daemon use over 10 s while every clone idles. */
async function idleAtScale (vms: Vm[]): Promise<NonNullable<DensityResult['atScale']>> {
  const pids: number[] = []
  for (const vm of vms) if (vm.pid !== null && await cpuTicks(vm.pid).then(() => true, () => false)) pids.push(vm.pid)
  const sum = async (): Promise<number> => (await Promise.all(pids.map(async (pid) => await cpuTicks(pid).catch(() => 0)))).reduce((a, b) => a + b, 0)
  const daemonPid = daemon.pid ?? 0
  const h0 = await hostCpuTicks()
  const c0 = await sum()
  const d0 = await cpuTicks(daemonPid)
  const t0 = performance.now()
  await sleep(10_000)
  const h1 = await hostCpuTicks()
  const c1 = await sum()
  const d1 = await cpuTicks(daemonPid)
  const windowS = (performance.now() - t0) / 1000
  const cores = cpus().length
  const pctOfCore = (ticks: number): number => ticks / clkTck / windowS * 100
  return {
    windowS,
    clones: pids.length,
    cores,
    // /proc/stat counts every CPU: busy/total is the share of the whole machine.
    hostPct: (h1.busy - h0.busy) / (h1.total - h0.total) * cores * 100,
    clonesPct: pctOfCore(c1 - c0),
    daemonPct: pctOfCore(d1 - d0)
  }
}

/** Everything this run made goes: pools, VMs, templates; then the daemon and its bridge; then any QEMU left over. */
async function cleanUp (): Promise<void> {
  // The daemon is this run's own: whatever it lists, this run made.
  const listedPools = await api.call<PoolStatus[]>('GET', '/v1/pools').catch(() => [] as PoolStatus[])
  for (const name of new Set([...pools, ...listedPools.map((p) => p.spec.name)])) {
    await api.call('DELETE', `/v1/pools/${name}`).catch((err: unknown) => progress(`clean-up: pool ${name}: ${message(err)}`))
  }
  const all = await api.call<Vm[]>('GET', '/v1/vms?all=true').catch(() => [] as Vm[])
  for (const vm of all) if (vm.pid !== null) pidsSeen.add(vm.pid)
  await mapLimit(all, 8, async (vm) => { await removeVm(vm.id).catch((err: unknown) => progress(`clean-up: VM ${vm.id}: ${message(err)}`)) })
  const listedTemplates = await api.call<TemplateInfo[]>('GET', '/v1/templates').catch(() => [] as TemplateInfo[])
  for (const name of new Set([...templates.values(), ...listedTemplates.map((t) => t.name)])) {
    await api.call('DELETE', `/v1/templates/${name}`).catch((err: unknown) => progress(`clean-up: template ${name}: ${message(err)}`))
  }
  await daemon.stop()
  await daemon.removeNetwork()
  for (const pid of pidsSeen) {
    const cmdline = await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '')
    if (cmdline.includes(ctx.dataDir)) {
      progress(`clean-up: QEMU pid ${pid} outlived its deletion; killing it`)
      try { process.kill(pid, 'SIGKILL') } catch { /* gone meanwhile */ }
    }
  }
  await ctx.cleanup()
}

// ---------------------------------------------------------------- the run

const results: ImageResult[] = []
const idle: IdleResult[] = []
let dens: DensityResult | undefined
let accel = '?'
let clkTck = 100
try {
  clkTck = Number((await run('getconf', ['CLK_TCK'])).stdout.trim()) || 100
  for (const image of new Set([...images, 'hello'])) {
    progress(`building image ${image}`)
    await ctx.builder.build(JSON.parse(await readFile(exampleSpec(image), 'utf8')), join(packageRoot, 'examples', image))
  }
  await daemon.start()
  const info = await api.call<{ accel: { accel: string, reason: string } }>('GET', '/v1/info')
  accel = `${info.accel.accel} (${info.accel.reason})`
  progress(`daemon up, accelerator ${accel}`)

  for (const image of images) {
    results.push(await benchImage(image))
    // hello's template serves the idle and density runs; the others go now.
    if (image !== 'hello') await removeTemplate(image).catch((err: unknown) => progress(`deleting template of ${image}: ${message(err)}`))
  }

  let helloTemplate = templates.get('hello')
  if (helloTemplate === undefined && !images.includes('hello')) {
    helloTemplate = await ensureTemplate('hello').then((t) => t.name, (err: unknown) => { progress(`template of hello failed: ${message(err)}`); return undefined })
  }
  if (helloTemplate !== undefined) {
    idle.push(await idleCpu('clones of hello', { template: helloTemplate }, clkTck))
    idle.push(await idleCpu('booted hello VMs', { image: 'hello' }, clkTck))
    if (!values['skip-density']) dens = await density(helloTemplate)
  }
} finally {
  progress('cleaning up')
  await cleanUp()
  progress(`done in ${((performance.now() - began) / 1000).toFixed(0)} s`)
}

// ---------------------------------------------------------------- the report

const out: string[] = []
const say = (line = ''): void => { out.push(line) }
say(`# Start paths: cold boot, warm pools, clones (issue 4)\n`)
say(`${cpus().length} cores, ${(totalmem() / 2 ** 30).toFixed(1)} GiB; accelerator ${accel}; n = ${n} samples per path, one after another; ` +
  'start-to-serving = from the API call until `GET http://<vm ip>:8080/` answers 200; percentiles are nearest-rank.\n')

say('## Start to serving\n')
say('| image | path | samples | p50 ms | p99 ms | cold/this p50 | cold/this p99 | start paths reported |')
say('|---|---|---:|---:|---:|---:|---:|---|')
for (const r of results) {
  const c50 = percentile(r.cold.serve, 50)
  const c99 = percentile(r.cold.serve, 99)
  const rows: Array<[string, Series]> = [
    ['cold boot (POST /v1/vms {image})', r.cold],
    ['pool claim, prespawned', r.pools.prespawned],
    ['pool claim, booted', r.pools.booted],
    ['clone (POST /v1/vms {template})', r.clone],
    ['pool claim, clone', r.pools.clone]
  ]
  for (const [label, s] of rows) {
    const p50 = percentile(s.serve, 50)
    const p99 = percentile(s.serve, 99)
    const isCold = s === r.cold
    say(`| ${r.image} | ${label} | ${s.serve.length} | ${ms(p50)} | ${ms(p99)} | ${isCold ? '1.0×' : ratio(c50, p50)} | ${isCold ? '1.0×' : ratio(c99, p99)} | ${counts(s.paths)}${s.error !== undefined ? ` — failed: ${s.error}` : ''} |`)
  }
}

say('\n## API round trip (until the daemon answers, not until the app serves)\n')
say('| image | call | samples | p50 ms | p99 ms |')
say('|---|---|---:|---:|---:|')
for (const r of results) {
  const rows: Array<[string, Series]> = [
    ...POOL_KINDS.map((kind): [string, Series] => [`POST /v1/pools/NAME/claim, ${kind} pool`, r.pools[kind]]),
    ['POST /v1/vms {image}', r.cold],
    ['POST /v1/vms {template}', r.clone]
  ]
  for (const [label, s] of rows) say(`| ${r.image} | ${label} | ${s.api.length} | ${ms(percentile(s.api, 50))} | ${ms(percentile(s.api, 99))} |`)
}

say(`\n## Memory per instance (PSS of the QEMU process, ${n} of the kind alive)\n`)
say('| image | booted PSS MiB p50 | clone PSS MiB p50 | clone/booted | booted RSS MiB p50 | clone RSS MiB p50 |')
say('|---|---:|---:|---:|---:|---:|')
for (const r of results) {
  const b = percentile(r.cold.pss, 50)
  const c = percentile(r.clone.pss, 50)
  say(`| ${r.image} | ${mib(b)} | ${mib(c)} | ${Number.isNaN(c / b) ? '—' : `${(100 * c / b).toFixed(0)} %`} | ${mib(percentile(r.cold.rss, 50))} | ${mib(percentile(r.clone.rss, 50))} |`)
}

say('\n## Templates (`ready: app`)\n')
say('| image | POST /v1/templates ms | boot to ready ms | save ms | state file bytes |')
say('|---|---:|---:|---:|---:|')
for (const r of results) {
  if (r.template !== undefined) {
    const t = r.template.info
    say(`| ${r.image} | ${ms(r.template.ms)} | ${ms(t.timings.bootMs)} | ${ms(t.timings.saveMs)} | ${t.stateBytes} |`)
  } else {
    say(`| ${r.image} | failed: ${r.templateError ?? '?'} | | | |`)
  }
}

say('\n## Host CPU per idle VM (hello)\n')
if (idle.length === 0) {
  say('not measured (no hello template)')
} else {
  say(`utime+stime of the VMs' QEMU processes over a ${idleS} s window, 5 s after the last of them served (CLK_TCK ${clkTck}); nothing else running:\n`)
  say('| VMs | window s | total % of a core | per VM mean % | per VM p50 % | per VM max % |')
  say('|---|---:|---:|---:|---:|---:|')
  for (const i of idle) {
    if (i.error !== undefined) { say(`| ${idleVms} ${i.label} | failed: ${i.error} | | | | |`); continue }
    say(`| ${i.vms} ${i.label} | ${i.windowS.toFixed(1)} | ${i.totalPct.toFixed(2)} | ${(i.totalPct / i.vms).toFixed(3)} | ${percentile(i.perVmPct, 50).toFixed(3)} | ${Math.max(...i.perVmPct).toFixed(3)} |`)
  }
}

say('\n## Density: live clones of hello\n')
if (dens === undefined) {
  say(values['skip-density'] ? 'skipped (--skip-density)' : 'not measured (no hello template)')
} else {
  const used = dens.memBeforeKiB - dens.memAfterKiB
  say(`Budget: --max-clones ${maxClones}, --budget-s ${budgetS}, stop when MemAvailable < 3 GiB or at the ${DENSITY_MAX_FAILURES}th failed start; ${densityConcurrency} start(s) at a time.\n`)
  say('| clone starts | failed | running (API) | answering HTTP | stopped because | fill time s | MemAvailable before → after MiB | MemAvailable used per clone MiB | PSS per clone MiB p50 | start-to-serving p50 / p99 ms | delete all s |')
  say('|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|')
  say(`| ${dens.started} | ${dens.failures.length} | ${dens.running} | ${dens.serving} | ${dens.stop}${dens.error !== undefined ? `; failed: ${dens.error}` : ''} | ${dens.fillS.toFixed(0)} | ` +
    `${mib(dens.memBeforeKiB)} → ${mib(dens.memAfterKiB)} | ${mib(used / Math.max(1, dens.serving))} | ${mib(percentile(dens.pssKiB, 50))} | ` +
    `${ms(percentile(dens.serve, 50))} / ${ms(percentile(dens.serve, 99))} | ${dens.deleteS.toFixed(0)} |`)
  const a = dens.atScale
  if (a !== undefined) {
    say(`\nWith ${a.clones} clones idle (${a.windowS.toFixed(1)} s window right after the fill): host CPU busy ${a.hostPct.toFixed(0)} % of one core (of ${a.cores * 100} %), ` +
      `the clones' QEMU processes ${a.clonesPct.toFixed(0)} % (${(a.clonesPct / a.clones).toFixed(3)} % each), the daemon ${a.daemonPct.toFixed(1)} %.`)
  }
  say(`\nClones not running according to the API: ${dens.notRunning.join('; ')}. QEMU processes gone when their PSS was read: ${dens.gone}.`)
  if (dens.failures.length > 0) say(`\nFirst failed start: ${dens.failures[0] ?? ''}`)
}

say('\n## Targets (issue 4)\n')
say('| target | figure | met |')
say('|---|---|---|')
const verdict = (ok: boolean | undefined): string => ok === undefined ? 'not measured' : ok ? 'yes' : 'NO'
const nodeHttp = results.find((r) => r.image === 'node-http')
{
  const c = nodeHttp !== undefined ? percentile(nodeHttp.cold.serve, 50) / percentile(nodeHttp.clone.serve, 50) : NaN
  say(`| node-http clone start-to-serving ≥ 10× faster than cold (p50) | ${Number.isNaN(c) ? '—' : `${c.toFixed(1)}×`} | ${verdict(Number.isNaN(c) ? undefined : c >= 10)} |`)
}
for (const r of results) {
  const p = percentile(r.clone.pss, 50) / percentile(r.cold.pss, 50)
  say(`| ${r.image}: clone PSS ≤ 40 % of a booted VM's | ${Number.isNaN(p) ? '—' : `${(100 * p).toFixed(0)} %`} | ${verdict(Number.isNaN(p) ? undefined : p <= 0.4)} |`)
}
for (const kind of POOL_KINDS) {
  const figures = results.map((r) => ({ image: r.image, p50: percentile(r.pools[kind].api, 50) })).filter((f) => !Number.isNaN(f.p50))
  const worst = Math.max(...figures.map((f) => f.p50))
  say(`| pool claim (${kind}) < 10 ms p50 at the API | ${figures.map((f) => `${f.image} ${ms(f.p50)} ms`).join(', ') || '—'} | ${verdict(figures.length === 0 ? undefined : worst < 10)} |`)
}
for (const i of idle.length > 0 ? idle : [undefined]) {
  const per = i !== undefined && i.error === undefined ? i.totalPct / i.vms : NaN
  say(`| idle CPU < 0.5 % of a core per VM${i !== undefined ? ` (${i.label})` : ''} | ${Number.isNaN(per) ? '—' : `${per.toFixed(3)} %`} | ${verdict(Number.isNaN(per) ? undefined : per < 0.5)} |`)
}
say(`| ≥ 300 live clones | ${dens !== undefined ? `${dens.serving} answering HTTP` : '—'} | ${verdict(dens === undefined ? undefined : dens.serving >= 300)} |`)

console.log(out.join('\n'))
