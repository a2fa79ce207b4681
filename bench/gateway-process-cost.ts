/**
 * What it would cost to run the gateway (the data plane) in a process of its
 * own, supervised by the daemon, measured in one run on this machine:
 *   - throughput and latency of the same upstream (nginx, one worker,
 *     200 "ok\n"): direct; through the gateway alone in a process (what a
 *     separate data-plane process serves); through the gateway inside a real
 *     daemon (as it runs today, the service an external endpoint); and through
 *     an extra process hop in front of the gateway (our TCP proxy relaying the
 *     bytes to it: the cost of a design where the daemon keeps the listening
 *     sockets and hands the traffic on);
 *   - the control path a separate process adds: a round trip over Node's IPC
 *     channel carrying a setEndpoints (10 endpoints) that the child applies,
 *     p50/p99, and how many a second;
 *   - the memory of that extra process.
 * The load generator is autocannon in its own process (wrk is not
 * installed here), the same settings for each path. Progress goes to
 * stderr, results (markdown) to stdout.
 *   node dist/bench/gateway-process-cost.js [--duration-s 8] [--connections 50] [--rounds 1] [--skip-daemon]
 */
import { spawn, type ChildProcess } from 'node:child_process'
import { once } from 'node:events'
import { mkdtemp, rm } from 'node:fs/promises'
import { cpus, tmpdir } from 'node:os'
import { join } from 'node:path'
import { createInterface } from 'node:readline'
import { fileURLToPath, pathToFileURL } from 'node:url'
import { parseArgs } from 'node:util'
import { waitForAppAnswer } from '../src/core/app-probe.js'
import { freePort } from '../src/core/free-port.js'
import { DaemonProcess } from '../test/helpers/daemon-process.js'
import { packageRoot } from '../test/helpers/fixtures.js'
import { memoryKiB, percentile } from './lib/measure.js'
import { NginxProcess, upstreamConfig } from './lib/nginx.js'

const self = fileURLToPath(import.meta.url)

// ---------------------------------------------------------------- the child: a gateway, driven over IPC

interface ChildArgs { upstreamPort: number, relayTo?: number }

/**
 * `--child gateway`: the gateway with one route, `up` → 127.0.0.1:upstreamPort,
 * taking setEndpoints over IPC and acknowledging each. `--relay-to PORT`:
 * instead, a TCP port of the gateway that relays every connection's bytes to
 * 127.0.0.1:PORT (our TCP proxy as the extra hop). Prints `{"port": N}`.
 */
async function child (args: ChildArgs): Promise<void> {
  const [{ Gateway }, { pino }, { Registry }] = await Promise.all([import('../src/gateway/gateway.js'), import('pino'), import('prom-client')])
  const gateway = new Gateway({ address: '127.0.0.1', httpPort: 0, log: pino({ level: 'warn' }), metrics: new Registry(), wake: () => {} })
  await gateway.listen()
  const hold = { maxRequests: 100, timeoutMs: 5000 }
  const loadBalancing = { strategy: 'round-robin' as const, replicaWeight: 1 }
  let port = gateway.httpPort
  if (args.relayTo !== undefined) {
    port = await freePort()
    await gateway.configure({ service: 'relay', loadBalancing, tcp: [{ gatewayPort: port, port: args.relayTo }], hold })
    gateway.setEndpoints('relay', [{ id: 'gateway', host: '127.0.0.1', weight: 1, priority: 0 }])
  } else {
    await gateway.configure({ service: 'up', loadBalancing, httpPort: args.upstreamPort, tcp: [], hold })
    gateway.setEndpoints('up', [{ id: 'upstream', host: '127.0.0.1', weight: 1, priority: 0 }])
  }
  process.on('message', (m: { op: string, seq: number, endpoints: Array<{ id: string, host: string, weight: number, priority: number }> }) => {
    if (m.op === 'setEndpoints') {
      // The upstream stays among them, so that the route keeps serving.
      gateway.setEndpoints('up', [{ id: 'upstream', host: '127.0.0.1', weight: 1, priority: 0 }, ...m.endpoints])
      process.send?.({ op: 'ack', seq: m.seq, inFlight: gateway.load('up').inFlight })
    }
  })
  process.on('disconnect', () => { void gateway.close().then(() => process.exit(0)) })
  process.stdout.write(JSON.stringify({ port }) + '\n')
}

class ChildGateway {
  private constructor (readonly port: number, readonly proc: ChildProcess) {}

  static async start (args: ChildArgs): Promise<ChildGateway> {
    const argv = [self, '--child', '--upstream-port', String(args.upstreamPort), ...(args.relayTo !== undefined ? ['--relay-to', String(args.relayTo)] : [])]
    const proc = spawn(process.execPath, argv, { stdio: ['ignore', 'pipe', 'inherit', 'ipc'] })
    const lines = createInterface({ input: proc.stdout as NodeJS.ReadableStream })
    const [first] = await Promise.race([
      once(lines, 'line') as Promise<[string]>,
      once(proc, 'exit').then(() => { throw new Error('the gateway child exited at start') })
    ])
    lines.close()
    return new ChildGateway((JSON.parse(first) as { port: number }).port, proc)
  }

  get pid (): number {
    return this.proc.pid ?? 0
  }

  stop (): void {
    if (this.proc.connected) this.proc.disconnect()
    setTimeout(() => this.proc.kill('SIGKILL'), 2000).unref()
  }
}

// ---------------------------------------------------------------- load

interface Load { rps: number, p50: number, p99: number, non2xx: number, errors: number }

/** autocannon in a process of its own, its JSON result. */
async function load (url: string, host: string | undefined, connections: number, durationS: number): Promise<Load> {
  const argv = [join(packageRoot, 'node_modules/autocannon/autocannon.js'), '-j', '-c', String(connections), '-p', '1', '-d', String(durationS), ...(host !== undefined ? ['-H', `host=${host}`] : []), url]
  const proc = spawn(process.execPath, argv, { stdio: ['ignore', 'pipe', 'pipe'] })
  let out = ''
  let err = ''
  proc.stdout.on('data', (c: Buffer) => { out += c.toString() })
  proc.stderr.on('data', (c: Buffer) => { err += c.toString() })
  const [code] = await once(proc, 'exit') as [number | null]
  if (code !== 0) throw new Error(`autocannon exited ${code}: ${err.slice(-500)}`)
  const r = JSON.parse(out) as { requests: { total: number }, duration: number, latency: { p50: number, p99: number }, non2xx: number, errors: number, timeouts: number, '2xx': number }
  return { rps: r['2xx'] / r.duration, p50: r.latency.p50, p99: r.latency.p99, non2xx: r.non2xx, errors: r.errors + r.timeouts }
}

// ---------------------------------------------------------------- the run

async function main (): Promise<void> {
  const { values } = parseArgs({
    options: {
      'duration-s': { type: 'string', default: '8' },
      connections: { type: 'string', default: '50' },
      rounds: { type: 'string', default: '1' },
      'skip-daemon': { type: 'boolean', default: false },
      'ipc-messages': { type: 'string', default: '2000' }
    }
  })
  const durationS = Number(values['duration-s'])
  const connections = Number(values.connections)
  const rounds = Number(values.rounds)
  const ipcMessages = Number(values['ipc-messages'])
  for (const [flag, v] of [['duration-s', durationS], ['connections', connections], ['rounds', rounds], ['ipc-messages', ipcMessages]] as const) {
    if (!Number.isInteger(v) || v < 1) throw new Error(`--${flag} takes a whole number ≥ 1`)
  }
  const began = performance.now()
  const progress = (msg: string): void => { process.stderr.write(`[${((performance.now() - began) / 1000).toFixed(0).padStart(4)} s] ${msg}\n`) }
  const dir = await mkdtemp(join(tmpdir(), 'uigniter-bench-gwproc-'))
  const cleanups: Array<() => Promise<void> | void> = []
  const out: string[] = []
  try {
    const upstreamPort = await freePort()
    const upstream = await NginxProcess.start('upstream', join(dir, 'upstream'), upstreamPort, upstreamConfig(upstreamPort))
    cleanups.push(async () => await upstream.close())
    const gw = await ChildGateway.start({ upstreamPort })
    cleanups.push(() => gw.stop())
    const relay = await ChildGateway.start({ upstreamPort, relayTo: gw.port })
    cleanups.push(() => relay.stop())
    const rssIdle = (await memoryKiB(gw.pid)).rss

    const paths: Array<{ name: string, url: string, host?: string }> = [
      { name: 'direct to the upstream', url: `http://127.0.0.1:${upstreamPort}/` },
      { name: 'gateway, a process of its own', url: `http://127.0.0.1:${gw.port}/`, host: 'up' },
      { name: 'extra hop (TCP relay process) + gateway', url: `http://127.0.0.1:${relay.port}/`, host: 'up' }
    ]
    let daemon: DaemonProcess | undefined
    if (!values['skip-daemon']) {
      progress('starting a daemon (no VM): its gateway routes the external-endpoint service up to the upstream')
      daemon = await DaemonProcess.create(join(dir, 'daemon'), { UIGNITER_SUBNET: `10.236.${Math.floor(Math.random() * 200)}.0/24`, UIGNITER_LOG_LEVEL: 'warn' })
      await daemon.start()
      const d = daemon
      cleanups.push(async () => await d.removeEverything())
      await daemon.api.call('PUT', '/v1/services/up', { name: 'up', replicas: { min: 0 }, ports: [{ port: upstreamPort, protocol: 'http' }], endpoints: [{ host: '127.0.0.1' }] })
      // Routed once the controller told the gateway.
      await waitForAppAnswer({ host: '127.0.0.1', port: daemon.gatewayPort, httpPath: '/', hostHeader: 'up' }, 10_000)
        .catch((err: unknown) => { throw new Error(`the daemon's gateway never routed to the upstream: ${(err as Error).message}`) })
      paths.splice(2, 0, { name: 'gateway inside the daemon (today)', url: `http://127.0.0.1:${daemon.gatewayPort}/`, host: 'up' })
    }

    const results = new Map<string, Load[]>(paths.map((p) => [p.name, []]))
    for (const p of paths) {
      progress(`${p.name}: warm-up`)
      await load(p.url, p.host, connections, 2)
    }
    for (let round = 1; round <= rounds; round++) {
      for (const p of paths) {
        progress(`${p.name}: ${connections} connections, ${durationS} s${rounds > 1 ? `, round ${round}/${rounds}` : ''}`)
        const r = await load(p.url, p.host, connections, durationS)
        progress(`  ${r.rps.toFixed(0)} req/s, p50 ${r.p50} ms, p99 ${r.p99} ms, non-2xx ${r.non2xx}, errors ${r.errors}`)
        results.get(p.name)?.push(r)
      }
    }
    const rssLoaded = (await memoryKiB(gw.pid)).rss
    const daemonRss = daemon?.pid !== undefined ? (await memoryKiB(daemon.pid)).rss : NaN

    progress(`IPC: ${ipcMessages} setEndpoints round trips, one at a time`)
    const endpoints = Array.from({ length: 10 }, (_, i) => ({ id: `vm-${i}`, host: `10.0.0.${i + 2}`, weight: 1, priority: 0 }))
    const rtts: number[] = []
    const t0 = performance.now()
    for (let seq = 0; seq < ipcMessages; seq++) {
      const start = performance.now()
      const acked = new Promise<void>((resolve) => {
        const onMessage = (m: { op: string, seq: number }): void => {
          if (m.op === 'ack' && m.seq === seq) {
            gw.proc.off('message', onMessage)
            resolve()
          }
        }
        gw.proc.on('message', onMessage)
      })
      gw.proc.send({ op: 'setEndpoints', seq, endpoints })
      await acked
      rtts.push((performance.now() - start) * 1000)
    }
    const perSecond = ipcMessages / ((performance.now() - t0) / 1000)

    const avg = (name: string): Load => {
      const rs = results.get(name) ?? []
      const mean = (f: (r: Load) => number): number => rs.reduce((a, r) => a + f(r), 0) / Math.max(1, rs.length)
      return { rps: mean((r) => r.rps), p50: mean((r) => r.p50), p99: mean((r) => r.p99), non2xx: mean((r) => r.non2xx), errors: mean((r) => r.errors) }
    }
    const direct = avg(paths[0]!.name)
    const alone = avg(paths[1]!.name)
    out.push('# The gateway in a process of its own: what it costs\n')
    out.push(`${cpus().length} cores, Node ${process.version}. One upstream (nginx, one worker, \`return 200 "ok\\n"\`); autocannon in its own process, ${connections} connections, pipelining 1, ${durationS} s a path${rounds > 1 ? `, ${rounds} rounds (means)` : ''}, after 2 s of warm-up each.\n`)
    out.push('| path | req/s | p50 ms | p99 ms | non-2xx | errors | / direct | / gateway alone |')
    out.push('|---|---:|---:|---:|---:|---:|---:|---:|')
    for (const p of paths) {
      const r = avg(p.name)
      out.push(`| ${p.name} | ${r.rps.toFixed(0)} | ${r.p50.toFixed(2)} | ${r.p99.toFixed(2)} | ${r.non2xx.toFixed(0)} | ${r.errors.toFixed(0)} | ${(r.rps / direct.rps).toFixed(2)}× | ${(r.rps / alone.rps).toFixed(2)}× |`)
    }
    out.push('')
    out.push(`Control path over Node's IPC channel (setEndpoints of 10 endpoints, applied by the child, acknowledged): p50 **${percentile(rtts, 50).toFixed(0)} µs**, p99 ${percentile(rtts, 99).toFixed(0)} µs, ${perSecond.toFixed(0)} round trips a second one at a time.\n`)
    out.push(`Memory: the gateway's own process ${(rssIdle / 1024).toFixed(0)} MiB RSS idle, ${(rssLoaded / 1024).toFixed(0)} MiB after the load${Number.isNaN(daemonRss) ? '' : `; the whole daemon (API, controllers, gateway) ${(daemonRss / 1024).toFixed(0)} MiB`}.\n`)
  } finally {
    for (const c of cleanups.reverse()) {
      try {
        await c()
      } catch (err) {
        progress(`clean-up: ${err instanceof Error ? err.message : String(err)}`)
      }
    }
    await rm(dir, { recursive: true, force: true })
  }
  process.stdout.write(out.join('\n') + '\n')
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) {
  if (process.argv.includes('--child')) {
    const { values } = parseArgs({ options: { child: { type: 'boolean' }, 'upstream-port': { type: 'string' }, 'relay-to': { type: 'string' } } })
    child({ upstreamPort: Number(values['upstream-port']), relayTo: values['relay-to'] === undefined ? undefined : Number(values['relay-to']) }).catch((err: unknown) => {
      process.stderr.write(`gateway child: ${err instanceof Error ? err.stack ?? err.message : String(err)}\n`)
      process.exit(1)
    })
  } else {
    main().catch((err: unknown) => {
      process.stderr.write(`${err instanceof Error ? err.stack ?? err.message : String(err)}\n`)
      process.exit(1)
    })
  }
}
