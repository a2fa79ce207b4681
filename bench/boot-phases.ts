/**
 * Boot phases of the hello image (issue 11: a cold boot serves within 0.5 s
 * under TCG). Boots hello N times, one after another, through the QEMU
 * driver with the user-mode network (as `image test` and the boot benchmark
 * do), and times from the host side, from the driver's spawn call:
 *   QEMU start → first console output → init started (UIGNITER:INIT)
 *   → app started (UIGNITER:APP-STARTED) → serving (GET / answers 200).
 * Our kernel boots `quiet`, so its first console output is normally the
 * init's marker. With --kernel-log the boots add `loglevel=8 printk.time=1
 * initcall_debug`, so the kernel's own lines (and their cost on the emulated
 * serial port) show, with the guest clock at "Run /init" and the slowest
 * initcalls by name (from `nm` of the kernel: it has no kallsyms).
 * Also prints the vCPU thread's CPU time until serving and how long it
 * waited for a host CPU: on a busy host the wall times grow with the wait.
 *   node dist/bench/boot-phases.js [--runs 5] [--kernel-log] [--top 15]
 */
import { readdir, readFile } from 'node:fs/promises'
import { join } from 'node:path'
import { pathToFileURL } from 'node:url'
import { parseArgs } from 'node:util'
import { askApp } from '../src/core/app-probe.js'
import { run } from '../src/core/exec.js'
import { freePort } from '../src/core/free-port.js'
import type { ImageManifest } from '../src/core/image.js'
import { type Accel, USER_NETWORK } from '../src/core/ports/vmm-driver.js'
import { chooseAccel } from '../src/vmm/qemu/accel-probe.js'
import { parseConsoleMarker } from '../src/vmm/qemu/console-markers.js'
import { QemuDriver } from '../src/vmm/qemu/qemu-driver.js'
import { createTestContext, exampleSpec, packageRoot } from '../test/helpers/fixtures.js'
import { percentile } from './lib/measure.js'

/** Issue 11's target for a cold boot of hello, QEMU start to serving. */
export const BOOT_TARGET_MS = 500

export interface BootPhasesOptions {
  /** Boots to measure (default 5), after one unmeasured boot that warms the page cache. */
  runs?: number
  /** Boot with the kernel's log on the console and initcall_debug (slower: see the file comment). */
  kernelLog?: boolean
  /** How many of the slowest initcalls to keep (default 15; --kernel-log only). */
  topInitcalls?: number
  progress?: (message: string) => void
}

/** One boot, in ms from the spawn call; NaN for a phase that was not seen. */
export interface BootPhaseSample {
  firstOutputMs: number
  initMs: number
  appStartedMs: number
  servingMs: number
  /** CPU time of QEMU's vCPU threads until serving (the guest's own work, and its busy waits). */
  vcpuCpuMs: number
  /** How long those threads waited for a host CPU meanwhile (host contention). */
  vcpuWaitMs: number
  /** --kernel-log: the guest clock when the kernel ran /init. */
  kernelRunInitMs?: number
  /** --kernel-log: every initcall's name and µs. */
  initcalls?: Array<{ name: string, us: number }>
}

export interface BootPhases {
  image: string
  accel: Accel
  /** The kernel's source, version and blob digest. */
  kernel: string
  runs: number
  kernelLog: boolean
  /** p50 of each phase, ms from QEMU start (each phase's own p50: they need not add up). */
  p50: { firstOutputMs: number, initMs: number, appStartedMs: number, servingMs: number, vcpuCpuMs: number, vcpuWaitMs: number, kernelRunInitMs?: number }
  targetMs: number
  /** Whether the p50 of serving is within the target. */
  met: boolean
  /** --kernel-log: the slowest initcalls (p50 of each over the boots) and the p50 of their sum. */
  initcalls?: { totalUs: number, top: Array<{ name: string, us: number }> }
  samples: BootPhaseSample[]
}

const KERNEL_LOG_CMDLINE = ['loglevel=8', 'printk.time=1', 'initcall_debug']
const BOOT_TIMEOUT_MS = 60_000

/**
 * Boots hello `runs` times and returns the p50 of each phase.
 *
 * @example
 * const phases = await measureBootPhases({ runs: 5 })
 * console.log(phases.p50.servingMs, phases.met)
 */
export async function measureBootPhases (options: BootPhasesOptions = {}): Promise<BootPhases> {
  const runs = options.runs ?? 5
  const kernelLog = options.kernelLog ?? false
  const progress = options.progress ?? (() => {})
  if (!Number.isInteger(runs) || runs < 1) throw new Error(`runs must be a whole number ≥ 1, not ${runs}`)
  const ctx = await createTestContext()
  const driver = new QemuDriver({ livenessPollMs: 1000 })
  try {
    const spec = JSON.parse(await readFile(exampleSpec('hello'), 'utf8')) as unknown
    const manifest = await ctx.builder.build(spec, join(packageRoot, 'examples/hello'))
    const kernelPath = ctx.store.blobPath(manifest.kernel.blob.digest)
    const rootfsPath = manifest.rootfs !== undefined ? ctx.store.blobPath(manifest.rootfs.digest) : undefined
    const accel = (await chooseAccel(ctx.config, kernelPath, manifest.kernel.blob.digest)).accel
    const symbols = kernelLog ? await kernelSymbols(kernelPath) : undefined
    const boot = async (i: number): Promise<BootPhaseSample> => await bootOnce({
      driver, manifest, kernelPath, rootfsPath, accel, id: `phases-${process.pid}-${i}`, stateDir: join(ctx.dataDir, 'run', `phases-${i}`),
      extraCmdline: kernelLog ? KERNEL_LOG_CMDLINE : [], symbols
    })
    await boot(0)
    const samples: BootPhaseSample[] = []
    for (let i = 1; i <= runs; i++) {
      const s = await boot(i)
      samples.push(s)
      progress(`boot ${i}/${runs}: first output ${ms(s.firstOutputMs)}, init ${ms(s.initMs)}, app ${ms(s.appStartedMs)}, serving ${ms(s.servingMs)} ms (vCPU ${ms(s.vcpuCpuMs)} ms, waited ${ms(s.vcpuWaitMs)} ms)`)
    }
    const p50 = (pick: (s: BootPhaseSample) => number | undefined): number => percentile(samples.map(pick).filter((x): x is number => x !== undefined && !Number.isNaN(x)), 50)
    const servingMs = p50((s) => s.servingMs)
    const phases: BootPhases = {
      image: manifest.name,
      accel,
      kernel: `${manifest.kernel.source} ${manifest.kernel.version} (${manifest.kernel.blob.digest.slice(0, 19)})`,
      runs,
      kernelLog,
      p50: {
        firstOutputMs: p50((s) => s.firstOutputMs),
        initMs: p50((s) => s.initMs),
        appStartedMs: p50((s) => s.appStartedMs),
        servingMs,
        vcpuCpuMs: p50((s) => s.vcpuCpuMs),
        vcpuWaitMs: p50((s) => s.vcpuWaitMs),
        ...(kernelLog ? { kernelRunInitMs: p50((s) => s.kernelRunInitMs) } : {})
      },
      targetMs: BOOT_TARGET_MS,
      met: servingMs <= BOOT_TARGET_MS,
      samples
    }
    if (kernelLog) phases.initcalls = summarizeInitcalls(samples, options.topInitcalls ?? 15)
    return phases
  } finally {
    await ctx.cleanup()
  }
}

interface BootOnceOptions {
  driver: QemuDriver
  manifest: ImageManifest
  kernelPath: string
  rootfsPath: string | undefined
  accel: Accel
  id: string
  stateDir: string
  extraCmdline: string[]
  symbols: KernelSymbols | undefined
}

async function bootOnce (o: BootOnceOptions): Promise<BootPhaseSample> {
  const port = await freePort()
  const t0 = performance.now()
  const vm = await o.driver.spawn({
    id: o.id,
    stateDir: o.stateDir,
    launch: {
      manifest: o.manifest,
      kernelPath: o.kernelPath,
      ...(o.rootfsPath !== undefined ? { rootfsPath: o.rootfsPath } : {}),
      accel: o.accel,
      vcpus: o.manifest.vcpus,
      memoryMiB: o.manifest.memoryMiB,
      network: { mode: 'user', forwards: [{ hostAddress: '127.0.0.1', hostPort: port, guestPort: 8080 }] },
      guestNetwork: USER_NETWORK,
      hostname: 'hello',
      extraCmdline: o.extraCmdline
    }
  })
  const sample: BootPhaseSample = { firstOutputMs: NaN, initMs: NaN, appStartedMs: NaN, servingMs: NaN, vcpuCpuMs: NaN, vcpuWaitMs: NaN }
  const lines: string[] = []
  let partial = ''
  let appStarted: () => void = () => {}
  const started = new Promise<void>((resolve) => { appStarted = resolve })
  const unfollow = vm.followConsole((text) => {
    const now = performance.now() - t0
    if (Number.isNaN(sample.firstOutputMs) && text !== '') sample.firstOutputMs = now
    const parts = (partial + text).split('\n')
    partial = parts.pop() ?? ''
    for (const raw of parts) {
      const line = raw.replace(/\r$/, '')
      lines.push(line)
      const marker = parseConsoleMarker(line)
      if (marker?.kind === 'init' && Number.isNaN(sample.initMs)) sample.initMs = now
      if (marker?.kind === 'app-started' && Number.isNaN(sample.appStartedMs)) { sample.appStartedMs = now; appStarted() }
    }
  }, { tailBytes: Infinity })
  try {
    const ended = vm.exited.then((exit) => { throw new Error(`hello ended during its boot: ${exit.reason}: ${exit.detail}; console: ${lines.slice(-5).join(' | ')}`) })
    const deadline = setTimeout(() => { appStarted() }, BOOT_TIMEOUT_MS)
    try {
      await Promise.race([started, ended])
    } finally {
      clearTimeout(deadline)
    }
    if (Number.isNaN(sample.appStartedMs)) throw new Error(`hello did not start its app within ${BOOT_TIMEOUT_MS / 1000} s; console: ${lines.slice(-5).join(' | ')}`)
    // Probing from app-started on, one attempt at a time: a connection made through the
    // user-mode forward before the guest's network is up can stall for seconds (its SYN is
    // retried on slirp's own timers), and hello serves one connection at a time.
    const stopAt = performance.now() + BOOT_TIMEOUT_MS
    for (;;) {
      const answer = await Promise.race([askApp({ host: '127.0.0.1', port, httpPath: '/' }, { connectMs: 1000, answerMs: 1000 }), ended])
      if (answer?.status === 200) {
        sample.servingMs = performance.now() - t0
        break
      }
      if (performance.now() > stopAt) throw new Error(`hello did not answer GET / within ${BOOT_TIMEOUT_MS / 1000} s of its start`)
      await new Promise((resolve) => setTimeout(resolve, 5))
    }
    const cpu = await vcpuSchedstat(vm.pid)
    sample.vcpuCpuMs = cpu.runMs
    sample.vcpuWaitMs = cpu.waitMs
    ended.catch(() => {})
  } finally {
    unfollow()
    vm.kill()
    await vm.exited
    await o.driver.remove(o.stateDir).catch(() => {})
  }
  if (o.symbols !== undefined) {
    if (partial !== '') lines.push(partial)
    const runInit = lines.map((l) => /^\[\s*(\d+\.\d+)\] Run \/init as init process/.exec(l)).find((m) => m !== null)
    if (runInit?.[1] !== undefined) sample.kernelRunInitMs = Number(runInit[1]) * 1000
    sample.initcalls = parseInitcalls(lines, o.symbols)
  }
  return sample
}

/** CPU time and run-queue wait of QEMU's vCPU threads (named "CPU n/TCG" or "CPU n/KVM": the driver turns on debug-threads). */
async function vcpuSchedstat (pid: number): Promise<{ runMs: number, waitMs: number }> {
  let runNs = 0
  let waitNs = 0
  for (const tid of await readdir(`/proc/${pid}/task`)) {
    const comm = await readFile(`/proc/${pid}/task/${tid}/comm`, 'utf8').catch(() => '')
    if (!/^CPU \d+\//.test(comm)) continue
    const fields = (await readFile(`/proc/${pid}/task/${tid}/schedstat`, 'utf8')).trim().split(' ')
    runNs += Number(fields[0])
    waitNs += Number(fields[1])
  }
  return { runMs: runNs / 1e6, waitMs: waitNs / 1e6 }
}

/** The kernel's function symbols, sorted by address, to name initcalls (our kernel has no kallsyms). */
interface KernelSymbols { addresses: bigint[], names: string[] }

async function kernelSymbols (kernelPath: string): Promise<KernelSymbols> {
  const { stdout } = await run('nm', [kernelPath])
  const entries: Array<[bigint, string]> = []
  for (const line of stdout.split('\n')) {
    const [address, type, name] = line.split(' ')
    if (address !== undefined && name !== undefined && /^[tTwW]$/.test(type ?? '')) entries.push([BigInt(`0x${address}`), name])
  }
  entries.sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0))
  return { addresses: entries.map((e) => e[0]), names: entries.map((e) => e[1]) }
}

function symbolAt (symbols: KernelSymbols, address: bigint): string {
  let lo = 0
  let hi = symbols.addresses.length - 1
  if (hi < 0 || address < (symbols.addresses[0] ?? 0n)) return `0x${address.toString(16)}`
  while (lo < hi) {
    const mid = (lo + hi + 1) >> 1
    if ((symbols.addresses[mid] ?? 0n) <= address) lo = mid
    else hi = mid - 1
  }
  return symbols.names[lo] ?? `0x${address.toString(16)}`
}

/**
 * "initcall 0xffffffff81ae0b27 returned 0 after 37017 usecs" (or a name where the kernel has kallsyms).
 * Before the clocksource switch (an fs initcall), the kernel's clock is the 10 ms jiffy: early initcalls
 * read as 0 or 10000 µs, right only on average.
 */
function parseInitcalls (lines: string[], symbols: KernelSymbols): Array<{ name: string, us: number }> {
  const out: Array<{ name: string, us: number }> = []
  for (const line of lines) {
    const m = /initcall (\S+?)(?:\+0x[0-9a-f]+\/0x[0-9a-f]+)? returned -?\d+ after (\d+) usecs/.exec(line)
    if (m?.[1] === undefined || m[2] === undefined) continue
    out.push({ name: /^0x[0-9a-f]+$/.test(m[1]) ? symbolAt(symbols, BigInt(m[1])) : m[1], us: Number(m[2]) })
  }
  return out
}

function summarizeInitcalls (samples: BootPhaseSample[], top: number): { totalUs: number, top: Array<{ name: string, us: number }> } {
  const byName = new Map<string, number[]>()
  for (const s of samples) {
    for (const c of s.initcalls ?? []) byName.set(c.name, [...(byName.get(c.name) ?? []), c.us])
  }
  const medians = [...byName].map(([name, us]) => ({ name, us: percentile(us, 50) }))
  medians.sort((a, b) => b.us - a.us)
  const totals = samples.map((s) => (s.initcalls ?? []).reduce((sum, c) => sum + c.us, 0))
  return { totalUs: percentile(totals, 50), top: medians.slice(0, top) }
}

function ms (x: number): string {
  return Number.isNaN(x) ? '—' : x.toFixed(0)
}

/** The figures as markdown: the phases (from QEMU start, and each phase's own length), the target, the kernel's initcalls. */
export function formatBootPhases (p: BootPhases): string {
  const rows: Array<[string, number, number]> = [
    ['QEMU start → first console output', p.p50.firstOutputMs, p.p50.firstOutputMs],
    ['→ init started (UIGNITER:INIT)', p.p50.initMs, p.p50.initMs - p.p50.firstOutputMs],
    ['→ app started (UIGNITER:APP-STARTED)', p.p50.appStartedMs, p.p50.appStartedMs - p.p50.initMs],
    ['→ serving (GET / answers 200)', p.p50.servingMs, p.p50.servingMs - p.p50.appStartedMs]
  ]
  const out = [
    `### Boot phases: ${p.image}, ${p.accel}, kernel ${p.kernel}, ${p.runs} cold boots one after another (p50)${p.kernelLog ? ', kernel log on (slower)' : ''}`,
    '',
    '| phase | ms from QEMU start | ms in this phase |',
    '|---|---:|---:|',
    ...rows.map(([name, at, own]) => `| ${name} | ${ms(at)} | ${ms(own)} |`),
    '',
    `Target: serving within ${p.targetMs} ms: **${p.met ? 'met' : 'not met'}** (p50 ${ms(p.p50.servingMs)} ms).`,
    `vCPU CPU time until serving: ${ms(p.p50.vcpuCpuMs)} ms; it waited ${ms(p.p50.vcpuWaitMs)} ms for a host CPU (a busy host stretches every wall figure above).`
  ]
  if (p.p50.kernelRunInitMs !== undefined) out.push(`Guest clock at "Run /init": ${ms(p.p50.kernelRunInitMs)} ms.`)
  if (p.initcalls !== undefined) {
    out.push('', `Initcalls: ${(p.initcalls.totalUs / 1000).toFixed(1)} ms in all (p50); the slowest (µs, p50; 0 or 10000 before the clocksource switch means "within one 10 ms tick"):`, '',
      '| initcall | µs |', '|---|---:|', ...p.initcalls.top.map((c) => `| ${c.name} | ${c.us} |`))
  }
  return out.join('\n') + '\n'
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  const { values } = parseArgs({ options: { runs: { type: 'string', default: '5' }, 'kernel-log': { type: 'boolean', default: false }, top: { type: 'string', default: '15' } } })
  const began = performance.now()
  const phases = await measureBootPhases({
    runs: Number(values.runs),
    kernelLog: values['kernel-log'],
    topInitcalls: Number(values.top),
    progress: (m) => { process.stderr.write(`[${((performance.now() - began) / 1000).toFixed(0).padStart(4)} s] ${m}\n`) }
  })
  process.stdout.write(formatBootPhases(phases))
}
