import { connect, type Socket } from 'node:net'
import { UpstreamConnection, type ConnectionOwner } from './upstream-connection.js'

/** Someone waiting for a connection while the pool is at its maximum. */
export interface PoolWaiter {
  /** A connection for it, or the error that ended the wait (the pool was destroyed). */
  onConnection (conn: UpstreamConnection | undefined, err?: NodeJS.ErrnoException): void
}

/**
 * The keep-alive connections to one endpoint: the most recently used free
 * one first (the likeliest to be warm and not closed by the app), a new one
 * while below the maximum, else a wait in line.
 */
export class UpstreamPool implements ConnectionOwner {
  private readonly free: UpstreamConnection[] = []
  private readonly all = new Set<UpstreamConnection>()
  private waiting: PoolWaiter[] = []
  private port = 0
  private destroyed = false

  constructor (private readonly host: string, private readonly connectTimeoutMs: number, private readonly maxConnections: number) {}

  /** Connections open, busy or free. */
  get size (): number {
    return this.all.size
  }

  /** A connection to `port` now, or undefined: the waiter gets one later. */
  lease (port: number, waiter: PoolWaiter): UpstreamConnection | undefined {
    if (port !== this.port) {
      // The service's port changed: the free connections go to the old one.
      this.port = port
      for (const c of this.free.splice(0)) c.destroy()
    }
    for (;;) {
      const conn = this.free.pop()
      if (conn === undefined) break
      if (!conn.destroyed) return conn
    }
    if (this.all.size < this.maxConnections && !this.destroyed) return this.open()
    this.waiting.push(waiter)
    return undefined
  }

  /** Stops waiting (its client went away). */
  cancel (waiter: PoolWaiter): void {
    const i = this.waiting.indexOf(waiter)
    if (i >= 0) this.waiting.splice(i, 1)
  }

  /** Closes every connection (busy ones fail, and their requests with them) and ends every wait. */
  destroy (): void {
    this.destroyed = true
    const waiting = this.waiting
    this.waiting = []
    for (const c of [...this.all]) c.destroy()
    this.free.length = 0
    const err = new Error('the endpoint is gone') as NodeJS.ErrnoException
    err.code = 'ECONNRESET'
    for (const w of waiting) w.onConnection(undefined, err)
  }

  /** @internal A response is complete and the connection can carry another. */
  recycle (conn: UpstreamConnection): void {
    if (this.destroyed) {
      conn.destroy()
      return
    }
    const waiter = this.waiting.shift()
    if (waiter !== undefined) waiter.onConnection(conn)
    else this.free.push(conn)
  }

  /** @internal */
  closed (conn: UpstreamConnection): void {
    this.all.delete(conn)
    const i = this.free.lastIndexOf(conn)
    if (i >= 0) this.free.splice(i, 1)
    const waiter = this.destroyed ? undefined : this.waiting.shift()
    if (waiter !== undefined) waiter.onConnection(this.open())
  }

  private open (): UpstreamConnection {
    const socket = connect({ host: this.host, port: this.port, noDelay: true })
    armConnectTimeout(socket, this.connectTimeoutMs)
    const conn = new UpstreamConnection(socket, this)
    this.all.add(conn)
    return conn
  }
}

/**
 * Destroys the socket with an ETIMEDOUT error when it has not connected in
 * time: net.connect has no such timeout, and a VM that is gone (its address
 * still routed, nobody answering) would otherwise hold a request for the
 * kernel's SYN retries, about two minutes.
 */
export function armConnectTimeout (socket: Socket, ms: number): void {
  const timer = setTimeout(onConnectTimeout, ms, socket)
  socket.once('connect', () => clearTimeout(timer))
  socket.once('close', () => clearTimeout(timer))
}

function onConnectTimeout (socket: Socket): void {
  if (!socket.connecting) return
  const err = new Error(`connect timed out (${socket.remoteAddress ?? 'endpoint'})`) as NodeJS.ErrnoException
  err.code = 'ETIMEDOUT'
  err.syscall = 'connect'
  socket.destroy(err)
}
