/**
 * The gateway against nginx, in one run, on this machine:
 *   - the same upstream (an nginx with one worker answering 200 "ok\n") behind
 *     nginx (one worker, keepalive to the upstream) and behind our gateway
 *     (one process), and reached directly, all three loaded by the same
 *     generator (autocannon, in this process) with the same settings;
 *   - at saturation (N connections, pipelining 1): requests per second, p50
 *     and p99 latency, and the proxies' CPU; the gateway/nginx throughput ratio
 *     (target ≥ 60 %);
 *   - below saturation (a fixed rate, by default 30 % of the slower proxy's
 *     throughput just measured): p50 and p99 latency of each path, and the latency each
 *     proxy adds to the direct path (target: the gateway adds < 1 ms of p99);
 *   - then, through a real daemon, the first request to a service scaled to
 *     zero (held by the gateway while a clone starts) against warm requests.
 * Progress goes to stderr, results (markdown) to stdout.
 *   node dist/bench/gateway-vs-nginx.js [--duration-s 10] [--warmup-s 2]
 *     [--connections 50] [--rate R] [--rate-connections 1] [--rounds 1]
 *     [--skip-from-zero] [--from-zero-runs 5] [--skip-proxies]
 */
import autocannon from 'autocannon'
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
import { GatewayProcess } from './lib/gateway-process.js'
import { cpuTicks, percentile } from './lib/measure.js'
import { NginxProcess, proxyConfig, upstreamConfig } from './lib/nginx.js'

// ---------------------------------------------------------------- flags

const { values } = parseArgs({
  options: {
    'duration-s': { type: 'string', default: '10' },
    'warmup-s': { type: 'string', default: '2' },
    connections: { type: 'string', default: '50' },
    rate: { type: 'string' },
    'rate-connections': { type: 'string', default: '1' },
    rounds: { type: 'string', default: '1' },
    'skip-from-zero': { type: 'boolean', default: false },
    'skip-proxies': { type: 'boolean', default: false },
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
const fixedRate = values.rate === undefined ? undefined : wholeNumber('rate', values.rate, 1, 10_000_000)
const rateConnections = wholeNumber('rate-connections', values['rate-connections'], 1, 1000)
const rounds = wholeNumber('rounds', values.rounds, 1, 100)
const fromZeroRuns = wholeNumber('from-zero-runs', values['from-zero-runs'], 1, 50)
/** Share of the slower proxy's saturated throughput the below-saturation run offers, when --rate is not given. */
const RATE_SHARE = 0.3
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
process.on('exit', () => {
  for (const child of children) child.killNow()
  if (tempDir !== undefined) rmSync(tempDir, { recursive: true, force: true })
})
/** Set by SIGINT/SIGTERM: the run stops at the next step and cleans up in its finally blocks. */
let interrupted = false
for (const signal of ['SIGINT', 'SIGTERM'] as const) {
  process.on(signal, () => {
    if (interrupted) process.exit(130) // a second signal: no more waiting
    interrupted = true
    progress(`${signal}: stopping after this step (again to stop now)`)
  })
}
const checkInterrupted = (): void => { if (interrupted) throw new Error('interrupted') }

// ---------------------------------------------------------------- load

/** A path to load; `pids`: the processes of the path's proxy, whose CPU is measured. */
interface Target { name: string, url: string, headers?: Record<string, string>, pids: () => number[] | Promise<number[]> }

interface LoadResult {
  /** 2xx answers per second over the run(s). */
  rps: number
  /** Latency of 2xx answers, ms (nearest-rank, from autocannon's per-response timings, sub-ms resolution). */
  p50: number
  p99: number
  ok: number
  non2xx: number
  errors: number
  durationS: number
  /** CPU the path's proxy used, in % of one core; NaN when not measured. */
  cpuPct: number
  /** CPU that processes other than this benchmark's used meanwhile, in % of one core: the noise. */
  othersPct: number
}

/** What one autocannon run gives, before runs are merged. */
interface Run { latencies: number[], seconds: number, non2xx: number, errors: number, proxyTicks: number | undefined, otherTicks: number }

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

/** Every process of this benchmark (the load generator, the upstream, the proxies): set once they run. */
let benchPids: () => Promise<number[]> = async () => await Promise.resolve([process.pid])

/**
 * One autocannon run. Latencies come from its per-response timings
 * (process.hrtime, in ms with decimals): its own histogram counts whole
 * milliseconds, too coarse for a sub-millisecond difference.
 */
async function load (target: Target, opts: { connections: number, durationS: number, overallRate?: number }): Promise<Run> {
  checkInterrupted()
  const latencies: number[] = []
  const pids = await target.pids()
  const ours = await benchPids()
  const [p0, o0, h0] = [await ticksOf(pids), await ticksOf(ours), await taskTicks()]
  const result = await new Promise<autocannon.Result>((resolve, reject) => {
    const instance = autocannon({
      url: target.url,
      headers: target.headers,
      connections: opts.connections,
      pipelining: 1,
      duration: opts.durationS,
      timeout: 10,
      ...(opts.overallRate !== undefined ? { overallRate: opts.overallRate } : {})
    }, (err: unknown, res: autocannon.Result) => { if (err !== null && err !== undefined) reject(err instanceof Error ? err : new Error('autocannon failed', { cause: err })); else resolve(res) })
    instance.on('response', (_client: unknown, statusCode: number, _bytes: number, ms: number) => {
      if (statusCode >= 200 && statusCode < 300) latencies.push(ms)
    })
  })
  const [p1, o1, h1] = [await ticksOf(pids), await ticksOf(ours), await taskTicks()]
  return {
    latencies,
    // autocannon's duration is in seconds, with decimals.
    seconds: result.duration,
    non2xx: result.non2xx,
    errors: result.errors + result.timeouts,
    proxyTicks: pids.length === 0 ? undefined : p1 - p0,
    otherTicks: Math.max(0, (h1 - h0) - (o1 - o0))
  }
}

/** Runs of one path merged: their samples pooled, their rates over their summed time. */
function summarize (runs: Run[]): LoadResult {
  const latencies = runs.flatMap((r) => r.latencies)
  const seconds = runs.reduce((a, r) => a + r.seconds, 0)
  const sum = (f: (r: Run) => number): number => runs.reduce((a, r) => a + f(r), 0)
  const pctOfCore = (ticks: number): number => ticks / clkTck / seconds * 100
  return {
    rps: latencies.length / seconds,
    p50: percentile(latencies, 50),
    p99: percentile(latencies, 99),
    ok: latencies.length,
    non2xx: sum((r) => r.non2xx),
    errors: sum((r) => r.errors),
    durationS: seconds,
    cpuPct: runs.some((r) => r.proxyTicks === undefined) ? NaN : pctOfCore(sum((r) => r.proxyTicks ?? 0)),
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
  rate: number
  belowSaturation: Array<{ target: Target, r: LoadResult }>
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
    const gateway = await GatewayProcess.start(upstreamPort, 'up')
    children.push(gateway)
    closers.push(async () => await gateway.close())
    progress(`gateway on 127.0.0.1:${gateway.port}`)

    const direct: Target = { name: 'direct to the upstream', url: `http://127.0.0.1:${upstreamPort}/`, pids: () => [] }
    const viaNginx: Target = { name: 'nginx', url: `http://127.0.0.1:${proxyPort}/`, pids: async () => (await nginx.pids()).slice(1) }
    // Routed by Host header, as a service calls another by name.
    const viaGateway: Target = { name: 'gateway', url: `http://127.0.0.1:${gateway.port}/`, headers: { host: gateway.service }, pids: () => gateway.pid === undefined ? [] : [gateway.pid] }
    const targets = [direct, viaNginx, viaGateway]
    for (const t of targets) {
      const answer = await timedGet(t.url, t.headers, 5000)
      if (answer.status !== 200 || answer.body !== 'ok\n') {
        throw new Error(`${t.name} (${t.url}) answered ${answer.status ?? 'nothing'}: ${JSON.stringify(answer.body.slice(0, 200))}${t === viaGateway ? `\n${gateway.stderr}` : ''}`)
      }
    }

    benchPids = async () => [process.pid, ...await upstream.pids(), ...await nginx.pids(), ...(gateway.pid === undefined ? [] : [gateway.pid])]

    /** Each round runs every path once, one after the other, so that a stretch of noise falls on all of them. */
    const measure = async (what: string, opts: { connections: number, durationS: number, overallRate?: number }): Promise<Array<{ target: Target, r: LoadResult }>> => {
      const runs = new Map<Target, Run[]>(targets.map((t) => [t, []]))
      for (let round = 1; round <= rounds; round++) {
        for (const target of targets) {
          progress(`${target.name}: ${what}${rounds > 1 ? `, round ${round}/${rounds}` : ''}`)
          const run = await load(target, opts)
          runs.get(target)?.push(run)
          const r = summarize([run])
          progress(`  ${r.rps.toFixed(0)} req/s, p50 ${fmtMs(r.p50)} ms, p99 ${fmtMs(r.p99)} ms, other processes ${r.othersPct.toFixed(0)} % of a core`)
        }
      }
      return targets.map((target) => ({ target, r: summarize(runs.get(target) ?? []) }))
    }

    if (warmupS > 0) {
      for (const target of targets) {
        progress(`${target.name}: warm-up, ${connections} connections, ${warmupS} s`)
        await load(target, { connections, durationS: warmupS })
      }
    }
    const saturation = await measure(`saturation, ${connections} connections, ${durationS} s`, { connections, durationS })
    // Below the saturation of both proxies: past the gateway's, the rate would measure its queue, not its latency.
    const slower = Math.min(...saturation.filter((s) => s.target !== direct).map((s) => s.r.rps))
    const rate = fixedRate ?? Math.max(1, Math.round(slower * RATE_SHARE))
    const belowSaturation = await measure(`${rate} req/s on ${rateConnections} connection(s), ${durationS} s`, { connections: rateConnections, durationS, overallRate: rate })
    return { saturation, rate, belowSaturation }
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
      checkInterrupted()
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
      checkInterrupted()
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
const met = (ok: boolean): string => ok ? '**met**' : '**not met**'

let clkTck = 100
let proxies: ProxyResults | undefined
let proxyError: string | undefined
let zero: FromZeroResults | undefined
try {
  clkTck = Number((await run('getconf', ['CLK_TCK'])).stdout.trim()) || 100
  if (!values['skip-proxies']) proxies = await compareProxies()
} catch (err) {
  proxyError = err instanceof Error ? err.message : String(err)
  progress(`proxy comparison failed: ${proxyError}`)
}
if (!values['skip-from-zero'] && !interrupted) zero = await fromZero()
progress(`done in ${((performance.now() - began) / 1000).toFixed(0)} s`)

// ---------------------------------------------------------------- the report

const out: string[] = []
const say = (line = ''): void => { out.push(line) }
const nginxVersion = await run('/usr/sbin/nginx', ['-v']).then((r) => (r.stderr || r.stdout).trim().replace(/^nginx version: /, ''), () => 'nginx')
say('# The gateway against nginx\n')
say(`${cpus().length} cores, ${(totalmem() / 2 ** 30).toFixed(1)} GiB, Node ${process.version}, ${nginxVersion}. ` +
  'One upstream (nginx, one worker, `return 200 "ok\\n"`), reached directly, through nginx (one worker, `keepalive 64` to the upstream) ' +
  'and through the gateway (one process, routed by Host header); the load generator is autocannon in the benchmark\'s process, the same settings for each. ' +
  'Latencies are autocannon\'s per-response timings, nearest-rank percentiles, in ms. ' +
  '"Other processes\' CPU" is what the rest of the machine used meanwhile: above a few %, the figures are noisy.\n')
if (proxyError !== undefined) {
  say(`Proxy comparison failed: ${proxyError}\n`)
} else if (proxies !== undefined) {
  const { saturation, belowSaturation, rate } = proxies
  const sat = (name: string): LoadResult | undefined => saturation.find((s) => s.target.name === name)?.r
  const perRound = rounds > 1 ? ` per round, ${rounds} rounds (each path once a round)` : ''
  say(`## Saturation: ${connections} connections, pipelining 1, ${durationS} s${perRound} (after ${warmupS} s of warm-up)\n`)
  say('| path | req/s | p50 ms | p99 ms | non-2xx | errors | proxy CPU (% of a core) | other processes\' CPU (% of a core) |')
  say('|---|---:|---:|---:|---:|---:|---:|---:|')
  for (const { target, r } of saturation) {
    say(`| ${target.name} | ${r.rps.toFixed(0)} | ${fmtMs(r.p50)} | ${fmtMs(r.p99)} | ${r.non2xx} | ${r.errors} | ${Number.isNaN(r.cpuPct) ? '—' : r.cpuPct.toFixed(0)} | ${r.othersPct.toFixed(0)} |`)
  }
  const g = sat('gateway')
  const n = sat('nginx')
  const share = (g?.rps ?? NaN) / (n?.rps ?? NaN)
  say('')
  say(`Gateway/nginx throughput: **${pct(share)}** (${ratio(g?.rps ?? NaN, n?.rps ?? NaN)}); target ≥ ${pct(TARGET_THROUGHPUT)}: ${met(share >= TARGET_THROUGHPUT)}.\n`)

  const bs = (name: string): LoadResult | undefined => belowSaturation.find((s) => s.target.name === name)?.r
  const d = bs('direct to the upstream')
  say(`## Below saturation: ${rate} req/s${fixedRate === undefined ? ` (${pct(RATE_SHARE)} of the slower proxy's saturated throughput)` : ''} on ${rateConnections} connection(s), ${durationS} s${perRound}\n`)
  say('autocannon paces each connection per second: it sends back to back until its share of the second is done, then waits; ' +
    'so on one connection no request waits behind another, and the latency is the path\'s own.\n')
  say('| path | req/s achieved | p50 ms | p99 ms | added p50 ms | added p99 ms | non-2xx | errors | other processes\' CPU (% of a core) |')
  say('|---|---:|---:|---:|---:|---:|---:|---:|---:|')
  for (const { target, r } of belowSaturation) {
    const isDirect = r === d
    const added = (x: number, y: number | undefined): string => isDirect ? '—' : fmtMs(x - (y ?? NaN))
    say(`| ${target.name} | ${r.rps.toFixed(0)}${r.rps < rate * 0.9 ? ' (short of the rate)' : ''} | ${fmtMs(r.p50)} | ${fmtMs(r.p99)} | ${added(r.p50, d?.p50)} | ${added(r.p99, d?.p99)} | ${r.non2xx} | ${r.errors} | ${r.othersPct.toFixed(0)} |`)
  }
  const addedG = (bs('gateway')?.p99 ?? NaN) - (d?.p99 ?? NaN)
  const addedN = (bs('nginx')?.p99 ?? NaN) - (d?.p99 ?? NaN)
  say('')
  say(`p99 added by the gateway: **${fmtMs(addedG)} ms** (nginx: ${fmtMs(addedN)} ms); target < ${TARGET_ADDED_P99_MS} ms: ${met(addedG < TARGET_ADDED_P99_MS)}.\n`)
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
