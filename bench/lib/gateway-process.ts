import { spawn, type ChildProcess } from 'node:child_process'
import { once } from 'node:events'
import { createInterface } from 'node:readline'
import { fileURLToPath, pathToFileURL } from 'node:url'
import { parseArgs } from 'node:util'

/**
 * The gateway in a process of its own, for the benchmarks: one route,
 * `service`, whose one endpoint is 127.0.0.1:upstreamPort, with the gateway
 * listening on 127.0.0.1 (a free port). Like nginx, it then has a process
 * (one thread of JavaScript) to itself, apart from the load generator's.
 *
 * This file is both sides: `GatewayProcess.start()` in the benchmark runs
 * this same file as a child, which prints `{"port": N}` once it serves and
 * exits when its stdin closes (the benchmark ended, however it ended).
 */
export class GatewayProcess {
  readonly port: number
  readonly service: string
  #child: ChildProcess
  #stderr: () => string

  private constructor (port: number, service: string, child: ChildProcess, stderr: () => string) {
    this.port = port
    this.service = service
    this.#child = child
    this.#stderr = stderr
  }

  static async start (upstreamPort: number, service = 'up', timeoutMs = 15_000): Promise<GatewayProcess> {
    const child = spawn(process.execPath, [fileURLToPath(import.meta.url), '--upstream-port', String(upstreamPort), '--service', service], {
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
      return new GatewayProcess(port, service, child, () => stderr)
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

/** The child: serve until told to stop, or until the parent is gone. */
async function main (): Promise<void> {
  const { values } = parseArgs({ options: { 'upstream-port': { type: 'string' }, service: { type: 'string', default: 'up' } } })
  const upstreamPort = Number(values['upstream-port'])
  if (!Number.isInteger(upstreamPort) || upstreamPort < 1 || upstreamPort > 65535) throw new Error(`--upstream-port takes a port, not "${values['upstream-port']}"`)
  // Imported here: the parent side needs none of it.
  const [{ Gateway }, { createLogger }, { Registry }] = await Promise.all([
    import('../../src/gateway/gateway.js'), import('../../src/core/logger.js'), import('prom-client')
  ])
  const gateway = new Gateway({
    address: '127.0.0.1',
    httpPort: 0,
    log: createLogger(),
    metrics: new Registry(),
    wake: () => {}
  })
  await gateway.listen()
  await gateway.configure({
    service: values.service,
    loadBalancing: { strategy: 'round-robin', replicaWeight: 1 },
    httpPort: upstreamPort,
    tcp: [],
    hold: { maxRequests: 100, timeoutMs: 5000 }
  })
  gateway.setEndpoints(values.service, [{ id: 'upstream', host: '127.0.0.1', weight: 1, priority: 0 }])
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
