import { EventEmitter } from 'node:events'
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http'
import type { Socket } from 'node:net'
import type { Registry } from 'prom-client'
import { UigniterError, hasErrno } from '../core/errors.js'
import type { Logger } from '../core/logger.js'
import { SERVICE_NAME } from '../core/service.js'
import { upstreamRequestHead } from './forward-headers.js'
import { sendGatewayError } from './gateway-answer.js'
import { GatewayMetrics } from './gateway-metrics.js'
import type { GatewayEndpoint, GatewayRoute } from './gateway-route.js'
import { GatewayService, type HashOn, type ServiceContext } from './gateway-service.js'
import { HttpExchange } from './http-exchange.js'
import { TcpListener } from './tcp-listener.js'

export type { GatewayEndpoint, GatewayRoute } from './gateway-route.js'

export interface GatewayOptions {
  /** Listen address of HTTP and of every TCP listener. */
  address: string
  /** 0: any free port (read it back from `httpPort` after listen()). */
  httpPort: number
  log: Logger
  /** Where the gateway's metrics are registered (`uigniter_gateway_*`). */
  metrics: Registry
  /** A request or connection arrived for a service without a routable endpoint; called once per such stretch. */
  wake: (service: string) => void
  /** Default 2000. */
  connectTimeoutMs?: number
  /** Defaults: 3 consecutive failures; ejected 5000 ms, doubling at each ejection, up to 60000 ms. */
  outlier?: { consecutiveFailures: number, ejectionMs: number, maxEjectionMs: number }
}

/** What `'ejected'` and `'readmitted'` events carry. */
export interface EndpointEvent {
  service: string
  endpointId: string
  reason: string
}

/** One endpoint's figures, as endpointStats() gives them. */
export interface EndpointStats {
  id: string
  inFlight: number
  requests: number
  failures: number
  ewmaMs: number | null
  ejected: boolean
}


/**
 * The load-balancing gateway: one HTTP port that routes each request by its
 * `/svc/NAME/` prefix or its Host to a service, plus one TCP port per
 * service TCP port; each request or connection goes to an endpoint picked by
 * the service's strategy, is held while the service has none (scale from
 * zero, replacement gaps), and is retried elsewhere when its endpoint fails
 * before answering and it is safe to send again. Endpoints that keep failing
 * are ejected for a while. The service controller tells it the routes
 * (configure, remove) and the routable endpoints (setEndpoints,
 * endpointDied); it tells the controller the load (load, inFlight).
 *
 * Emits `'ejected'` and `'readmitted'` with an {@link EndpointEvent}.
 *
 * @example
 * const gateway = new Gateway({ address: '0.0.0.0', httpPort: 8080, log, metrics: registry, wake: (name) => controller.wake(name) })
 * await gateway.listen()
 * await gateway.configure({ service: 'api', loadBalancing: { strategy: 'round-robin', replicaWeight: 1 }, httpPort: 3000, tcp: [], hold: { maxRequests: 100, timeoutMs: 30000 } })
 * gateway.setEndpoints('api', [{ id: 'vm-1', host: '10.0.0.2', weight: 1, priority: 0 }])
 */
export class Gateway extends EventEmitter {
  private readonly options: GatewayOptions
  private readonly log: Logger
  private readonly server: Server
  private readonly services = new Map<string, GatewayService>()
  private readonly context: ServiceContext
  private readonly metrics: GatewayMetrics
  private unrouted = 0
  private closed = false
  /** configure() and remove() one at a time: each awaits listeners. */
  private serial: Promise<unknown> = Promise.resolve()

  constructor (options: GatewayOptions) {
    super()
    if (!Number.isInteger(options.httpPort) || options.httpPort < 0 || options.httpPort > 65535) throw new RangeError(`invalid gateway httpPort ${options.httpPort}`)
    const outlier = options.outlier ?? { consecutiveFailures: 3, ejectionMs: 5000, maxEjectionMs: 60_000 }
    if (outlier.consecutiveFailures < 1 || outlier.ejectionMs < 0 || outlier.maxEjectionMs < outlier.ejectionMs) throw new RangeError('invalid gateway outlier settings')
    this.options = options
    this.log = options.log.child({ component: 'gateway' })
    this.metrics = new GatewayMetrics(options.metrics, () => this.services.values(), () => this.unrouted)
    this.context = {
      outlier,
      connectTimeoutMs: options.connectTimeoutMs ?? 2000,
      log: this.log,
      durationOf: (service) => this.metrics.durationOf(service),
      wake: options.wake,
      ejected: (service, endpointId, reason) => this.emit('ejected', { service, endpointId, reason } satisfies EndpointEvent),
      readmitted: (service, endpointId, reason) => this.emit('readmitted', { service, endpointId, reason } satisfies EndpointEvent)
    }
    // requestTimeout 0: a held request (up to the hold timeout, minutes) has
    // not been read yet, and Node's default 300 s would cut it.
    this.server = createServer({ requestTimeout: 0, keepAliveTimeout: 65_000, noDelay: true }, (req, res) => this.onRequest(req, res))
    this.server.on('upgrade', (_req: IncomingMessage, socket: Socket) => {
      const body = JSON.stringify(new UigniterError('UIG_ERR_GATEWAY_UPGRADE_UNSUPPORTED', 'the gateway does not proxy protocol upgrades (WebSocket); give the service a tcp port instead').toJSON())
      socket.on('error', () => socket.destroy())
      socket.end(`HTTP/1.1 501 Not Implemented\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`)
    })
  }

  /** The HTTP port it listens on (the real one, once listening on port 0). */
  get httpPort (): number {
    const address = this.server.address()
    return address !== null && typeof address === 'object' ? address.port : this.options.httpPort
  }

  /** Starts the HTTP listener; UIG_ERR_GATEWAY_PORT_IN_USE when the port is taken. */
  async listen (): Promise<void> {
    await new Promise<void>((resolve, reject) => {
      const onError = (err: Error): void => {
        reject(hasErrno(err, 'EADDRINUSE', 'EACCES', 'EADDRNOTAVAIL')
          ? new UigniterError('UIG_ERR_GATEWAY_PORT_IN_USE', `the gateway cannot listen on ${this.options.address}:${this.options.httpPort} (${(err as NodeJS.ErrnoException).code})`, { cause: err })
          : err)
      }
      this.server.once('error', onError)
      this.server.listen(this.options.httpPort, this.options.address, () => {
        this.server.off('error', onError)
        resolve()
      })
    })
    this.server.on('error', (err) => this.log.error({ err }, 'gateway HTTP server error'))
    this.log.info({ address: this.options.address, port: this.httpPort }, 'gateway listening')
  }

  /**
   * Adds or replaces a service's route, opening and closing its TCP
   * listeners to match. When a listener cannot be opened it throws
   * UIG_ERR_GATEWAY_PORT_IN_USE and the previous route stays as it was.
   */
  async configure (route: GatewayRoute): Promise<void> {
    if (!SERVICE_NAME.test(route.service)) throw new UigniterError('UIG_ERR_SERVICE_SPEC_INVALID', `invalid service name ${JSON.stringify(route.service)}`)
    return await this.serialize(async () => {
      if (this.closed) throw new Error('the gateway is closed')
      const existing = this.services.get(route.service)
      const service = existing ?? new GatewayService(route, this.context)
      const opened: TcpListener[] = []
      try {
        for (const { gatewayPort, port } of route.tcp) {
          if (service.listeners.has(gatewayPort) || opened.some((l) => l.gatewayPort === gatewayPort)) continue
          const listener = new TcpListener(service, this.options.address, gatewayPort, port, this.context.connectTimeoutMs)
          await listener.listen()
          opened.push(listener)
        }
      } catch (err) {
        for (const l of opened) l.close()
        if (existing === undefined) service.close()
        throw err
      }
      if (existing === undefined) this.services.set(route.service, service)
      else service.applyRoute(route)
      const wanted = new Map(route.tcp.map((t) => [t.gatewayPort, t.port]))
      for (const [gatewayPort, listener] of service.listeners) {
        const port = wanted.get(gatewayPort)
        if (port === undefined) {
          listener.close()
          service.listeners.delete(gatewayPort)
        } else {
          listener.port = port
        }
      }
      for (const l of opened) service.listeners.set(l.gatewayPort, l)
      this.log.info({ service: route.service, strategy: route.loadBalancing.strategy, httpPort: route.httpPort, tcp: route.tcp }, existing === undefined ? 'gateway route added' : 'gateway route updated')
    })
  }

  /**
   * The routable endpoints of a service (healthy, not draining). One left
   * out takes no new request; those in flight to it finish. Held requests go
   * as soon as there is one. A service not configured yet is ignored.
   */
  setEndpoints (service: string, endpoints: GatewayEndpoint[]): void {
    const s = this.services.get(service)
    if (s === undefined) {
      this.log.warn({ service }, 'endpoints for a service the gateway has no route of; ignored')
      return
    }
    s.setEndpoints(endpoints)
    s.releaseHeld()
  }

  /**
   * The endpoint's VM is gone: its in-flight requests and TCP connections
   * are cut now (its address will never answer again), and the requests
   * that may be sent again are retried on another endpoint.
   */
  endpointDied (service: string, endpointId: string): void {
    this.services.get(service)?.endpointDied(endpointId)
  }

  /** Forgets a service: its TCP listeners close, its held requests get 503, later ones 404. */
  async remove (service: string): Promise<void> {
    await this.serialize(() => {
      const s = this.services.get(service)
      if (s !== undefined) {
        this.services.delete(service)
        this.retire(s, 'removed')
        this.log.info({ service }, 'gateway route removed')
      }
      return Promise.resolve()
    })
  }

  /** The service's load: requests and connections in flight, held, and when the last one arrived (epoch ms, 0: never). */
  load (service: string): { inFlight: number, held: number, lastRequestAt: number } {
    const s = this.services.get(service)
    if (s === undefined) return { inFlight: 0, held: 0, lastRequestAt: 0 }
    return { inFlight: s.inFlight, held: s.held.size, lastRequestAt: s.lastRequestAt }
  }

  /** Requests and TCP connections open to one endpoint (0 once it is idle and forgotten): how draining knows it is done. */
  inFlight (service: string, endpointId: string): number {
    return this.services.get(service)?.endpoints.get(endpointId)?.inFlight ?? 0
  }

  /**
   * Resolves true once no request or TCP connection is in flight to the
   * endpoint (at once when none is, or the gateway does not know it), false
   * when `timeoutMs` passes first: how a drain waits, without polling
   * inFlight().
   */
  async whenIdle (service: string, endpointId: string, timeoutMs: number): Promise<boolean> {
    const ep = this.services.get(service)?.endpoints.get(endpointId)
    return ep === undefined ? true : await ep.whenIdle(timeoutMs)
  }

  /** Figures of each endpoint the service knows, routable or still draining. */
  endpointStats (service: string): EndpointStats[] {
    const s = this.services.get(service)
    if (s === undefined) return []
    return [...s.endpoints.values()].map((e) => ({
      id: e.id, inFlight: e.inFlight, requests: e.requests, failures: e.failures, ewmaMs: e.ewmaMs, ejected: e.ejected
    }))
  }

  /** Stops listening, answers held requests 503 and closes every connection. */
  async close (): Promise<void> {
    if (this.closed) return
    this.closed = true
    await this.serial.catch(() => {})
    for (const s of this.services.values()) this.retire(s, 'closed')
    this.services.clear()
    const closing = this.server.listening
      ? new Promise<void>((resolve) => this.server.close(() => resolve()))
      : Promise.resolve()
    // One turn of the loop first, for the 503s just written to go out.
    await new Promise((resolve) => setImmediate(resolve))
    this.server.closeAllConnections()
    await closing
  }

  private retire (s: GatewayService, reason: 'removed' | 'closed'): void {
    s.removed = true
    for (const l of s.listeners.values()) {
      if (reason === 'closed') l.destroy()
      else l.close()
    }
    s.listeners.clear()
    for (const item of s.held.take()) item.expire(reason)
    s.unrouteAll()
    if (reason === 'closed') s.close()
    this.metrics.forget(s.name)
  }

  private async serialize<T> (fn: () => Promise<T>): Promise<T> {
    const run = this.serial.then(fn, fn)
    this.serial = run.catch(() => {})
    return await run
  }

  /**
   * The request boundary. Nothing the request or its upstream sends can
   * make routing throw; should a bug of ours do it all the same, that one
   * request gets a 500 and a log line, rather than the throw reaching the
   * event loop and ending the process (and every other request, and the
   * daemon's API and controllers with it).
   */
  private onRequest (req: IncomingMessage, res: ServerResponse): void {
    try {
      this.route(req, res)
    } catch (err) {
      this.log.error({ err, url: req.url?.slice(0, 200) }, 'gateway error while routing a request')
      sendGatewayError(res, 'UIG_ERR_INTERNAL', 'the gateway failed while routing the request')
    }
  }

  private route (req: IncomingMessage, res: ServerResponse): void {
    const url = req.url ?? '/'
    let service: GatewayService | undefined
    let path = url
    let prefix: string | undefined
    if (url.startsWith('/svc/')) {
      let end = 5
      while (end < url.length) {
        const c = url.charCodeAt(end)
        if (c === 47 /* / */ || c === 63 /* ? */) break
        end++
      }
      service = this.services.get(url.slice(5, end))
      if (service !== undefined) {
        prefix = url.slice(0, end)
        path = end === url.length ? '/' : url.charCodeAt(end) === 63 ? `/${url.slice(end)}` : url.slice(end)
      }
    }
    if (service === undefined) {
      const host = req.headers.host
      if (host !== undefined) service = this.services.get(firstLabel(host))
    }
    if (service === undefined || service.route.httpPort === undefined) {
      this.unrouted++
      sendGatewayError(res, 'UIG_ERR_GATEWAY_NO_SERVICE', `no service is named by the Host ${JSON.stringify(req.headers.host ?? '')} or a /svc/NAME/ prefix of ${JSON.stringify(url.slice(0, 64))}`)
      return
    }
    service.lastRequestAt = Date.now()
    const headers = req.headers
    const chunked = headers['transfer-encoding'] !== undefined
    const length = headers['content-length']
    const hasBody = chunked || (length !== undefined && length !== '0')
    const key = service.hashOn === undefined ? undefined : hashKey(service.hashOn, req, path)
    const head = upstreamRequestHead(req.method ?? 'GET', path, req.rawHeaders, req.socket.remoteAddress ?? '', chunked, prefix, service.name)
    new HttpExchange(service, req, res, head, hasBody, chunked, key).forward()
  }
}

/** `api.example.com:8080` → `api`. */
function firstLabel (host: string): string {
  let end = 0
  while (end < host.length) {
    const c = host.charCodeAt(end)
    if (c === 46 /* . */ || c === 58 /* : */) break
    end++
  }
  return host.slice(0, end).toLowerCase()
}

/** The consistent-hash key of a request, or undefined when it has none (round robin then). */
function hashKey (on: HashOn, req: IncomingMessage, path: string): string | undefined {
  switch (on.kind) {
    case 'client-address': return req.socket.remoteAddress
    case 'path': {
      const q = path.indexOf('?')
      return q < 0 ? path : path.slice(0, q)
    }
    case 'header': {
      const v = req.headers[on.name]
      return Array.isArray(v) ? v.join(',') : v
    }
    case 'cookie': {
      const cookie = req.headers.cookie
      if (cookie === undefined) return undefined
      for (const part of cookie.split(';')) {
        const eq = part.indexOf('=')
        if (eq > 0 && part.slice(0, eq).trim() === on.name) return part.slice(eq + 1).trim()
      }
      return undefined
    }
  }
}
