import { spawn, type ChildProcess } from 'node:child_process'
import { once } from 'node:events'
import { createInterface } from 'node:readline'
import { fileURLToPath, pathToFileURL } from 'node:url'
import { parseArgs } from 'node:util'

/**
 * The real Gateway in a process of its own, for the benchmarks, with one or
 * more routes, each to one endpoint at any address (an upstream on loopback,
 * a VM on its own bridge, one behind another node). Listens on 127.0.0.1 (a
 * free port); routes by Host. Like nginx, it then has a process (one thread
 * of JavaScript) to itself, apart from the load generator's.
 *
 * This file is both sides: the child prints `{"port": N}`
 * once it serves and exits when its stdin closes.
 */
export interface GatewayRouteTo { service: string, host: string, port: number }

export class GatewayProcess {
  readonly port: number
  readonly routes: GatewayRouteTo[]
  #child: ChildProcess
  #stderr: () => string

  private constructor (port: number, routes: GatewayRouteTo[], child: ChildProcess, stderr: () => string) {
    this.port = port
    this.routes = routes
    this.#child = child
    this.#stderr = stderr
  }

  static async start (routes: GatewayRouteTo[], timeoutMs = 15_000): Promise<GatewayProcess> {
    if (routes.length === 0) throw new RangeError('a gateway process needs at least one route')
    const args = routes.flatMap((r) => ['--route', `${r.service}=${r.host}:${r.port}`])
    const child = spawn(process.execPath, [fileURLToPath(import.meta.url), ...args], {
      stdio: ['pipe', 'pipe', 'pipe'],
      env: { ...process.env, UIGNITER_LOG_LEVEL: process.env.UIGNITER_LOG_LEVEL ?? 'warn' }
    })
    let stderr = ''
    child.stderr?.on('data', (c: Buffer) => { stderr = (stderr + c.toString()).slice(-4000) })
    const lines = createInterface({ input: child.stdout })
    let timedOut = false
    const timer = setTimeout(() => { timedOut = true; child.kill('SIGKILL') }, timeoutMs)
    try {
      const [first] = await Promise.race([
        once(lines, 'line') as Promise<[string]>,
        once(child, 'close').then(() => { throw new Error(`the gateway process exited at start:\n${stderr}`) })
      ])
      const { port } = JSON.parse(first) as { port: number }
      return new GatewayProcess(port, routes, child, () => stderr)
    } catch (err) {
      child.kill('SIGKILL')
      if (timedOut) throw new Error(`the gateway process did not start within ${timeoutMs} ms:\n${stderr}`)
      throw err
    } finally {
      clearTimeout(timer)
      lines.close()
    }
  }

  get pid (): number | undefined {
    return this.#child.pid
  }

  /** The child's last words on stderr. */
  get stderr (): string {
    return this.#stderr()
  }

  /** SIGTERM (the gateway closes), then SIGKILL after a deadline. */
  async close (timeoutMs = 3000): Promise<void> {
    const child = this.#child
    if (child.exitCode !== null || child.signalCode !== null) return
    const closed = once(child, 'close')
    child.kill('SIGTERM')
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs)
    await closed
    clearTimeout(timer)
  }

  /** For process 'exit' handlers: SIGKILL now. */
  killNow (): void {
    if (this.#child.exitCode === null) this.#child.kill('SIGKILL')
  }
}

/** `NAME=HOST:PORT` into a route; throws on anything else. */
export function parseRoute (text: string): GatewayRouteTo {
  const m = /^([^=]+)=(\d{1,3}(?:\.\d{1,3}){3}):(\d{1,5})$/.exec(text)
  const port = Number(m?.[3])
  if (m === null || m[1] === undefined || m[2] === undefined || port < 1 || port > 65535) throw new Error(`--route takes NAME=IPV4:PORT, not "${text}"`)
  return { service: m[1], host: m[2], port }
}

/** The child: serve until told to stop, or until the parent is gone. */
async function main (): Promise<void> {
  const { values } = parseArgs({ options: { route: { type: 'string', multiple: true, default: [] } } })
  const routes = values.route.map(parseRoute)
  // Imported here: the parent side needs none of it.
  const [{ Gateway }, { createLogger }, { Registry }] = await Promise.all([
    import('../../src/gateway/gateway.js'), import('../../src/core/logger.js'), import('prom-client')
  ])
  const gateway = new Gateway({ address: '127.0.0.1', httpPort: 0, log: createLogger(), metrics: new Registry(), wake: () => {} })
  await gateway.listen()
  for (const r of routes) {
    await gateway.configure({
      service: r.service,
      loadBalancing: { strategy: 'round-robin', replicaWeight: 1 },
      httpPort: r.port,
      tcp: [],
      hold: { maxRequests: 100, timeoutMs: 5000 }
    })
    gateway.setEndpoints(r.service, [{ id: `external:${r.host}`, host: r.host, weight: 1, priority: 0 }])
  }
  let closing = false
  const stop = (): void => {
    if (closing) return
    closing = true
    gateway.close().then(() => process.exit(0), () => process.exit(1))
  }
  process.once('SIGTERM', stop)
  process.once('SIGINT', stop)
  process.stdin.on('end', stop)
  process.stdin.on('close', stop)
  process.stdin.resume()
  process.stdout.write(JSON.stringify({ port: gateway.httpPort }) + '\n')
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) {
  main().catch((err: unknown) => {
    process.stderr.write(`gateway process: ${err instanceof Error ? err.stack ?? err.message : String(err)}\n`)
    process.exit(1)
  })
}
