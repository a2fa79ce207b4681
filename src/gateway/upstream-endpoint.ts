import { Agent, type ClientRequestArgs } from 'node:http'
import { createConnection, type Socket } from 'node:net'
import type { Duplex } from 'node:stream'
import type { StrategyEndpoint } from './strategies/strategy.js'

/** Upstream connections per endpoint; past it, requests queue in the agent. */
const MAX_SOCKETS = 256

/**
 * Idle upstream connections are closed after this long: below Node's 5 s
 * default keepAliveTimeout, so that the gateway usually closes first instead
 * of reusing a socket the app is closing (that race is retried anyway).
 */
const IDLE_SOCKET_MS = 4000

/**
 * A keep-alive agent whose connections fail with ETIMEDOUT when they are not
 * established within the connect timeout: net.connect has no such timeout,
 * and a VM that is gone (its address still routed, nobody answering) would
 * otherwise hold a request for the kernel's SYN retries, about two minutes.
 */
class EndpointAgent extends Agent {
  constructor (private readonly connectTimeoutMs: number) {
    super({ keepAlive: true, maxSockets: MAX_SOCKETS, maxFreeSockets: MAX_SOCKETS, scheduling: 'lifo', timeout: IDLE_SOCKET_MS })
  }

  override createConnection (options: ClientRequestArgs, _callback?: (err: Error | null, stream: Duplex) => void): Duplex {
    const socket = createConnection(options as Parameters<typeof createConnection>[0])
    socket.setNoDelay(true)
    armConnectTimeout(socket, this.connectTimeoutMs)
    return socket
  }
}

/** Destroys the socket with an ETIMEDOUT error when it has not connected in time. */
export function armConnectTimeout (socket: Socket, ms: number): void {
  const timer = setTimeout(onConnectTimeout, ms, socket)
  socket.once('connect', () => clearTimeout(timer))
  socket.once('close', () => clearTimeout(timer))
}

function onConnectTimeout (socket: Socket): void {
  if (!socket.connecting) return
  const err = new Error(`connect timed out (${socket.remoteAddress ?? 'endpoint'})`) as NodeJS.ErrnoException
  err.code = 'ETIMEDOUT'
  socket.destroy(err)
}

/**
 * One endpoint of a service as the gateway sees it: its upstream connection
 * pool, what is in flight to it, its latency and its outlier state.
 */
export class UpstreamEndpoint implements StrategyEndpoint {
  readonly agent: Agent
  weight: number
  priority: number
  inFlight = 0
  requests = 0
  failures = 0
  consecutiveFailures = 0
  ewmaMs: number | null = null
  sampledAt = 0
  ejected = false
  timesEjected = 0
  ejectionTimer: NodeJS.Timeout | undefined
  /** In the routable set: takes new requests (ejection aside). */
  routable = true
  /** endpointDied was called: whatever fails on it now is its death, not an outlier. */
  dead = false
  /** TCP proxy connections open to it, to cut them when it dies. */
  readonly connections = new Set<{ destroy: () => void }>()

  constructor (readonly id: string, readonly host: string, weight: number, priority: number, connectTimeoutMs: number) {
    this.weight = weight
    this.priority = priority
    this.agent = new EndpointAgent(connectTimeoutMs)
  }

  /** Folds a response-header latency into the EWMA. */
  sample (ms: number, now: number): void {
    this.ewmaMs = this.ewmaMs === null ? ms : this.ewmaMs + 0.3 * (ms - this.ewmaMs)
    this.sampledAt = now
  }

  /** Cuts everything open to it: upstream HTTP sockets (their requests fail, and are retried) and TCP connections. */
  abortAll (): void {
    this.agent.destroy()
    for (const c of [...this.connections]) c.destroy()
  }

  close (): void {
    clearTimeout(this.ejectionTimer)
    this.agent.destroy()
  }
}
