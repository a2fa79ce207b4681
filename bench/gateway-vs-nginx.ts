/**
 * The gateway against nginx, in one run, on this machine:
 *   - the same upstream (an nginx with one worker answering 200 "ok\n") behind
 *     nginx (one worker, keepalive to the upstream) and behind our gateway
 *     (one process), and reached directly, all three loaded by the same
 *     generator with the same settings: wrk, a C program in its own process,
 *     faster than what it measures (the direct path's figure shows by how
 *     much); with two CPUs or more, wrk is pinned to CPU 0 and the servers to
 *     the others (taskset), so that the generator takes no CPU from the proxy;
 *   - at saturation (N connections): requests per second, p50 and p99
 *     latency, the proxies' and the generator's CPU; the gateway/nginx
 *     throughput ratio (target ≥ 60 %);
 *   - at low load (wrk has no rate limit: one connection, one request at a
 *     time, so no request waits behind another): p50 and p99 latency of each
 *     path, and the latency each proxy adds to the direct path (target: the
 *     gateway adds < 1 ms of p99);
 *   - then, through a real daemon, the first request to a service scaled to
 *     zero (held by the gateway while a clone starts) against warm requests.
 * Progress goes to stderr, results (markdown) to stdout.
 *   node dist/bench/gateway-vs-nginx.js [--duration-s 10] [--warmup-s 2]
 *     [--connections 50] [--threads 1] [--low-load-connections 1] [--rounds 1]
 *     [--skip-from-zero] [--from-zero-runs 5] [--skip-proxies] [--no-pin]
 */
import { rmSync } from 'node:fs'
import { mkdtemp, readFile } from 'node:fs/promises'
import { request } from 'node:http'
import { cpus, tmpdir, totalmem } from 'node:os'
import { join } from 'node:path'
import { parseArgs } from 'node:util'
import { run } from '../src/core/exec.js'
import type { ServiceStatus } from '../src/core/service.js'
import type { Vm } from '../src/core/vm.js'
import { freePort } from '../src/core/free-port.js'
import { DaemonProcess } from '../test/helpers/daemon-process.js'
import { createTestContext, exampleSpec, packageRoot } from '../test/helpers/fixtures.js'
import { planCpus, pinProcesses, type CpuPlan } from './lib/cpu-pinning.js'
import { GatewayProcess } from './lib/gateway-process.js'
import { cpuTicks, percentile } from './lib/measure.js'
import { NginxProcess, proxyConfig, upstreamConfig } from './lib/nginx.js'
import { procCpuTicks } from './lib/proc-cpu.js'
import { runWrk, type WrkResult } from './lib/wrk.js'
import { Interrupt } from './lib/interrupt.js'

// ---------------------------------------------------------------- flags

const { values } = parseArgs({
  options: {
    'duration-s': { type: 'string', default: '10' },
    'warmup-s': { type: 'string', default: '2' },
    connections: { type: 'string', default: '50' },
    threads: { type: 'string', default: '1' },
    'low-load-connections': { type: 'string', default: '1' },
    rounds: { type: 'string', default: '1' },
    'skip-from-zero': { type: 'boolean', default: false },
    'skip-proxies': { type: 'boolean', default: false },
    'no-pin': { type: 'boolean', default: false },
    'from-zero-runs': { type: 'string', default: '5' }
  }
})
const wholeNumber = (flag: string, text: string, min: number, max: number): number => {
  const v = Number(text)
  if (!/^\d+$/.test(text) || !Number.isSafeInteger(v) || v < min || v > max) {
    throw new Error(`--${flag} takes a whole number from ${min} to ${max}, not "${text}"`)
  }
  return v
}
const durationS = wholeNumber('duration-s', values['duration-s'], 1, 3600)
const warmupS = wholeNumber('warmup-s', values['warmup-s'], 0, 600)
const connections = wholeNumber('connections', values.connections, 1, 10_000)
const threads = wholeNumber('threads', values.threads, 1, 64)
const lowConnections = wholeNumber('low-load-connections', values['low-load-connections'], 1, 1000)
const rounds = wholeNumber('rounds', values.rounds, 1, 100)
const fromZeroRuns = wholeNumber('from-zero-runs', values['from-zero-runs'], 1, 50)
const TARGET_THROUGHPUT = 0.6
const TARGET_ADDED_P99_MS = 1

const began = performance.now()
const progress = (msg: string): void => { process.stderr.write(`[${((performance.now() - began) / 1000).toFixed(0).padStart(4)} s] ${msg}\n`) }
const sleep = async (ms: number): Promise<void> => await new Promise((resolve) => setTimeout(resolve, ms))
const message = (err: unknown): string => (err instanceof Error ? err.message : String(err)).split('\n')[0] ?? ''

// ---------------------------------------------------------------- children

/** What must go whatever happens: the exit handler kills these at once. */
const children: Array<{ killNow: () => void }> = []
let tempDir: string | undefined
/** The wrk running now, if any: an exit handler kills it too. */
let wrkPid: number | undefined
process.on('exit', () => {
  for (const child of children) child.killNow()
  if (wrkPid !== undefined) try { process.kill(wrkPid, 'SIGKILL') } catch { /* gone already */ }
  if (tempDir !== undefined) rmSync(tempDir, { recursive: true, force: true })
})
/** Set by SIGINT/SIGTERM: the run stops at the next step and cleans up in its finally blocks. */
const interrupt = new Interrupt(progress)

// ---------------------------------------------------------------- load

/** A path to load; `pids`: the processes of the path's proxy, whose CPU is measured. */
interface Target { name: string, url: string, headers?: Record<string, string>, pids: () => number[] | Promise<number[]> }

interface LoadResult {
  /** Answers below 400 per second over the run(s). */
  rps: number
  /** wrk's latency percentiles, ms; over several rounds, the median of the rounds' figures. */
  p50: number
  p99: number
  requests: number
  non2xx: number
  errors: number
  durationS: number
  /** CPU the path's proxy used, in % of one core; NaN when not measured. */
  cpuPct: number
  /** CPU wrk used, in % of one core: near 100 × its threads, the generator is the bottleneck. */
  generatorPct: number
  /** CPU that processes other than this benchmark's used meanwhile, in % of one core: the noise. */
  othersPct: number
}

/** What one wrk run gives, before runs are merged. */
interface Run { wrk: WrkResult, proxyTicks: number | undefined, generatorTicks: number, otherTicks: number }

/** The clock ticks some processes have used, summed. */
async function ticksOf (pids: number[]): Promise<number> {
  const all = await Promise.all(pids.map(async (pid) => await cpuTicks(pid).catch(() => 0)))
  return all.reduce((a, b) => a + b, 0)
}

/**
 * The machine's CPU time in processes (user, nice, system; /proc/stat), in
 * clock ticks. Not irq and softirq: the kernel's loopback traffic is counted
 * there, charged to no process, and it is the benchmark's own.
 */
async function taskTicks (): Promise<number> {
  const line = (await readFile('/proc/stat', 'utf8')).split('\n')[0] ?? ''
  const [user = 0, nice = 0, system = 0] = line.trim().split(/\s+/).slice(1, 4).map(Number)
  return user + nice + system
}

/** Waited-for children's CPU of this process: wrk's, once its run ended (it is our child, reaped at 'close'). */
async function reapedChildTicks (): Promise<number> {
  return (await procCpuTicks(process.pid))?.children ?? 0
}

/** Every server process of this benchmark (the upstream, the proxies) and this process: set once they run. */
let benchPids: () => Promise<number[]> = async () => await Promise.resolve([process.pid])
/** Where wrk and the servers run; undefined: not pinned. */
let cpuPlan: CpuPlan | undefined
let cpuNote = ''

/** One wrk run, with the CPU the proxy, wrk and the rest of the machine used meanwhile. */
async function load (target: Target, opts: { connections: number, threads: number, durationS: number }): Promise<Run> {
  interrupt.check()
  const pids = await target.pids()
  const ours = await benchPids()
  const [p0, o0, g0, h0] = [await ticksOf(pids), await ticksOf(ours), await reapedChildTicks(), await taskTicks()]
  const wrk = await runWrk({
    url: target.url,
    headers: target.headers,
    threads: opts.threads,
    connections: opts.connections,
    durationS: opts.durationS,
    scriptDir: tempDir ?? tmpdir(),
    cpus: cpuPlan?.generator,
    onStart: (pid) => { wrkPid = pid }
  }).finally(() => { wrkPid = undefined })
  const [p1, o1, g1, h1] = [await ticksOf(pids), await ticksOf(ours), await reapedChildTicks(), await taskTicks()]
  return {
    wrk,
    proxyTicks: pids.length === 0 ? undefined : p1 - p0,
    generatorTicks: g1 - g0,
    otherTicks: Math.max(0, (h1 - h0) - (o1 - o0) - (g1 - g0))
  }
}

const median = (xs: number[]): number => percentile(xs, 50)

/** Runs of one path merged: their rates over their summed time, the median of their percentiles. */
function summarize (runs: Run[]): LoadResult {
  const sum = (f: (r: Run) => number): number => runs.reduce((a, r) => a + f(r), 0)
  const seconds = sum((r) => r.wrk.durationS)
  const pctOfCore = (ticks: number): number => ticks / clkTck / seconds * 100
  return {
    rps: sum((r) => r.wrk.rps * r.wrk.durationS) / seconds,
    p50: median(runs.map((r) => r.wrk.p50Ms)),
    p99: median(runs.map((r) => r.wrk.p99Ms)),
    requests: sum((r) => r.wrk.requests),
    non2xx: sum((r) => r.wrk.non2xx),
    errors: sum((r) => r.wrk.errors.connect + r.wrk.errors.read + r.wrk.errors.write + r.wrk.errors.timeout),
    durationS: seconds,
    cpuPct: runs.some((r) => r.proxyTicks === undefined) ? NaN : pctOfCore(sum((r) => r.proxyTicks ?? 0)),
    generatorPct: pctOfCore(sum((r) => r.generatorTicks)),
    othersPct: pctOfCore(sum((r) => r.otherTicks))
  }
}

/** One GET, timed; its status (undefined when it failed) and body. */
async function timedGet (url: string, headers: Record<string, string> = {}, timeoutMs = 60_000): Promise<{ status?: number, body: string, ms: number }> {
  const t0 = performance.now()
  return await new Promise((resolve) => {
    const req = request(url, { agent: false, headers, timeout: timeoutMs }, (res) => {
      let body = ''
      res.setEncoding('utf8')
      res.on('data', (c: string) => { body += c })
      res.on('end', () => resolve({ status: res.statusCode, body, ms: performance.now() - t0 }))
      res.on('error', () => resolve({ body, ms: performance.now() - t0 }))
    })
    req.on('timeout', () => req.destroy(new Error(`no answer within ${timeoutMs} ms`)))
    req.on('error', (err) => resolve({ body: err.message, ms: performance.now() - t0 }))
    req.end()
  })
}

// ---------------------------------------------------------------- proxies

interface ProxyResults {
  saturation: Array<{ target: Target, r: LoadResult }>
  lowLoad: Array<{ target: Target, r: LoadResult }>
}

async function compareProxies (): Promise<ProxyResults> {
  tempDir = await mkdtemp(join(tmpdir(), 'uigniter-bench-nginx-'))
  const [upstreamPort, proxyPort] = [await freePort(), await freePort()]
  const closers: Array<() => Promise<void>> = []
  try {
    progress(`starting the upstream (nginx, one worker) on 127.0.0.1:${upstreamPort}`)
    const upstream = await NginxProcess.start('upstream', join(tempDir, 'upstream'), upstreamPort, upstreamConfig(upstreamPort))
    children.push(upstream)
    closers.push(async () => await upstream.close())
    progress(`starting nginx as a proxy (one worker) on 127.0.0.1:${proxyPort}`)
    const nginx = await NginxProcess.start('proxy', join(tempDir, 'proxy'), proxyPort, proxyConfig(proxyPort, upstreamPort))
    children.push(nginx)
    closers.push(async () => await nginx.close())
    progress('starting the gateway (one process)')
    const gateway = await GatewayProcess.start([{ service: 'up', host: '127.0.0.1', port: upstreamPort }])
    children.push(gateway)
    closers.push(async () => await gateway.close())
    progress(`gateway on 127.0.0.1:${gateway.port}`)

    const direct: Target = { name: 'direct to the upstream', url: `http://127.0.0.1:${upstreamPort}/`, pids: () => [] }
    const viaNginx: Target = { name: 'nginx', url: `http://127.0.0.1:${proxyPort}/`, pids: async () => (await nginx.pids()).slice(1) }
    // Routed by Host header, as a service calls another by name (wrk takes "Host" over the URL's).
    const viaGateway: Target = { name: 'gateway', url: `http://127.0.0.1:${gateway.port}/`, headers: { Host: 'up' }, pids: () => gateway.pid === undefined ? [] : [gateway.pid] }
    const targets = [direct, viaNginx, viaGateway]
    for (const t of targets) {
      const answer = await timedGet(t.url, t.headers, 5000)
      if (answer.status !== 200 || answer.body !== 'ok\n') {
        throw new Error(`${t.name} (${t.url}) answered ${answer.status ?? 'nothing'}: ${JSON.stringify(answer.body.slice(0, 200))}${t === viaGateway ? `\n${gateway.stderr}` : ''}`)
      }
    }

    const serverPids = async (): Promise<number[]> => [...await upstream.pids(), ...await nginx.pids(), ...(gateway.pid === undefined ? [] : [gateway.pid])]
    benchPids = async () => [process.pid, ...await serverPids()]
    if (cpuPlan !== undefined) await pinProcesses(await serverPids(), cpuPlan.servers)
    progress(cpuNote)

    /** Each round runs every path once, one after the other, so that a stretch of noise falls on all of them. */
    const measure = async (what: string, opts: { connections: number, threads: number, durationS: number }): Promise<Array<{ target: Target, r: LoadResult }>> => {
      const runs = new Map<Target, Run[]>(targets.map((t) => [t, []]))
      for (let round = 1; round <= rounds; round++) {
        for (const target of targets) {
          progress(`${target.name}: ${what}${rounds > 1 ? `, round ${round}/${rounds}` : ''}`)
          const run = await load(target, opts)
          runs.get(target)?.push(run)
          const r = summarize([run])
          progress(`  ${r.rps.toFixed(0)} req/s, p50 ${fmtMs(r.p50)} ms, p99 ${fmtMs(r.p99)} ms, wrk ${r.generatorPct.toFixed(0)} % of a core, other processes ${r.othersPct.toFixed(0)} %`)
        }
      }
      return targets.map((target) => ({ target, r: summarize(runs.get(target) ?? []) }))
    }

    if (warmupS > 0) {
      for (const target of targets) {
        progress(`${target.name}: warm-up, ${connections} connections, ${warmupS} s`)
        await load(target, { connections, threads, durationS: warmupS })
      }
    }
    const saturation = await measure(`saturation, ${connections} connections, ${threads} wrk thread(s), ${durationS} s`, { connections, threads, durationS })
    const lowLoad = await measure(`low load, ${lowConnections} connection(s), ${durationS} s`, { connections: lowConnections, threads: 1, durationS })
    return { saturation, lowLoad }
  } finally {
    for (const close of closers.reverse()) await close().catch((err: unknown) => progress(`clean-up: ${message(err)}`))
    rmSync(tempDir, { recursive: true, force: true })
    tempDir = undefined
  }
}

// ---------------------------------------------------------------- from zero

interface FromZeroResults {
  /** From-zero samples in order: the request, and how long the service took to go back to zero before it. */
  cold: Array<{ ms: number, status?: number }>
  warm: number[]
  error?: string
}

const SERVICE = 'hello0'
const IDLE_TO_ZERO_MS = 2000

/**
 * The first request to a service at zero replicas (the gateway holds it while
 * the controller clones a replica) against warm requests, through a real
 * daemon and its gateway.
 */
async function fromZero (): Promise<FromZeroResults> {
  const out: FromZeroResults = { cold: [], warm: [] }
  const ctx = await createTestContext()
  const gatewayPort = await freePort()
  const daemon = await DaemonProcess.create(ctx.dataDir, {
    UIGNITER_SUBNET: '10.249.0.0/24', UIGNITER_LOG_LEVEL: 'warn', UIGNITER_GATEWAY_HTTP_PORT: String(gatewayPort)
  })
  const api = daemon.api
  const url = `http://127.0.0.1:${gatewayPort}/svc/${SERVICE}/`
  const service = async (): Promise<ServiceStatus> => await api.call<ServiceStatus>('GET', `/v1/services/${SERVICE}`)
  /** Polls the service until `check` holds; throws with its last state after `timeoutMs`. */
  const until = async (what: string, check: (s: ServiceStatus) => boolean, timeoutMs: number): Promise<void> => {
    const deadline = Date.now() + timeoutMs
    for (;;) {
      interrupt.check()
      const s = await service()
      if (check(s)) return
      if (Date.now() > deadline) throw new Error(`${SERVICE} never got ${what} within ${timeoutMs} ms: desired ${s.desired}, endpoints ${JSON.stringify(s.endpoints.map((e) => e.health))}, ${s.message ?? ''}`)
      await sleep(100)
    }
  }
  const atZero = (s: ServiceStatus): boolean => s.desired === 0 && s.endpoints.length === 0
  /** QEMU pids seen: a Ctrl-C reaches the daemon too, and then the clean-up cannot ask it for them. */
  const qemuPids = new Set<number>()
  const trackVms = async (): Promise<void> => {
    for (const vm of await api.call<Vm[]>('GET', '/v1/vms?all=true').catch(() => [] as Vm[])) if (vm.pid !== null) qemuPids.add(vm.pid)
  }
  try {
    progress('from zero: building the hello image')
    await ctx.builder.build(JSON.parse(await readFile(exampleSpec('hello'), 'utf8')), join(packageRoot, 'examples', 'hello'))
    progress(`from zero: starting a daemon (gateway on 127.0.0.1:${gatewayPort})`)
    await daemon.start()
    children.push({ killNow: () => { if (daemon.pid !== undefined) try { process.kill(daemon.pid, 'SIGKILL') } catch { /* gone already */ } } })
    await api.call('PUT', `/v1/services/${SERVICE}`, {
      name: SERVICE,
      image: 'hello:latest',
      replicas: { min: 0, max: 1 },
      ports: [{ port: 8080, protocol: 'http' }],
      startPath: 'clone',
      // The scale-down cooldown (default 30 s after a scale-up) would otherwise
      // hold each replica well past its idle time: it is not what is measured.
      autoscale: { idleToZeroMs: IDLE_TO_ZERO_MS, scaleDownCooldownMs: 1000 }
    })
    // The template is made when the service is applied; wait for it, so that every run measures a wake by cloning.
    await until('its template made, at zero', (s) => atZero(s) && s.template !== null, 120_000)
    for (let i = 0; i < fromZeroRuns; i++) {
      interrupt.check()
      const first = await timedGet(url, {}, 120_000)
      out.cold.push({ ms: first.ms, status: first.status })
      await trackVms()
      progress(`from zero ${i + 1}/${fromZeroRuns}: ${first.status ?? 'failed'} in ${first.ms.toFixed(0)} ms${first.status === 200 ? '' : `: ${first.body.slice(0, 200)}`}`)
      if (first.status !== 200) throw new Error(`the request from zero answered ${first.status ?? 'nothing'}: ${first.body.slice(0, 300)}`)
      for (let j = 0; j < 20; j++) {
        const warm = await timedGet(url, {}, 10_000)
        if (warm.status === 200) out.warm.push(warm.ms)
      }
      // Back to zero: idle for IDLE_TO_ZERO_MS, then the controller stops the replica.
      if (i < fromZeroRuns - 1) await until('back to zero', atZero, IDLE_TO_ZERO_MS + 60_000)
    }
  } catch (err) {
    out.error = message(err)
    progress(`from zero: ${out.error}`)
    if (daemon.output !== '') progress(`daemon output (last lines):\n${daemon.output.split('\n').slice(-15).join('\n')}`)
  } finally {
    progress('from zero: cleaning up')
    await api.call('DELETE', `/v1/services/${SERVICE}`).catch(() => {})
    await trackVms()
    await daemon.removeEverything().catch((err: unknown) => progress(`clean-up: ${message(err)}`))
    // A QEMU of this run that outlived its deletion (its command line names this run's data dir).
    for (const pid of qemuPids) {
      const cmdline = await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '')
      if (!cmdline.includes(ctx.dataDir)) continue
      progress(`clean-up: QEMU pid ${pid} outlived its deletion; killing it`)
      try { process.kill(pid, 'SIGKILL') } catch { /* gone meanwhile */ }
    }
    await ctx.cleanup()
  }
  return out
}

// ---------------------------------------------------------------- the run

const fmtMs = (x: number): string => Number.isNaN(x) ? '—' : x < 10 ? x.toFixed(3) : x.toFixed(1)
const pct = (x: number): string => Number.isNaN(x) ? '—' : `${(x * 100).toFixed(0)} %`
const ratio = (a: number, b: number): string => Number.isNaN(a / b) ? '—' : `${(a / b).toFixed(2)}×`
const passMiss = (ok: boolean): string => ok ? '**PASS**' : '**MISS**'

let clkTck = 100
let proxies: ProxyResults | undefined
let proxyError: string | undefined
let zero: FromZeroResults | undefined
try {
  clkTck = Number((await run('getconf', ['CLK_TCK'])).stdout.trim()) || 100
  if (values['no-pin']) {
    cpuNote = 'not pinned (--no-pin): wrk and the servers share every CPU'
  } else {
    const { plan, why } = await planCpus()
    cpuPlan = plan
    cpuNote = plan?.note ?? why ?? ''
  }
  if (!values['skip-proxies']) proxies = await compareProxies()
} catch (err) {
  proxyError = err instanceof Error ? err.message : String(err)
  progress(`proxy comparison failed: ${proxyError}`)
}
if (!values['skip-from-zero'] && !interrupt.interrupted) zero = await fromZero()
progress(`done in ${((performance.now() - began) / 1000).toFixed(0)} s`)

// ---------------------------------------------------------------- the report

const out: string[] = []
const say = (line = ''): void => { out.push(line) }
const nginxVersion = await run('/usr/sbin/nginx', ['-v']).then((r) => (r.stderr || r.stdout).trim().replace(/^nginx version: /, ''), () => 'nginx')
// wrk --version prints to stdout and exits with 1.
const wrkVersion = await run('/usr/bin/wrk', ['--version'], { onFail: (r) => new Error(r.stdout) })
  .then((r) => r.stdout, (err: unknown) => message(err)).then((text) => /^wrk (\S+)/.exec(text)?.[1] ?? '(version unknown)')
say('# The gateway against nginx\n')
say(`${cpus().length} cores, ${(totalmem() / 2 ** 30).toFixed(1)} GiB, Node ${process.version}, ${nginxVersion}, wrk ${wrkVersion}. ` +
  'One upstream (nginx, one worker, `return 200 "ok\\n"`), reached directly, through nginx (one worker, `keepalive 64` to the upstream) ' +
  'and through the gateway (one process, routed by Host header). The load generator is wrk, in its own process, the same settings for each path; ' +
  `${cpuNote}. Latencies are wrk's (microsecond histogram), in ms${rounds > 1 ? '; over several rounds, the median of the rounds\' percentiles' : ''}. ` +
  '"wrk CPU" near 100 % of a core per thread would mean the generator, not the path, is the limit. ' +
  '"Other processes\' CPU" is what the rest of the machine used meanwhile: above a few %, the figures are noisy.\n')
if (proxyError !== undefined) {
  say(`Proxy comparison failed: ${proxyError}\n`)
} else if (proxies !== undefined) {
  const { saturation, lowLoad } = proxies
  const sat = (name: string): LoadResult | undefined => saturation.find((s) => s.target.name === name)?.r
  const perRound = rounds > 1 ? ` per round, ${rounds} rounds (each path once a round)` : ''
  const d = sat('direct to the upstream')
  const g = sat('gateway')
  const n = sat('nginx')
  say(`## Saturation: ${connections} connections, ${threads} wrk thread(s), ${durationS} s${perRound} (after ${warmupS} s of warm-up)\n`)
  say(`Headroom: the direct path answers **${(d?.rps ?? NaN).toFixed(0)} req/s** with this generator, ` +
    `${ratio(d?.rps ?? NaN, n?.rps ?? NaN)} nginx's and ${ratio(d?.rps ?? NaN, g?.rps ?? NaN)} the gateway's throughput: ` +
    'the proxies, not the generator, set their figures.\n')
  say('| path | req/s | p50 ms | p99 ms | non-2xx | socket errors | proxy CPU (% of a core) | wrk CPU (% of a core) | other processes\' CPU (% of a core) |')
  say('|---|---:|---:|---:|---:|---:|---:|---:|---:|')
  for (const { target, r } of saturation) {
    say(`| ${target.name} | ${r.rps.toFixed(0)} | ${fmtMs(r.p50)} | ${fmtMs(r.p99)} | ${r.non2xx} | ${r.errors} | ${Number.isNaN(r.cpuPct) ? '—' : r.cpuPct.toFixed(0)} | ${r.generatorPct.toFixed(0)} | ${r.othersPct.toFixed(0)} |`)
  }
  const share = (g?.rps ?? NaN) / (n?.rps ?? NaN)
  say('')
  say(`Gateway/nginx throughput: **${pct(share)}** (${ratio(g?.rps ?? NaN, n?.rps ?? NaN)}); target ≥ ${pct(TARGET_THROUGHPUT)}: ${passMiss(share >= TARGET_THROUGHPUT)}.\n`)

  const low = (name: string): LoadResult | undefined => lowLoad.find((s) => s.target.name === name)?.r
  const ld = low('direct to the upstream')
  say(`## Latency at low load: ${lowConnections} connection(s), one wrk thread, ${durationS} s${perRound}\n`)
  say(`wrk has no rate limit: this is each path at ${lowConnections === 1 ? 'one request at a time' : `${lowConnections} requests at a time`} ` +
    '(the next sent when the previous is answered), not at a fixed rate; ' +
    `${lowConnections === 1 ? 'no request waits behind another, so the latency is the path\'s own' : 'requests may queue behind each other'}.\n`)
  say('| path | req/s | p50 ms | p99 ms | added p50 ms | added p99 ms | non-2xx | socket errors | other processes\' CPU (% of a core) |')
  say('|---|---:|---:|---:|---:|---:|---:|---:|---:|')
  for (const { target, r } of lowLoad) {
    const isDirect = r === ld
    const added = (x: number, y: number | undefined): string => isDirect ? '—' : fmtMs(x - (y ?? NaN))
    say(`| ${target.name} | ${r.rps.toFixed(0)} | ${fmtMs(r.p50)} | ${fmtMs(r.p99)} | ${added(r.p50, ld?.p50)} | ${added(r.p99, ld?.p99)} | ${r.non2xx} | ${r.errors} | ${r.othersPct.toFixed(0)} |`)
  }
  const addedG = (low('gateway')?.p99 ?? NaN) - (ld?.p99 ?? NaN)
  const addedN = (low('nginx')?.p99 ?? NaN) - (ld?.p99 ?? NaN)
  say('')
  say(`p99 added by the gateway at low load: **${fmtMs(addedG)} ms** (nginx: ${fmtMs(addedN)} ms); target < ${TARGET_ADDED_P99_MS} ms: ${passMiss(addedG < TARGET_ADDED_P99_MS)}.\n`)
}

if (zero !== undefined) {
  say(`## First request from zero (clone path) against a warm request\n`)
  say(`Through a daemon's gateway: service \`${SERVICE}\` (image hello, \`replicas.min 0\`, \`startPath clone\`, \`idleToZeroMs ${IDLE_TO_ZERO_MS}\`, \`scaleDownCooldownMs 1000\`); ` +
    'from zero = a GET while the service has no replica (held by the gateway until a clone serves), after it went back to zero; ' +
    'warm = 20 GETs right after each, each on a new connection.\n')
  if (zero.error !== undefined) say(`Failed: ${zero.error}\n`)
  if (zero.cold.length > 0) {
    const coldMs = zero.cold.filter((c) => c.status === 200).map((c) => c.ms)
    const warmP50 = percentile(zero.warm, 50)
    say('| request | samples | p50 ms | p99 ms | from zero / warm (p50) |')
    say('|---|---:|---:|---:|---:|')
    say(`| from zero | ${coldMs.length} | ${fmtMs(percentile(coldMs, 50))} | ${fmtMs(percentile(coldMs, 99))} | ${ratio(percentile(coldMs, 50), warmP50)} |`)
    say(`| warm | ${zero.warm.length} | ${fmtMs(warmP50)} | ${fmtMs(percentile(zero.warm, 99))} | 1.00× |`)
    say('')
    say(`From-zero samples in order (ms): ${zero.cold.map((c) => `${c.ms.toFixed(0)}${c.status === 200 ? '' : ` (${c.status ?? 'failed'})`}`).join(', ')}.\n`)
  }
}
process.stdout.write(out.join('\n') + '\n')
process.exitCode = proxyError !== undefined || zero?.error !== undefined ? 1 : 0
