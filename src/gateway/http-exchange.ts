import type { IncomingMessage, ServerResponse } from 'node:http'
import { sendGatewayError } from './gateway-answer.js'
import type { GatewayService } from './gateway-service.js'
import type { HeldItem } from './hold-queue.js'
import type { UpstreamConnection, UpstreamHandler } from './upstream-connection.js'
import type { UpstreamEndpoint } from './upstream-endpoint.js'
import type { PoolWaiter } from './upstream-pool.js'

/**
 * Methods that may be sent twice (RFC 9110 §9.2.2: idempotent). POST and
 * PATCH are not: an endpoint may have acted on one before it failed.
 */
const RETRIABLE_METHODS = new Set(['GET', 'HEAD', 'OPTIONS', 'PUT', 'DELETE', 'TRACE'])

/** The first attempt and up to two retries. */
const MAX_ATTEMPTS = 3

/**
 * Retries on a fresh connection after a reused keep-alive connection was
 * found closed; they do not count as attempts (the endpoint did nothing
 * wrong), but an app that restarted may leave several stale ones in the pool.
 */
const MAX_STALE_RETRIES = 4

/** Retry-After: held requests are turned away while the service starts, which takes about a second. */
const RETRY_AFTER_HOLD_LIMIT_S = 1
/** Retry-After: the service did not get an endpoint within the hold timeout; no sense hammering it. */
const RETRY_AFTER_NO_ENDPOINT_S = 5

// Event handlers are shared functions that find their exchange on the
// emitter, rather than closures made for each request.
const kExchange = Symbol('uigniter.gateway.exchange')

interface Tagged {
  [kExchange]: HttpExchange
}

/**
 * One HTTP request on its way through the gateway: held while the service
 * has no endpoint, sent to the endpoint its strategy picks, retried on
 * another when it failed before an answer and may be sent again, and
 * streamed both ways (the gateway never reads a body).
 */
export class HttpExchange implements HeldItem, UpstreamHandler, PoolWaiter {
  holdTimer: NodeJS.Timeout | undefined
  private attempts = 0
  private staleRetries = 0
  private tried: UpstreamEndpoint[] | undefined
  /** The endpoint of the attempt in progress (counted in its in-flight). */
  private endpoint: UpstreamEndpoint | undefined
  /** The connection of the attempt in progress, once it has one. */
  private conn: UpstreamConnection | undefined
  private waitingPool = false
  /** The upstream's answer has begun: no retry, no answer of our own. */
  private responded = false
  /** The client's response is closed (answered, or the client went away). */
  private done = false
  /** Body bytes went to an upstream: it cannot be sent again. */
  private bodySent = false
  private bodyDone = false
  private waitingDrain = false
  private attemptStart = 0
  private readonly start = performance.now()

  constructor (private readonly service: GatewayService, private readonly req: IncomingMessage, private readonly res: ServerResponse,
    private readonly head: string, private readonly hasBody: boolean, private readonly chunked: boolean, private readonly key: string | undefined) {
    (res as unknown as Tagged)[kExchange] = this
    res.on('close', onClientClose)
    // A write that races the response's end emits 'error' on it, and an 'error' nobody listens to ends the process.
    res.on('error', onClientError)
  }

  /** Sends it to an endpoint, or holds it until there is one. */
  forward (): void {
    const service = this.service
    const port = service.route.httpPort
    if (service.removed || port === undefined) {
      sendGatewayError(this.res, 'UIG_ERR_GATEWAY_NO_SERVICE', `the service ${service.name} has no HTTP route at the gateway`)
      return
    }
    const ep = service.pick(this.key, this.tried)
    if (ep === undefined) {
      this.hold()
      return
    }
    this.attempts++
    service.acquire(ep)
    this.endpoint = ep
    this.attemptStart = performance.now()
    const conn = ep.pool.lease(port, this)
    if (conn === undefined) this.waitingPool = true
    else this.begin(conn)
  }

  release (): void {
    if (!this.done) this.forward()
  }

  expire (reason: 'timeout' | 'removed' | 'closed'): void {
    const name = this.service.name
    if (reason === 'timeout') {
      this.service.rejectedTimeout++
      sendGatewayError(this.res, 'UIG_ERR_GATEWAY_NO_ENDPOINT',
        `the service ${name} got no ready endpoint within ${this.service.route.hold.timeoutMs} ms`, RETRY_AFTER_NO_ENDPOINT_S)
    } else if (reason === 'removed') {
      sendGatewayError(this.res, 'UIG_ERR_GATEWAY_NO_ENDPOINT', `the service ${name} was deleted while the request waited for an endpoint`, 1)
    } else {
      sendGatewayError(this.res, 'UIG_ERR_GATEWAY_NO_ENDPOINT', 'the gateway is shutting down', 1)
    }
  }

  /** @internal A pooled connection came free for it, or the wait failed. */
  onConnection (conn: UpstreamConnection | undefined, err?: NodeJS.ErrnoException): void {
    this.waitingPool = false
    if (conn !== undefined) this.begin(conn)
    else this.onError(err ?? new Error('no connection'), false)
  }

  /** @internal */
  onHead (status: number, reason: string, headers: string[]): void {
    const ep = this.endpoint
    if (ep === undefined || this.done) return
    const now = performance.now()
    ep.sample(now - this.attemptStart, now)
    this.responded = true
    try {
      if (reason === '') this.res.writeHead(status, headers)
      else this.res.writeHead(status, reason, headers)
    } catch (err) {
      // The connection's parser checks what writeHead refuses, so this is a gap in that check: the upstream
      // still gets the blame (and the 502), the gap a log line. writeHead left the refused reason and status
      // on the response; sendGatewayError sets its own.
      this.service.log.warn({ err, service: this.service.name, endpoint: ep.id }, 'an upstream response head that Node refused to write')
      this.responded = false
      this.conn?.abort()
      this.endAttempt()
      this.service.recordFailure(ep)
      sendGatewayError(this.res, 'UIG_ERR_GATEWAY_UPSTREAM_MALFORMED', `the endpoint ${ep.id} of ${this.service.name} answered with a head that cannot be forwarded`)
      return
    }
    this.service.recordSuccess(ep)
  }

  /** @internal */
  onBody (chunk: Buffer): void {
    if (!this.res.write(chunk)) {
      this.conn?.pause()
      if (!this.waitingDrain) {
        this.waitingDrain = true
        this.res.on('drain', onClientDrain)
      }
    }
  }

  /** @internal */
  onEnd (last: Buffer | undefined): void {
    this.endAttempt()
    if (last === undefined) this.res.end()
    else this.res.end(last)
  }

  /** @internal The upstream socket takes more request body. */
  onDrain (): void {
    if (this.bodySent && !this.bodyDone) this.req.resume()
  }

  /** @internal The client takes more response body. */
  onClientDrain (): void {
    this.conn?.resume()
  }

  /** @internal */
  onError (err: NodeJS.ErrnoException, stale: boolean): void {
    if (this.done) return
    const ep = this.endpoint
    if (ep === undefined) return
    this.endAttempt()
    const service = this.service
    if (err.code === 'EINTERNAL') service.log.error({ err, service: service.name, endpoint: ep.id }, 'gateway error while handling an upstream response')
    if (this.responded) {
      // Failed mid-answer (cut short, or malformed framing in the body): all that can be done is to cut the client off too.
      if (err.code === 'EPROTO' && !ep.dead) service.recordFailure(ep)
      this.res.destroy()
      return
    }
    if (err.code === 'EPROTO' || err.code === 'EINTERNAL') {
      // Malformed: the endpoint answered, so it may have acted on the request; no retry. It counts as a failure for ejection.
      if (!ep.dead) service.recordFailure(ep)
      if (err.code === 'EINTERNAL') sendGatewayError(this.res, 'UIG_ERR_INTERNAL', `the gateway failed while handling the answer of ${ep.id} of ${service.name}`)
      else sendGatewayError(this.res, 'UIG_ERR_GATEWAY_UPSTREAM_MALFORMED', `the endpoint ${ep.id} of ${service.name} answered with a ${err.message}`)
      return
    }
    stale = stale && !ep.dead
    if (!ep.dead && !stale) service.recordFailure(ep)
    // Refused or timed out connecting: nothing reached the app, so any method may go elsewhere.
    const unsent = err.syscall === 'connect'
    const retriable = !this.hasBody && (ep.dead || stale || unsent || RETRIABLE_METHODS.has(this.req.method ?? ''))
    if (retriable && (stale ? this.staleRetries++ < MAX_STALE_RETRIES : this.attempts < MAX_ATTEMPTS)) {
      if (stale) this.attempts--
      else (this.tried ??= []).push(ep)
      service.retries++
      this.forward()
      return
    }
    const why = ep.dead ? 'the endpoint stopped' : (err.code ?? err.message)
    sendGatewayError(this.res, 'UIG_ERR_GATEWAY_UPSTREAM', `the endpoint ${ep.id} of ${service.name} failed before answering (${why})`)
  }

  /** @internal */
  onRequestData (chunk: Buffer): void {
    if (this.conn !== undefined && !this.conn.writeBody(chunk, this.chunked)) this.req.pause()
  }

  /** @internal */
  onRequestEnd (): void {
    this.bodyDone = true
    this.conn?.endBody(this.chunked)
  }

  /** @internal The client's response closed: answered, or the client went away. */
  onClose (): void {
    this.done = true
    const service = this.service
    if (this.holdTimer !== undefined) service.held.remove(this)
    if (this.waitingPool) {
      this.waitingPool = false
      this.endpoint?.pool.cancel(this)
    }
    // Still talking to the endpoint: stop, the answer has nowhere to go.
    this.conn?.abort()
    this.endAttempt()
    if (this.res.headersSent) service.observe((performance.now() - this.start) / 1000, this.res.statusCode)
  }

  private begin (conn: UpstreamConnection): void {
    this.conn = conn
    conn.send(this, this.head, this.hasBody, this.req.method === 'HEAD')
    if (this.hasBody) {
      this.bodySent = true
      const req = this.req as IncomingMessage & Tagged
      req[kExchange] = this
      req.on('data', onRequestData)
      req.on('end', onRequestEnd)
    }
  }

  /** The attempt is over: the endpoint's in-flight count drops, the body (if any) stops going to it. */
  private endAttempt (): void {
    const ep = this.endpoint
    if (ep === undefined) return
    this.endpoint = undefined
    this.conn = undefined
    if (this.bodySent && !this.bodyDone) {
      // The rest of the body has nowhere to go: read and drop it, so that the client's connection stays usable.
      this.req.off('data', onRequestData)
      this.req.off('end', onRequestEnd)
      this.req.resume()
    }
    this.service.release(ep)
  }

  private hold (): void {
    const service = this.service
    service.wakeOnce()
    if (!service.hold(this)) {
      service.rejectedHoldLimit++
      sendGatewayError(this.res, 'UIG_ERR_GATEWAY_HOLD_LIMIT',
        `the service ${service.name} is starting and ${service.route.hold.maxRequests} requests already wait for it`, RETRY_AFTER_HOLD_LIMIT_S)
    }
  }
}

function onClientClose (this: ServerResponse): void {
  (this as unknown as Tagged)[kExchange].onClose()
}

function onClientError (this: ServerResponse): void {
  // Nothing to do: the client's socket errors are the server's, and a response that cannot be written is closed.
}

function onClientDrain (this: ServerResponse): void {
  (this as unknown as Tagged)[kExchange].onClientDrain()
}

function onRequestData (this: IncomingMessage, chunk: Buffer): void {
  (this as unknown as Tagged)[kExchange].onRequestData(chunk)
}

function onRequestEnd (this: IncomingMessage): void {
  (this as unknown as Tagged)[kExchange].onRequestEnd()
}
