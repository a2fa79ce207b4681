/**
 * Start paths benchmark (issues 4 and 11), through a real daemon on its own
 * bridge, in one run, with every figure against its target:
 *   - start-to-serving (API call → GET http://<vm ip>:8080/ answers 200), p50
 *     and p99, for hello and node-http: a cold boot, a clone (POST /v1/vms
 *     {template}) and a claim from a clone pool; the clone's and the claim's
 *     ratio against the cold boot of the same run (targets: a node-http clone
 *     25× sooner than its cold boot, a hello clone 20×; a claim within 5 ms);
 *   - the identity step of a clone, the guest init's own time and the host's,
 *     p50 at rest (the clones above, one at a time) and with 20 clones of
 *     hello started at once (targets: 10 ms and 50 ms in the guest);
 *   - density (bench/density.ts): clones of hello up to 1,000 alive, with the
 *     creation rate, the host's CPU per start, the CPU per idle clone and the
 *     memory per clone every 100, the sustained creation rate with 500 alive
 *     (target 20/s) and the memory per idle clone (target 18 MiB).
 * Sizes: --n (samples per path), --images, --concurrent (the identity burst),
 * --all-pools (also prespawned and booted pools), --skip-density; the density
 * run's from UIGNITER_BENCH_DENSITY* (see densityOptionsFromEnv), e.g.
 * UIGNITER_BENCH_DENSITY=200 for a quick run.
 * Progress goes to stderr, results (markdown) to stdout.
 *   node dist/bench/start-paths.js [--n 5] [--images hello,node-http] [--concurrent 20] [--all-pools] [--skip-density] [--skip-boot-phases]
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
import { BOOT_TARGET_MS, formatBootPhases, measureBootPhases, type BootPhases } from './boot-phases.js'
import { benchDensity, densityMarkdown, densityOptionsFromEnv, densityTargets, type DensityResult } from './density.js'
import { mapLimit, percentile, untilServing } from './lib/measure.js'

const { values } = parseArgs({
  options: {
    n: { type: 'string', default: '5' },
    images: { type: 'string', default: 'hello,node-http' },
    concurrent: { type: 'string', default: '20' },
    'all-pools': { type: 'boolean', default: false },
    'skip-density': { type: 'boolean', default: false },
    'skip-boot-phases': { type: 'boolean', default: false }
  }
})
const positive = (flag: string, text: string): number => {
  const v = Number(text)
  if (!Number.isInteger(v) || v < 1) throw new Error(`--${flag} takes a whole number ≥ 1, not "${text}"`)
  return v
}
const n = positive('n', values.n)
const concurrent = positive('concurrent', values.concurrent)
const images = values.images.split(',').map((s) => s.trim()).filter((s) => s !== '')
const known = ['hello', 'node-http']
for (const image of images) if (!known.includes(image)) throw new Error(`--images: "${image}" is not one of ${known.join(', ')}`)
const densityOptions = densityOptionsFromEnv()

/** Issue 11's targets. */
const TARGETS = {
  cloneVsCold: { 'node-http': 25, hello: 20 } as Record<string, number>,
  claimMs: 5,
  identityAtRestMs: 10,
  identityConcurrentMs: 50
}

const PORT = 8080
type PoolKind = 'prespawned' | 'booted' | 'clone'

const began = performance.now()
const progress = (msg: string): void => { process.stderr.write(`[${((performance.now() - began) / 1000).toFixed(0).padStart(4)} s] ${msg}\n`) }
const sleep = async (ms: number): Promise<void> => await new Promise((resolve) => setTimeout(resolve, ms))
const message = (err: unknown): string => (err instanceof Error ? err.message : String(err)).split('\n')[0] ?? ''
const ms = (x: number): string => Number.isNaN(x) ? '—' : x < 100 ? x.toFixed(1) : x.toFixed(0)
const ratio = (a: number, b: number): string => Number.isNaN(a / b) ? '—' : `${(a / b).toFixed(1)}×`

/** One start path's samples; for clones, the identity step as the host and as the guest timed it. */
interface Series { serve: number[], api: number[], identityMs: number[], identityGuestMs: number[], error?: string }
const emptySeries = (): Series => ({ serve: [], api: [], identityMs: [], identityGuestMs: [] })

interface ImageResult {
  image: string
  cold: Series
  clone: Series
  pools: Record<PoolKind, Series>
  template?: { ms: number, info: TemplateInfo }
  templateError?: string
}

const ctx = await createTestContext()
// A /21: the density run's clones, the pools' and the templates' addresses.
const daemon = await DaemonProcess.create(ctx.dataDir, { UIGNITER_SUBNET: '10.246.0.0/21', UIGNITER_LOG_LEVEL: 'warn' })
const api = daemon.api
const pools = new Set<string>()
const templates = new Map<string, string>()

async function removeVm (id: string): Promise<void> {
  await api.call('DELETE', `/v1/vms/${id}?force=true`)
}

/** The identity step of a clone, from its recorded start: the host's time and the guest's own. */
function identityOf (vm: Vm, into: Series): void {
  const step = vm.startTimings?.steps.find((s) => s.name === 'identity')
  if (step === undefined) return
  into.identityMs.push(step.ms)
  if (step.guestMs !== undefined) into.identityGuestMs.push(step.guestMs)
}

/** Starts a VM through POST /v1/vms and waits until its app answers. */
async function startVm (body: Record<string, unknown>): Promise<{ vm: Vm, apiMs: number, serveMs: number }> {
  const t0 = performance.now()
  const vm = await api.call<Vm>('POST', '/v1/vms', body)
  const apiMs = performance.now() - t0
  if (vm.ipAddress === null) throw new Error(`VM ${vm.id} has no address`)
  try {
    await untilServing(vm.ipAddress, PORT, 120_000)
  } catch (err) {
    await removeVm(vm.id).catch(() => {})
    throw err
  }
  return { vm, apiMs, serveMs: performance.now() - t0 }
}

/** n VMs started one after another, kept alive until the series ends (so that each start sees the same number of its kind), then deleted. */
async function startSeries (label: string, body: Record<string, unknown>): Promise<Series> {
  const series = emptySeries()
  const vms: Vm[] = []
  try {
    for (let i = 0; i < n; i++) {
      const r = await startVm(body)
      vms.push(r.vm)
      series.serve.push(r.serveMs)
      series.api.push(r.apiMs)
      identityOf(r.vm, series)
      progress(`${label} ${i + 1}/${n}: serving after ${ms(r.serveMs)} ms (API ${ms(r.apiMs)} ms)`)
    }
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

/** A pool of the kind, filled to n; n claims one after another (claim → serving), each released and the pool refilled in between. */
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
      if (claim.vm.ipAddress === null) throw new Error(`claimed VM ${claim.vm.id} has no address`)
      await untilServing(claim.vm.ipAddress, PORT, 120_000)
      const serveMs = performance.now() - t0
      series.serve.push(serveMs)
      series.api.push(apiMs)
      progress(`pool ${name} claim ${i + 1}/${n}: serving after ${ms(serveMs)} ms (API ${ms(apiMs)} ms, path ${claim.path})`)
      await api.call('POST', `/v1/pools/${name}/release`, { vm: claim.vm.id })
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
  progress(`template ${name}: ready in ${ms(took)} ms`)
  return { name, ms: took, info }
}

async function benchImage (image: string): Promise<ImageResult> {
  const result: ImageResult = {
    image,
    cold: emptySeries(),
    clone: emptySeries(),
    pools: { prespawned: emptySeries(), booted: emptySeries(), clone: emptySeries() }
  }
  result.cold = await startSeries(`${image} cold`, { image })
  if (values['all-pools']) {
    result.pools.prespawned = await poolSeries('prespawned', image, { image })
    result.pools.booted = await poolSeries('booted', image, { image })
  }
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

/** `count` clones of the template requested at once; each one's identity step, and how long until every one served. */
async function identityBurst (template: string, count: number): Promise<Series & { allServingMs: number }> {
  const series = { ...emptySeries(), allServingMs: NaN }
  const vms: Vm[] = []
  const t0 = performance.now()
  try {
    const started = await Promise.allSettled(Array.from({ length: count }, async () => await startVm({ template })))
    series.allServingMs = performance.now() - t0
    for (const s of started) {
      if (s.status === 'fulfilled') {
        vms.push(s.value.vm)
        series.serve.push(s.value.serveMs)
        identityOf(s.value.vm, series)
      } else series.error ??= message(s.reason)
    }
  } finally {
    await mapLimit(vms, 8, async (vm) => { await removeVm(vm.id) })
  }
  return series
}

/** Everything this run made goes: pools, VMs, templates; then the daemon and its bridge. */
async function cleanUp (): Promise<void> {
  for (const name of pools) await api.call('DELETE', `/v1/pools/${name}`).catch(() => {})
  await daemon.removeEverything()
  await ctx.cleanup()
}

// ---------------------------------------------------------------- the run

const results: ImageResult[] = []
let burst: (Series & { allServingMs: number }) | undefined
let dens: DensityResult | undefined
let densityError: string | undefined
let accel = '?'
try {
  const clkTck = Number((await run('getconf', ['CLK_TCK'])).stdout.trim()) || 100
  for (const image of new Set([...images, 'hello'])) {
    progress(`building image ${image}`)
    await ctx.builder.build(JSON.parse(await readFile(exampleSpec(image), 'utf8')), join(packageRoot, 'examples', image))
  }
  await daemon.start()
  const info = await api.call<{ accel: { accel: string, reason: string } }>('GET', '/v1/info')
  accel = `${info.accel.accel} (${info.accel.reason})`
  progress(`daemon up, accelerator ${accel}`)

  for (const image of images) results.push(await benchImage(image))

  let helloTemplate = templates.get('hello')
  if (helloTemplate === undefined) helloTemplate = await ensureTemplate('hello').then((t) => t.name, (err: unknown) => { progress(`template of hello failed: ${message(err)}`); return undefined })
  if (helloTemplate !== undefined) {
    progress(`identity: ${concurrent} clones of hello at once`)
    burst = await identityBurst(helloTemplate, concurrent)
    progress(`identity: ${burst.serve.length} of ${concurrent} served, all after ${ms(burst.allServingMs)} ms; guest p50 ${ms(percentile(burst.identityGuestMs, 50))} ms`)
    if (!values['skip-density']) {
      dens = await benchDensity(api, { ...densityOptions, template: helloTemplate, daemonPid: daemon.pid ?? 0, clkTck, port: PORT, progress })
        .catch((err: unknown) => { densityError = message(err); progress(`density failed: ${densityError}`); return undefined })
    }
  }
} finally {
  progress('cleaning up')
  await cleanUp()
  progress(`done in ${((performance.now() - began) / 1000).toFixed(0)} s`)
}

// Last, with the daemon and its clones gone from the host: cold boots one after another, phase by phase.
let phases: BootPhases | undefined
let phasesError: string | undefined
if (!values['skip-boot-phases']) {
  progress('boot phases: cold boots of hello, outside the daemon')
  phases = await measureBootPhases({ runs: 5, progress }).catch((err: unknown) => { phasesError = message(err); progress(`boot phases failed: ${phasesError}`); return undefined })
}

// ---------------------------------------------------------------- the report

const out: string[] = []
const say = (line = ''): void => { out.push(line) }
const verdict = (ok: boolean | undefined): string => ok === undefined ? 'not measured' : ok ? 'yes' : 'NO'
const targets: Array<[string, string, boolean | undefined]> = []

say('# Start paths: cold boot, clones, clone pools, identity, density (issues 4 and 11)\n')
say(`${cpus().length} cores, ${(totalmem() / 2 ** 30).toFixed(1)} GiB; accelerator ${accel}; n = ${n} samples per path, one after another; ` +
  'start-to-serving = from the API call until `GET http://<vm ip>:8080/` answers 200; percentiles are nearest-rank. ' +
  'Other work on the host (other benchmarks, builds) slows every figure: this run does not measure it.\n')

say('## Start to serving\n')
say('| image | path | samples | p50 ms | p99 ms | cold/this p50 | API p50 ms |')
say('|---|---|---:|---:|---:|---:|---:|')
for (const r of results) {
  const c50 = percentile(r.cold.serve, 50)
  const rows: Array<[string, Series]> = [
    ['cold boot (POST /v1/vms {image})', r.cold],
    ['clone (POST /v1/vms {template})', r.clone],
    ['clone pool claim', r.pools.clone],
    ...(values['all-pools'] ? [['prespawned pool claim', r.pools.prespawned], ['booted pool claim', r.pools.booted]] as Array<[string, Series]> : [])
  ]
  for (const [label, s] of rows) {
    const p50 = percentile(s.serve, 50)
    say(`| ${r.image} | ${label} | ${s.serve.length} | ${ms(p50)} | ${ms(percentile(s.serve, 99))} | ${s === r.cold ? '1.0×' : ratio(c50, p50)} | ${ms(percentile(s.api, 50))} |${s.error !== undefined ? ` failed: ${s.error}` : ''}`)
  }
  const want = TARGETS.cloneVsCold[r.image]
  const got = c50 / percentile(r.clone.serve, 50)
  if (want !== undefined) targets.push([`${r.image} clone serves ≥ ${want}× sooner than its cold boot (p50)`, Number.isNaN(got) ? '—' : `${got.toFixed(1)}× (${ms(c50)} / ${ms(percentile(r.clone.serve, 50))} ms)`, Number.isNaN(got) ? undefined : got >= want])
  const claim = percentile(r.pools.clone.serve, 50)
  targets.push([`${r.image} clone pool claim serves within ${TARGETS.claimMs} ms (p50)`, `${ms(claim)} ms`, Number.isNaN(claim) ? undefined : claim <= TARGETS.claimMs])
}
say('\nTemplates (`ready: app`): ' + results.map((r) => r.template !== undefined ? `${r.image} ${ms(r.template.ms)} ms` : `${r.image} failed: ${r.templateError ?? '?'}`).join(', ') + '.')

say('\n## The identity step of a clone\n')
say('The guest init\'s own time for the step (its `took_us`: checks, RNG reseed, clock, hostname, MAC and address with the link up), and the step as the host timed it (connect, request, reply).\n')
say('| when | clones | guest p50 ms | guest p99 ms | host p50 ms | host p99 ms |')
say('|---|---:|---:|---:|---:|---:|')
const atRest: Series = emptySeries()
for (const r of results) {
  say(`| at rest, ${r.image} clones one at a time | ${r.clone.identityMs.length} | ${ms(percentile(r.clone.identityGuestMs, 50))} | ${ms(percentile(r.clone.identityGuestMs, 99))} | ${ms(percentile(r.clone.identityMs, 50))} | ${ms(percentile(r.clone.identityMs, 99))} |`)
  atRest.identityGuestMs.push(...r.clone.identityGuestMs)
}
if (burst !== undefined) {
  say(`| ${concurrent} hello clones started at once | ${burst.identityMs.length} | ${ms(percentile(burst.identityGuestMs, 50))} | ${ms(percentile(burst.identityGuestMs, 99))} | ${ms(percentile(burst.identityMs, 50))} | ${ms(percentile(burst.identityMs, 99))} |`)
  say(`\nThe ${concurrent} at once: all served ${ms(burst.allServingMs)} ms after the first request${burst.error !== undefined ? `; failed: ${burst.error}` : ''}.`)
}
const guestTimes = [...atRest.identityGuestMs, ...(burst?.identityGuestMs ?? [])]
if (guestTimes.length > 0 && guestTimes.every((x) => Math.abs(x / 10 - Math.round(x / 10)) < 1e-6)) {
  say('\nEvery guest time is a multiple of 10 ms: the guest kept time with the 10 ms jiffy (its TSC was not used), so these figures are that coarse.')
}
const restP50 = percentile(atRest.identityGuestMs, 50)
const burstP50 = percentile(burst?.identityGuestMs ?? [], 50)
targets.push([`identity step ≤ ${TARGETS.identityAtRestMs} ms p50 in the guest, at rest`, `${ms(restP50)} ms`, Number.isNaN(restP50) ? undefined : restP50 <= TARGETS.identityAtRestMs])
targets.push([`identity step ≤ ${TARGETS.identityConcurrentMs} ms p50 in the guest, ${concurrent} clones at once`, `${ms(burstP50)} ms`, Number.isNaN(burstP50) ? undefined : burstP50 <= TARGETS.identityConcurrentMs && concurrent >= 20])

say('\n## Density: live clones of hello\n')
if (dens !== undefined) say(densityMarkdown(dens, densityOptions))
else say(values['skip-density'] ? 'skipped (--skip-density)' : `not measured${densityError !== undefined ? `: ${densityError}` : ' (no hello template)'}`)
targets.push(...densityTargets(dens))

say('\n## Cold boot of hello, phase by phase\n')
if (phases !== undefined) say(formatBootPhases(phases))
else say(values['skip-boot-phases'] ? 'skipped (--skip-boot-phases)' : `not measured${phasesError !== undefined ? `: ${phasesError}` : ''}`)
targets.push([`cold boot of hello serves within ${BOOT_TARGET_MS} ms (p50)`, phases !== undefined ? `${Math.round(phases.p50.servingMs)} ms` : '—', phases?.met])

say('\n## Targets (issue 11)\n')
say('| target | figure | met |')
say('|---|---|---|')
for (const [target, figure, met] of targets) say(`| ${target} | ${figure} | ${verdict(met)} |`)

console.log(out.join('\n'))
