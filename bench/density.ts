/**
 * Density: clones of one template (hello), created through a real daemon
 * until a target count is alive, idle and serving, within a time budget.
 * Every `step` clones it stops creating and measures, so that what grows
 * with the live count shows: the creation rate of the step, the host's CPU
 * per start (the whole host, and what is ours: the daemon with the `ip` and
 * `nft` it ran, and every clone's QEMU), then, with every clone idle, the
 * CPU per idle clone and the memory per clone (the drop in MemAvailable, and
 * the private memory of a sample of QEMU processes, which other load on the
 * host does not blur). The step that starts at `sustainedAt` alive (500)
 * gives the sustained creation rate. It stops early at its time budget, at
 * the tenth failed start, or when MemAvailable falls under 3 GiB.
 * Used by start-paths.ts; `benchDensity` takes a daemon someone else
 * started. On its own (`node dist/bench/density.js`) it builds hello, starts
 * a daemon on its own bridge and takes the sizes from densityOptionsFromEnv().
 */
import { readFile } from 'node:fs/promises'
import { cpus } from 'node:os'
import { join } from 'node:path'
import { pathToFileURL } from 'node:url'
import type { ApiClient } from '../src/cli/api-client.js'
import { run } from '../src/core/exec.js'
import type { TemplateInfo } from '../src/core/template.js'
import type { Vm } from '../src/core/vm.js'
import { DaemonProcess } from '../test/helpers/daemon-process.js'
import { createTestContext, exampleSpec, packageRoot } from '../test/helpers/fixtures.js'
import { hostCpuTicks, mapLimit, memAvailableKiB, percentile, untilServing } from './lib/measure.js'
import { procCpuTicks, sumCpuTicks } from './lib/proc-cpu.js'

export interface DensityOptions {
  template: string
  /** Clones to have alive at the end. */
  target: number
  /** Measure every this many. */
  step: number
  budgetS: number
  /** Clone starts at a time. */
  concurrency: number
  /** The quiet window for idle CPU at each checkpoint. */
  idleS: number
  /** The live count whose next step gives the sustained creation rate. */
  sustainedAt: number
  daemonPid: number
  clkTck: number
  port: number
  progress: (msg: string) => void
}

export interface DensityCheckpoint {
  live: number
  /** Clones that came to serve in this step, and how long the step's creation took. */
  started: number
  creationS: number
  ratePerS: number
  serveMsP50: number
  serveMsP99: number
  /** CPU during the step's creation, in core-milliseconds per start. */
  hostMsPerStart: number
  daemonMsPerStart: number
  qemuMsPerStart: number
  /**
   * What the starts themselves cost: the QEMUs' and the daemon's CPU per
   * start less what the clones alive before the step, and the daemon, spend
   * idle over as long (at the last checkpoint's idle rates). The figure that
   * must stay flat as the live count grows.
   */
  startWorkMsPerStart: number
  /** With every clone idle: % of one core. */
  idlePerClonePct: number
  idleDaemonPct: number
  idleHostPct: number
  memAvailableDropMiBPerClone: number
  privateMiBPerClone: number
}

export interface DensityResult {
  checkpoints: DensityCheckpoint[]
  live: number
  failures: string[]
  stop: string
  fillS: number
  deleteS: number
  /** The step from sustainedAt on, when the run got there. */
  sustained?: DensityCheckpoint
}

const DENSITY_MAX_FAILURES = 10
/** No clone starts while MemAvailable is below this. */
const MEM_FLOOR_KIB = 3 * 1024 * 1024

export async function benchDensity (api: ApiClient, o: DensityOptions): Promise<DensityResult> {
  const result: DensityResult = { checkpoints: [], live: 0, failures: [], stop: '', fillS: NaN, deleteS: NaN }
  const vms: Vm[] = []
  const memBefore = await memAvailableKiB()
  const began = performance.now()
  const deadline = began + o.budgetS * 1000
  let stop: string | undefined
  const cores = cpus().length
  const coreMs = (ticks: number): number => ticks / o.clkTck * 1000
  try {
    while (stop === undefined && vms.length < o.target) {
      const goal = Math.min(o.target, (Math.floor(vms.length / o.step) + 1) * o.step)
      const serve: number[] = []
      const h0 = await hostCpuTicks()
      const d0 = await procCpuTicks(o.daemonPid)
      const pidsBefore = vms.map((vm) => vm.pid ?? 0)
      const q0 = await sumCpuTicks(pidsBefore)
      const t0 = performance.now()
      let inFlight = 0
      const worker = async (): Promise<void> => {
        while (stop === undefined) {
          if (vms.length + inFlight >= goal) return
          if (performance.now() > deadline) { stop ??= `the budget of ${o.budgetS} s was spent`; return }
          // Other work shares this host: the run must not starve it of memory.
          const avail = await memAvailableKiB()
          if (avail < MEM_FLOOR_KIB) { stop ??= `MemAvailable fell to ${(avail / 1024).toFixed(0)} MiB (the floor is ${MEM_FLOOR_KIB / 1024} MiB)`; return }
          inFlight++
          const s0 = performance.now()
          let vm: Vm | undefined
          try {
            vm = await api.call<Vm>('POST', '/v1/vms', { template: o.template })
            await untilServing(vm.ipAddress ?? '', o.port, 60_000)
            vms.push(vm)
            serve.push(performance.now() - s0)
          } catch (err) {
            const why = (err as Error).message.split('\n')[0] ?? ''
            result.failures.push(why)
            o.progress(`density: a clone start failed (${result.failures.length}): ${why}`)
            if (vm !== undefined) await api.call('DELETE', `/v1/vms/${vm.id}?force=true`).catch(() => {})
            if (result.failures.length >= DENSITY_MAX_FAILURES) stop ??= `${DENSITY_MAX_FAILURES} clone starts failed`
          } finally {
            inFlight--
          }
        }
      }
      await Promise.all(Array.from({ length: o.concurrency }, worker))
      const creationS = (performance.now() - t0) / 1000
      const h1 = await hostCpuTicks()
      const d1 = await procCpuTicks(o.daemonPid)
      // Every clone's QEMU: the new ones from their start, the old ones' share of the step.
      const q1 = await sumCpuTicks(vms.map((vm) => vm.pid ?? 0))
      const started = serve.length
      if (started === 0) break
      // The host's busy ticks over all its CPUs, spread over the starts.
      const hostTicks = (h1.busy - h0.busy)
      const daemonTicks = d1 !== undefined && d0 !== undefined ? (d1.self + d1.children) - (d0.self + d0.children) : NaN
      o.progress(`density: ${vms.length} serving (${started} in ${creationS.toFixed(1)} s); idle window`)
      const idle = await idleWindow(vms, o)
      const memNow = await memAvailableKiB()
      const cp: DensityCheckpoint = {
        live: vms.length,
        started,
        creationS,
        ratePerS: started / creationS,
        serveMsP50: percentile(serve, 50),
        serveMsP99: percentile(serve, 99),
        hostMsPerStart: coreMs(hostTicks) / started,
        daemonMsPerStart: coreMs(daemonTicks) / started,
        qemuMsPerStart: coreMs(q1 - q0) / started,
        startWorkMsPerStart: (coreMs(q1 - q0 + daemonTicks) - idleCoreMs(result.checkpoints.at(-1), pidsBefore.length, creationS)) / started,
        idlePerClonePct: idle.clonesPct / Math.max(1, idle.clones),
        idleDaemonPct: idle.daemonPct,
        idleHostPct: idle.hostPct * cores,
        memAvailableDropMiBPerClone: (memBefore - memNow) / 1024 / vms.length,
        privateMiBPerClone: await privateMiB(vms)
      }
      result.checkpoints.push(cp)
      if (result.sustained === undefined && vms.length - started >= o.sustainedAt) result.sustained = cp
      o.progress(`density: ${cp.live} alive: ${cp.ratePerS.toFixed(1)} starts/s, serve p50 ${cp.serveMsP50.toFixed(0)} ms, per start host ${cp.hostMsPerStart.toFixed(0)} ms CPU ` +
        `(daemon ${cp.daemonMsPerStart.toFixed(1)}, QEMUs ${cp.qemuMsPerStart.toFixed(0)}, the starts' own ${cp.startWorkMsPerStart.toFixed(0)}); idle ${cp.idlePerClonePct.toFixed(3)} % of a core per clone, daemon ${cp.idleDaemonPct.toFixed(2)} %; ` +
        `${cp.memAvailableDropMiBPerClone.toFixed(1)} MiB MemAvailable and ${cp.privateMiBPerClone.toFixed(1)} MiB private per clone`)
    }
    result.stop = stop ?? (vms.length >= o.target ? `${o.target} alive` : 'no clone started')
  } finally {
    result.live = vms.length
    result.fillS = (performance.now() - began) / 1000
    const t = performance.now()
    o.progress(`density: deleting ${vms.length} clones`)
    await mapLimit(vms, 8, async (vm) => { await api.call('DELETE', `/v1/vms/${vm.id}?force=true`).catch(() => {}) })
    result.deleteS = (performance.now() - t) / 1000
  }
  return result
}

/** Core-ms that `clones` idle clones and the daemon spend over `seconds`, at a checkpoint's idle rates (none before the first). */
function idleCoreMs (at: DensityCheckpoint | undefined, clones: number, seconds: number): number {
  if (at === undefined) return 0
  return (at.idlePerClonePct * clones + at.idleDaemonPct) / 100 * seconds * 1000
}

/** After a settle, the CPU of every clone, the daemon and the host over the quiet window, in % of one core. */
async function idleWindow (vms: Vm[], o: DensityOptions): Promise<{ clones: number, clonesPct: number, daemonPct: number, hostPct: number }> {
  await new Promise((resolve) => setTimeout(resolve, 3000))
  const pids = vms.map((vm) => vm.pid ?? 0)
  const h0 = await hostCpuTicks()
  const c0 = await sumCpuTicks(pids)
  const d0 = await procCpuTicks(o.daemonPid)
  const t0 = performance.now()
  await new Promise((resolve) => setTimeout(resolve, o.idleS * 1000))
  const h1 = await hostCpuTicks()
  const c1 = await sumCpuTicks(pids)
  const d1 = await procCpuTicks(o.daemonPid)
  const windowS = (performance.now() - t0) / 1000
  const pct = (ticks: number): number => ticks / o.clkTck / windowS * 100
  return {
    clones: pids.length,
    clonesPct: pct(c1 - c0),
    daemonPct: d0 !== undefined && d1 !== undefined ? pct(d1.self - d0.self) : NaN,
    // busy/total is the share of the whole machine.
    hostPct: (h1.busy - h0.busy) / Math.max(1, h1.total - h0.total) * 100
  }
}

/** Private memory (dirty and clean) and page tables of up to 20 clones' QEMU processes, the mean, in MiB. */
async function privateMiB (vms: Vm[]): Promise<number> {
  const sample = vms.filter((_, i) => i % Math.max(1, Math.floor(vms.length / 20)) === 0).slice(0, 20)
  const values: number[] = []
  for (const vm of sample) {
    try {
      const rollup = await readFile(`/proc/${vm.pid ?? 0}/smaps_rollup`, 'utf8')
      const status = await readFile(`/proc/${vm.pid ?? 0}/status`, 'utf8')
      const kb = (text: string, key: string): number => Number(new RegExp(`^${key}:\\s+(\\d+) kB`, 'm').exec(text)?.[1] ?? 0)
      values.push((kb(rollup, 'Private_Dirty') + kb(rollup, 'Private_Clean') + kb(status, 'VmPTE')) / 1024)
    } catch { /* gone meanwhile */ }
  }
  return values.length === 0 ? NaN : values.reduce((a, b) => a + b, 0) / values.length
}

/** The density targets of issue 11. */
export const DENSITY_TARGETS = { live: 1000, sustainedPerS: 20, memoryMiB: 18, idlePct: 0.05 }

/**
 * The run's size from the environment, so that it can be run small:
 * UIGNITER_BENCH_DENSITY (clones, default 1000), UIGNITER_BENCH_DENSITY_STEP
 * (100), UIGNITER_BENCH_DENSITY_BUDGET_S (1800), UIGNITER_BENCH_DENSITY_CONCURRENCY
 * (4), UIGNITER_BENCH_DENSITY_IDLE_S (10), UIGNITER_BENCH_DENSITY_SUSTAINED_AT (500).
 */
export function densityOptionsFromEnv (env: NodeJS.ProcessEnv = process.env): Pick<DensityOptions, 'target' | 'step' | 'budgetS' | 'concurrency' | 'idleS' | 'sustainedAt'> {
  const whole = (name: string, fallback: number): number => {
    const text = env[name]
    if (text === undefined || text === '') return fallback
    const v = Number(text)
    if (!Number.isInteger(v) || v < 1) throw new Error(`${name} takes a whole number ≥ 1, not "${text}"`)
    return v
  }
  const target = whole('UIGNITER_BENCH_DENSITY', DENSITY_TARGETS.live)
  return {
    target,
    step: whole('UIGNITER_BENCH_DENSITY_STEP', Math.min(100, target)),
    budgetS: whole('UIGNITER_BENCH_DENSITY_BUDGET_S', 1800),
    concurrency: whole('UIGNITER_BENCH_DENSITY_CONCURRENCY', 4),
    idleS: whole('UIGNITER_BENCH_DENSITY_IDLE_S', 10),
    sustainedAt: whole('UIGNITER_BENCH_DENSITY_SUSTAINED_AT', Math.min(500, Math.floor(target / 2)))
  }
}

/** The run as markdown: one row per checkpoint, then the targets. */
export function densityMarkdown (r: DensityResult, o: Pick<DensityOptions, 'target' | 'step' | 'budgetS' | 'concurrency' | 'idleS' | 'sustainedAt'>): string {
  const f = (x: number, d = 1): string => Number.isNaN(x) ? '—' : x.toFixed(d)
  const lines = [
    `Clones of hello up to ${o.target} alive, ${o.concurrency} starts at a time, measured every ${o.step}; budget ${o.budgetS} s. ` +
      'Per start: CPU while the step\'s clones were created, in core-ms (the host: every process, other load included; the daemon with the `ip`/`nft` it ran; all clones\' QEMUs; ' +
      'the starts\' own: QEMUs and daemon less what the clones alive before the step and the daemon spend idle over as long). ' +
      `Idle: a ${o.idleS} s window with every clone idle. Memory: the drop in MemAvailable since the run began, and the private memory plus page tables of a sample of QEMUs.\n`,
    '| alive | starts/s | serve p50 / p99 ms | host ms/start | daemon ms/start | QEMU ms/start | the starts\' own ms/start | idle % of a core per clone | daemon idle % | host busy % (of one core) | MemAvailable MiB/clone | private MiB/clone |',
    '|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|'
  ]
  for (const c of r.checkpoints) {
    lines.push(`| ${c.live} | ${f(c.ratePerS)} | ${f(c.serveMsP50, 0)} / ${f(c.serveMsP99, 0)} | ${f(c.hostMsPerStart, 0)} | ${f(c.daemonMsPerStart)} | ${f(c.qemuMsPerStart, 0)} | ${f(c.startWorkMsPerStart, 0)} | ${f(c.idlePerClonePct, 3)} | ${f(c.idleDaemonPct, 2)} | ${f(c.idleHostPct, 0)} | ${f(c.memAvailableDropMiBPerClone)} | ${f(c.privateMiBPerClone)} |`)
  }
  lines.push('', `Stopped: ${r.stop}, ${r.live} alive after ${f(r.fillS, 0)} s; ${r.failures.length} failed starts${r.failures.length > 0 ? ` (first: ${r.failures[0] ?? ''})` : ''}; deleting them all took ${f(r.deleteS, 0)} s.`)
  return lines.join('\n')
}

/** The density rows of the targets table: [target, figure, met]. */
export function densityTargets (r: DensityResult | undefined): Array<[string, string, boolean | undefined]> {
  const last = r?.checkpoints.at(-1)
  const s = r?.sustained
  return [
    [`${DENSITY_TARGETS.live} live, idle, serving clones of hello`, r !== undefined ? `${r.live} (${r.stop})` : '—', r === undefined ? undefined : r.live >= DENSITY_TARGETS.live],
    [`creation rate ≥ ${DENSITY_TARGETS.sustainedPerS}/s while 500 are alive`, s !== undefined ? `${s.ratePerS.toFixed(1)}/s from ${s.live - s.started} alive` : '— (the run did not get there)', s === undefined ? undefined : s.live - s.started >= 500 && s.ratePerS >= DENSITY_TARGETS.sustainedPerS],
    [`≤ ${DENSITY_TARGETS.memoryMiB} MiB of host memory per idle hello clone (MemAvailable drop)`, last !== undefined ? `${last.memAvailableDropMiBPerClone.toFixed(1)} MiB with ${last.live} alive (private ${last.privateMiBPerClone.toFixed(1)} MiB)` : '—', last === undefined ? undefined : last.memAvailableDropMiBPerClone <= DENSITY_TARGETS.memoryMiB],
    [`≤ ${DENSITY_TARGETS.idlePct} % of a core per idle clone with ${DENSITY_TARGETS.live} alive`, last !== undefined ? `${last.idlePerClonePct.toFixed(3)} % with ${last.live} alive` : '—', last === undefined ? undefined : last.live >= DENSITY_TARGETS.live && last.idlePerClonePct <= DENSITY_TARGETS.idlePct],
    ['host work per start flat as the live count grows (the starts\' own core-ms, last step over first; within 25 %)', r !== undefined && r.checkpoints.length >= 2 ? `${(last?.startWorkMsPerStart ?? NaN).toFixed(0)} / ${(r.checkpoints[0]?.startWorkMsPerStart ?? NaN).toFixed(0)} ms = ${((last?.startWorkMsPerStart ?? NaN) / (r.checkpoints[0]?.startWorkMsPerStart ?? NaN)).toFixed(2)}×` : '—', r === undefined || r.checkpoints.length < 2 ? undefined : (last?.startWorkMsPerStart ?? Infinity) <= 1.25 * (r.checkpoints[0]?.startWorkMsPerStart ?? 0)]
  ]
}

/** On its own: hello built, a daemon on its own bridge, hello's `ready: app` template, the run, the clean-up. */
export async function main (): Promise<DensityResult> {
  const options = densityOptionsFromEnv()
  const began = performance.now()
  const progress = (msg: string): void => { process.stderr.write(`[density ${((performance.now() - began) / 1000).toFixed(0).padStart(4)} s] ${msg}\n`) }
  const ctx = await createTestContext()
  // A /21: room for the clones and the template.
  const daemon = await DaemonProcess.create(ctx.dataDir, { UIGNITER_SUBNET: '10.244.0.0/21', UIGNITER_LOG_LEVEL: 'warn' })
  try {
    await ctx.builder.build(JSON.parse(await readFile(exampleSpec('hello'), 'utf8')), join(packageRoot, 'examples', 'hello'))
    await daemon.start()
    const clkTck = Number((await run('getconf', ['CLK_TCK'])).stdout.trim()) || 100
    const template = await daemon.api.call<TemplateInfo>('POST', '/v1/templates', { name: 'hello-density', image: 'hello', ready: 'app', port: 8080 })
    const result = await benchDensity(daemon.api, { ...options, template: template.name, daemonPid: daemon.pid ?? 0, clkTck, port: 8080, progress })
    console.log(densityMarkdown(result, options))
    console.log('\n| target | figure | met |\n|---|---|---|')
    for (const [target, figure, met] of densityTargets(result)) console.log(`| ${target} | ${figure} | ${met === undefined ? 'not measured' : met ? 'yes' : 'NO'} |`)
    return result
  } finally {
    await daemon.removeEverything()
    await ctx.cleanup()
  }
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) await main()
