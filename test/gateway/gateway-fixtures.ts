import { once } from 'node:events'
import { Agent, createServer, request, type IncomingHttpHeaders, type IncomingMessage, type Server, type ServerResponse } from 'node:http'
import { createServer as createTcpServer, type Server as TcpServer, type Socket } from 'node:net'
import type { TestContext } from 'node:test'
import { pino } from 'pino'
import { Registry } from 'prom-client'
import type { StrategyName } from '../../src/core/service.js'
import { Gateway, type GatewayEndpoint, type GatewayOptions, type GatewayRoute } from '../../src/gateway/gateway.js'

/**
 * Upstreams are real servers on distinct loopback addresses (127.0.0.X) and
 * one common port, as a service's VMs are: one address each, the same port.
 */
export interface Upstream {
  id: string
  host: string
  server: Server | TcpServer
  /** Requests (or connections) it received. */
  hits: number
}

export type Handler = (upstream: Upstream, req: IncomingMessage, res: ServerResponse) => void

/** Answers its own id. */
export const answerId: Handler = (u, req, res) => {
  req.resume()
  res.writeHead(200, { 'content-type': 'text/plain' })
  res.end(u.id)
}

let nextHost = 10 + Math.floor(Math.random() * 200)

function hostBlock (n: number): number {
  if (nextHost + n > 250) nextHost = 10
  const first = nextHost
  nextHost += n
  return first
}

/** n upstreams (ids u0, u1 ...) on 127.0.0.X:port, all with the same port; closed after the test. */
export async function startHttpUpstreams (t: TestContext, n: number, handler: Handler = answerId): Promise<{ port: number, upstreams: Upstream[] }> {
  return await startUpstreams(t, n, (u) => createServer((req, res) => {
    u.hits++
    handler(u, req, res)
  }))
}

/** n TCP upstreams; the default one echoes, prefixed with its id on connect. */
export async function startTcpUpstreams (t: TestContext, n: number, onConnection?: (u: Upstream, socket: Socket) => void): Promise<{ port: number, upstreams: Upstream[] }> {
  return await startUpstreams(t, n, (u) => createTcpServer({ allowHalfOpen: true }, (socket) => {
    u.hits++
    socket.on('error', () => socket.destroy())
    if (onConnection !== undefined) {
      onConnection(u, socket)
      return
    }
    socket.write(`${u.id}:`)
    socket.pipe(socket)
  }))
}

async function startUpstreams (t: TestContext, n: number, make: (u: Upstream) => Server | TcpServer): Promise<{ port: number, upstreams: Upstream[] }> {
  for (let attempt = 0; ; attempt++) {
    const base = hostBlock(n)
    const upstreams: Upstream[] = []
    let port = 0
    try {
      for (let i = 0; i < n; i++) {
        const u: Upstream = { id: `u${i}`, host: `127.0.0.${base + i}`, hits: 0, server: undefined as unknown as Server }
        u.server = make(u)
        upstreams.push(u)
        u.server.listen(port, u.host)
        await once(u.server, 'listening')
        const address = u.server.address()
        if (port === 0 && address !== null && typeof address === 'object') port = address.port
      }
      t.after(() => closeUpstreams(upstreams))
      return { port, upstreams }
    } catch (err) {
      closeUpstreams(upstreams)
      if (attempt > 5) throw err
    }
  }
}

function closeUpstreams (upstreams: Upstream[]): void {
  for (const u of upstreams) {
    const s = u.server as Server
    s.close()
    if (typeof s.closeAllConnections === 'function') s.closeAllConnections()
  }
}

/** Closes one upstream now (its port then refuses connections). */
export async function stopUpstream (u: Upstream): Promise<void> {
  const s = u.server as Server
  const closed = once(s, 'close')
  s.close()
  if (typeof s.closeAllConnections === 'function') s.closeAllConnections()
  await closed
}

export function endpointsOf (upstreams: Upstream[], extra: Partial<GatewayEndpoint> = {}): GatewayEndpoint[] {
  return upstreams.map((u) => ({ id: u.id, host: u.host, weight: 1, priority: 0, ...extra }))
}

export function routeFor (service: string, httpPort: number | undefined, strategy: StrategyName = 'round-robin', more: Partial<GatewayRoute> = {}): GatewayRoute {
  return {
    service,
    loadBalancing: { strategy, replicaWeight: 1 },
    httpPort,
    tcp: [],
    hold: { maxRequests: 100, timeoutMs: 5000 },
    ...more
  }
}

export interface TestGateway {
  gateway: Gateway
  registry: Registry
  woken: string[]
  port: number
}

/** A listening gateway on 127.0.0.1:0, closed after the test. */
export async function startGateway (t: TestContext, options: Partial<GatewayOptions> = {}): Promise<TestGateway> {
  const registry = new Registry()
  const woken: string[] = []
  const gateway = new Gateway({
    address: '127.0.0.1',
    httpPort: 0,
    log: pino({ level: 'silent' }),
    metrics: registry,
    wake: (service) => woken.push(service),
    ...options
  })
  await gateway.listen()
  t.after(() => gateway.close())
  return { gateway, registry, woken, port: gateway.httpPort }
}

/** A gateway with one service routed to the upstreams. */
export async function gatewayFor (t: TestContext, upstreamPort: number, upstreams: Upstream[], strategy: StrategyName = 'round-robin',
  options: Partial<GatewayOptions> = {}, route: Partial<GatewayRoute> = {}): Promise<TestGateway> {
  const g = await startGateway(t, options)
  await g.gateway.configure(routeFor('api', upstreamPort, strategy, route))
  g.gateway.setEndpoints('api', endpointsOf(upstreams))
  return g
}

export interface Answer {
  status: number
  headers: IncomingHttpHeaders
  body: string
  raw: Buffer
}

const agent = new Agent({ keepAlive: true, maxSockets: 64 })

/** One request through the gateway (Host `api` unless told otherwise). */
export async function send (port: number, path = '/', options: { method?: string, headers?: Record<string, string | string[]>, body?: string | Buffer, agent?: Agent | false } = {}): Promise<Answer> {
  return await new Promise((resolve, reject) => {
    const req = request({
      host: '127.0.0.1',
      port,
      path,
      method: options.method ?? 'GET',
      headers: { host: 'api', ...options.headers },
      agent: options.agent ?? agent
    }, (res) => {
      const chunks: Buffer[] = []
      res.on('data', (c: Buffer) => chunks.push(c))
      res.on('end', () => {
        const raw = Buffer.concat(chunks)
        resolve({ status: res.statusCode ?? 0, headers: res.headers, body: raw.toString(), raw })
      })
      res.on('error', reject)
    })
    req.on('error', reject)
    req.end(options.body)
  })
}

/** How many of `n` sequential GETs each upstream answered. */
export async function tally (port: number, n: number, path = '/', headers: Record<string, string> = {}): Promise<Map<string, number>> {
  const counts = new Map<string, number>()
  for (let i = 0; i < n; i++) {
    const a = await send(port, path, { headers })
    if (a.status !== 200) throw new Error(`request ${i}: ${a.status} ${a.body}`)
    counts.set(a.body, (counts.get(a.body) ?? 0) + 1)
  }
  return counts
}

/** Waits for a condition, polling, up to a deadline. */
export async function until (what: string, condition: () => boolean, timeoutMs = 3000): Promise<void> {
  const deadline = Date.now() + timeoutMs
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await new Promise((resolve) => setTimeout(resolve, 5))
  }
}

/** The gateway's own error answer. */
export interface ErrorBody {
  code: string
  message: string
  statusCode: number
}

export function jsonBody<T = ErrorBody> (a: Answer): T {
  return JSON.parse(a.body) as T
}
