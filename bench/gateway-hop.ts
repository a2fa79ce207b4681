/**
 * The latency one hop across nodes adds to a call through the gateway, on
 * this machine, without the cluster's control plane:
 *   - one real Gateway (its own process) routes two services, "local" and
 *     "remote", to an upstream each (nginx, one worker, 200 "ok\n");
 *   - "local" lives in a netns on a bridge of the root netns, as a VM on the
 *     gateway's own node; "remote" lives in a netns behind a second netns
 *     ("node B") that the root netns reaches over a veth underlay and that
 *     forwards to its own bridge, as a VM on another node (HopTopology);
 *   - wrk (its own process, pinned to CPU 0 when there are two; the gateway
 *     and upstreams on the other) loads each path at low load (one
 *     connection: p50/p99 latency) and at saturation (requests/s), through
 *     the gateway and, for reference, straight to the upstream;
 *   - the difference remote − local is the hop's cost.
 * Needs root (netns, veth, bridge). Progress to stderr, results (markdown) to stdout.
 *   node dist/bench/gateway-hop.js [--duration-s 10] [--warmup-s 2]
 *     [--connections 50] [--rounds 1] [--prefix 10.212] [--no-pin]
 */
import { rmSync } from 'node:fs'
import { mkdtemp, readFile } from 'node:fs/promises'
import { cpus, tmpdir } from 'node:os'
import { join } from 'node:path'
import { parseArgs } from 'node:util'
import { run } from '../src/core/exec.js'
import { planCpus, pinProcesses, type CpuPlan } from './lib/cpu-pinning.js'
import { HopTopology } from './lib/hop-topology.js'
import { cpuTicks, percentile } from './lib/measure.js'
import { NetnsNginx } from './lib/netns-nginx.js'
import { procCpuTicks } from './lib/proc-cpu.js'
import { GatewayProcess } from './lib/gateway-process.js'
import { runWrk, type WrkResult } from './lib/wrk.js'
import { Interrupt } from './lib/interrupt.js'

const { values } = parseArgs({
  options: {
    'duration-s': { type: 'string', default: '10' },
    'warmup-s': { type: 'string', default: '2' },
    connections: { type: 'string', default: '50' },
    rounds: { type: 'string', default: '1' },
    prefix: { type: 'string', default: '10.212' },
    'no-pin': { type: 'boolean', default: false }
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
const rounds = wholeNumber('rounds', values.rounds, 1, 100)
const UPSTREAM_PORT = 8080

const began = performance.now()
const progress = (msg: string): void => { process.stderr.write(`[${((performance.now() - began) / 1000).toFixed(0).padStart(4)} s] ${msg}\n`) }
const message = (err: unknown): string => (err instanceof Error ? err.message : String(err)).split('\n')[0] ?? ''

// ---------------------------------------------------------------- what must go, whatever happens

let topology: HopTopology | undefined
let tempDir: string | undefined
let wrkPid: number | undefined
const killers: Array<() => void> = []
process.on('exit', () => {
  if (wrkPid !== undefined) try { process.kill(wrkPid, 'SIGKILL') } catch { /* gone already */ }
  for (const kill of killers) kill()
  try { topology?.destroy() } catch (err) { process.stderr.write(`${message(err)}\n`) }
  if (tempDir !== undefined) rmSync(tempDir, { recursive: true, force: true })
})
const interrupt = new Interrupt(progress)

// ---------------------------------------------------------------- load

interface Path { name: string, url: string, headers?: Record<string, string> }
interface Measured { runs: WrkResult[], gatewayTicks: number, wrkTicks: number, otherTicks: number }

let clkTck = 100
let cpuPlan: CpuPlan | undefined
let cpuNote = ''
/** This benchmark's own processes (this one, the gateway, the upstreams' nginx), whose CPU is not noise. */
let ownPids: () => number[] = () => [process.pid]

/**
 * The machine's CPU time in processes (user, nice, system; /proc/stat), in
 * clock ticks; not irq and softirq, where the kernel charges the benchmark's
 * own veth and bridge traffic.
 */
async function taskTicks (): Promise<number> {
  const line = (await readFile('/proc/stat', 'utf8')).split('\n')[0] ?? ''
  const [user = 0, nice = 0, system = 0] = line.trim().split(/\s+/).slice(1, 4).map(Number)
  return user + nice + system
}

async function ticksOf (pids: number[]): Promise<number> {
  return (await Promise.all(pids.map(async (pid) => await cpuTicks(pid).catch(() => 0)))).reduce((a, b) => a + b, 0)
}

async function load (path: Path, conns: number, seconds: number, gatewayPid: number | undefined): Promise<{ wrk: WrkResult, gatewayTicks: number, wrkTicks: number, otherTicks: number }> {
  interrupt.check()
  const g0 = gatewayPid === undefined ? 0 : await cpuTicks(gatewayPid)
  const w0 = (await procCpuTicks(process.pid))?.children ?? 0
  const [o0, h0] = [await ticksOf(ownPids()), await taskTicks()]
  const wrk = await runWrk({
    url: path.url,
    headers: path.headers,
    threads: 1,
    connections: conns,
    durationS: seconds,
    scriptDir: tempDir ?? tmpdir(),
    cpus: cpuPlan?.generator,
    onStart: (pid) => { wrkPid = pid }
  }).finally(() => { wrkPid = undefined })
  const g1 = gatewayPid === undefined ? 0 : await cpuTicks(gatewayPid)
  const w1 = (await procCpuTicks(process.pid))?.children ?? 0
  const [o1, h1] = [await ticksOf(ownPids()), await taskTicks()]
  return { wrk, gatewayTicks: g1 - g0, wrkTicks: w1 - w0, otherTicks: Math.max(0, (h1 - h0) - (o1 - o0) - (w1 - w0)) }
}

interface Summary { rps: number, p50: number, p99: number, non2xx: number, errors: number, gatewayPct: number, wrkPct: number, othersPct: number }

/** Rates over the summed time; percentiles: the median of the rounds' own. */
function summarize (m: Measured): Summary {
  const seconds = m.runs.reduce((a, r) => a + r.durationS, 0)
  return {
    rps: m.runs.reduce((a, r) => a + r.rps * r.durationS, 0) / seconds,
    p50: percentile(m.runs.map((r) => r.p50Ms), 50),
    p99: percentile(m.runs.map((r) => r.p99Ms), 50),
    non2xx: m.runs.reduce((a, r) => a + r.non2xx, 0),
    errors: m.runs.reduce((a, r) => a + r.errors.connect + r.errors.read + r.errors.write + r.errors.timeout, 0),
    gatewayPct: m.gatewayTicks / clkTck / seconds * 100,
    wrkPct: m.wrkTicks / clkTck / seconds * 100,
    othersPct: m.otherTicks / clkTck / seconds * 100
  }
}

// ---------------------------------------------------------------- the run

interface Results { describe: string, low: Map<string, Summary>, saturated: Map<string, Summary> }

async function measureHop (): Promise<Results> {
  tempDir = await mkdtemp(join(tmpdir(), 'uigniter-bench-hop-'))
  progress('making the namespaces, bridges and veths')
  const t = await HopTopology.create(values.prefix)
  topology = t
  progress(t.describe())
  const closers: Array<() => Promise<void>> = []
  try {
    const local = await NetnsNginx.start(t.localNetns, t.localHost, UPSTREAM_PORT, join(tempDir, 'local'))
    killers.push(() => local.killNow())
    closers.push(async () => await local.close())
    const remote = await NetnsNginx.start(t.remoteNetns, t.remoteHost, UPSTREAM_PORT, join(tempDir, 'remote'))
    killers.push(() => remote.killNow())
    closers.push(async () => await remote.close())
    progress(`upstreams: local ${t.localHost}:${UPSTREAM_PORT}, remote ${t.remoteHost}:${UPSTREAM_PORT}`)
    const gateway = await GatewayProcess.start([
      { service: 'local', host: t.localHost, port: UPSTREAM_PORT },
      { service: 'remote', host: t.remoteHost, port: UPSTREAM_PORT }
    ])
    killers.push(() => gateway.killNow())
    closers.push(async () => await gateway.close())
    progress(`gateway on 127.0.0.1:${gateway.port}`)
    ownPids = () => [process.pid, ...local.pids(), ...remote.pids(), ...(gateway.pid === undefined ? [] : [gateway.pid])]
    if (cpuPlan !== undefined) await pinProcesses(ownPids().slice(1), cpuPlan.servers)
    progress(cpuNote)

    const gw = `http://127.0.0.1:${gateway.port}/`
    const paths: Array<Path & { viaGateway: boolean }> = [
      { name: 'gateway → local', url: gw, headers: { Host: 'local' }, viaGateway: true },
      { name: 'gateway → remote', url: gw, headers: { Host: 'remote' }, viaGateway: true },
      { name: 'direct → local', url: `http://${t.localHost}:${UPSTREAM_PORT}/`, viaGateway: false },
      { name: 'direct → remote', url: `http://${t.remoteHost}:${UPSTREAM_PORT}/`, viaGateway: false }
    ]
    for (const p of paths) {
      // A path that answers nothing but errors would measure the errors.
      const probe = await load(p, 1, 1, undefined)
      if (probe.wrk.requests === 0 || probe.wrk.non2xx > 0) throw new Error(`${p.name} does not answer 200 (${probe.wrk.requests} answers, ${probe.wrk.non2xx} ≥ 400)${p.viaGateway ? `:\n${gateway.stderr}` : ''}`)
    }
    if (warmupS > 0) {
      for (const p of paths) {
        progress(`${p.name}: warm-up, ${connections} connections, ${warmupS} s`)
        await load(p, connections, warmupS, undefined)
      }
    }
    const measure = async (what: string, conns: number): Promise<Map<string, Summary>> => {
      const all = new Map<string, Measured>(paths.map((p) => [p.name, { runs: [], gatewayTicks: 0, wrkTicks: 0, otherTicks: 0 }]))
      // Round by round, every path once, so that a stretch of noise falls on all of them.
      for (let round = 1; round <= rounds; round++) {
        for (const p of paths) {
          progress(`${p.name}: ${what}${rounds > 1 ? `, round ${round}/${rounds}` : ''}`)
          const r = await load(p, conns, durationS, p.viaGateway ? gateway.pid : undefined)
          const m = all.get(p.name)
          if (m !== undefined) { m.runs.push(r.wrk); m.gatewayTicks += r.gatewayTicks; m.wrkTicks += r.wrkTicks; m.otherTicks += r.otherTicks }
          progress(`  ${r.wrk.rps.toFixed(0)} req/s, p50 ${fmtMs(r.wrk.p50Ms)} ms, p99 ${fmtMs(r.wrk.p99Ms)} ms, other processes ${(r.otherTicks / clkTck / r.wrk.durationS * 100).toFixed(0)} % of a core`)
        }
      }
      return new Map([...all].map(([name, m]) => [name, summarize(m)]))
    }
    const low = await measure(`low load, 1 connection, ${durationS} s`, 1)
    const saturated = await measure(`saturation, ${connections} connections, ${durationS} s`, connections)
    return { describe: t.describe(), low, saturated }
  } finally {
    for (const close of closers.reverse()) await close().catch((err: unknown) => progress(`clean-up: ${message(err)}`))
    try { t.destroy() } catch (err) { progress(`clean-up: ${message(err)}`) }
    topology = undefined
    rmSync(tempDir, { recursive: true, force: true })
    tempDir = undefined
  }
}

const fmtMs = (x: number): string => Number.isNaN(x) ? '—' : x < 10 ? x.toFixed(3) : x.toFixed(1)
const signedMs = (x: number): string => Number.isNaN(x) ? '—' : `${x >= 0 ? '+' : ''}${fmtMs(x)}`

let results: Results | undefined
let failure: string | undefined
try {
  if (process.getuid?.() !== 0) throw new Error('this benchmark makes network namespaces, bridges and veths: run it as root')
  clkTck = Number((await run('getconf', ['CLK_TCK'])).stdout.trim()) || 100
  if (values['no-pin']) {
    cpuNote = 'not pinned (--no-pin)'
  } else {
    const { plan, why } = await planCpus()
    cpuPlan = plan
    cpuNote = plan?.note.replace('the proxy and upstream processes', 'the gateway and both upstreams') ?? why ?? ''
  }
  results = await measureHop()
} catch (err) {
  failure = err instanceof Error ? err.message : String(err)
  progress(`failed: ${failure}`)
}
progress(`done in ${((performance.now() - began) / 1000).toFixed(0)} s`)

const out: string[] = []
const say = (line = ''): void => { out.push(line) }
say('# The gateway: one hop across nodes\n')
if (failure !== undefined || results === undefined) {
  say(`Failed: ${failure ?? 'no results'}\n`)
} else {
  const { low, saturated } = results
  say(`${cpus().length} cores, Node ${process.version}. One gateway process (the real Gateway, round-robin, routed by Host) and two upstreams ` +
    `(nginx, one worker, \`return 200 "ok\\n"\`), each in a network namespace: ${results.describe}. ` +
    `The load generator is wrk, in its own process; ${cpuNote}. Latencies are wrk's, in ms; "other processes' CPU" is what the rest of the machine used meanwhile (above a few %, p99 measures that noise)` +
    `${rounds > 1 ? `; ${rounds} rounds (each path once a round), the median of the rounds' percentiles` : ''}.\n`)
  const row = (name: string, s: Summary | undefined, gatewayCpu: boolean): string =>
    s === undefined ? `| ${name} | — |` : `| ${name} | ${s.rps.toFixed(0)} | ${fmtMs(s.p50)} | ${fmtMs(s.p99)} | ${s.non2xx} | ${s.errors} | ${gatewayCpu ? s.gatewayPct.toFixed(0) : '—'} | ${s.wrkPct.toFixed(0)} | ${s.othersPct.toFixed(0)} |`
  const table = (title: string, m: Map<string, Summary>): void => {
    say(`## ${title}\n`)
    say('| path | req/s | p50 ms | p99 ms | non-2xx | socket errors | gateway CPU (% of a core) | wrk CPU (% of a core) | other processes\' CPU (% of a core) |')
    say('|---|---:|---:|---:|---:|---:|---:|---:|---:|')
    for (const [name, s] of m) say(row(name, s, name.startsWith('gateway')))
    say('')
  }
  table(`Low load: 1 connection, one request at a time, ${durationS} s`, low)
  table(`Saturation: ${connections} connections, ${durationS} s (after ${warmupS} s of warm-up)`, saturated)
  /** remote − local of one figure, on one route. */
  const hop = (m: Map<string, Summary>, via: 'gateway' | 'direct', f: (s: Summary) => number): number => {
    const [remote, local] = [m.get(`${via} → remote`), m.get(`${via} → local`)]
    return remote === undefined || local === undefined ? NaN : f(remote) - f(local)
  }
  const share = (via: 'gateway' | 'direct'): number => (saturated.get(`${via} → remote`)?.rps ?? NaN) / (saturated.get(`${via} → local`)?.rps ?? NaN)
  say('## The hop\n')
  say('| | through the gateway | direct (no gateway) |')
  say('|---|---:|---:|')
  say(`| p50 added at low load, ms | **${signedMs(hop(low, 'gateway', (s) => s.p50))}** | ${signedMs(hop(low, 'direct', (s) => s.p50))} |`)
  say(`| p99 added at low load, ms | **${signedMs(hop(low, 'gateway', (s) => s.p99))}** | ${signedMs(hop(low, 'direct', (s) => s.p99))} |`)
  say(`| remote/local throughput at saturation | **${(share('gateway') * 100).toFixed(0)} %** | ${(share('direct') * 100).toFixed(0)} % |`)
  say('')
  say('The hop here is a routed veth pair and a forwarding netns on the same host: it prices the kernel\'s extra forward, ' +
    'not a physical link (no wire, no NIC, no switch); across real nodes add the network\'s own round trip.\n')
}
process.stdout.write(out.join('\n') + '\n')
process.exitCode = failure === undefined ? 0 : 1
