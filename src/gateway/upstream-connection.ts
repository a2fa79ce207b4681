import type { Socket } from 'node:net'
import { connectionTokens, isHopByHop, withoutTokens } from './forward-headers.js'

/** What a connection reports about the one request it carries. */
export interface UpstreamHandler {
  /** The response's status and headers (raw [name, value, ...], less the hop-by-hop ones); 1xx interim responses are skipped. */
  onHead (status: number, reason: string, headers: string[]): void
  onBody (chunk: Buffer): void
  /** The response is complete; `last` is its final piece of body when it came with the end. */
  onEnd (last: Buffer | undefined): void
  /**
   * The exchange failed before the response was complete. `stale`: a reused
   * keep-alive connection failed before a byte of the response came (the app
   * had closed it): not the endpoint's fault, and nothing was processed.
   */
  onError (err: NodeJS.ErrnoException, stale: boolean): void
  /** The socket can take more request body. */
  onDrain (): void
}

/** Where a connection goes back to when its response is complete (or it closes). */
export interface ConnectionOwner {
  recycle (conn: UpstreamConnection): void
  closed (conn: UpstreamConnection): void
}

const MAX_HEAD_BYTES = 64 * 1024
const MAX_LINE_BYTES = 4096

// What parseHead found.
const FAILED = 0
const MORE = 1
const DONE = 2

// Response parser states.
const IDLE = 0
const HEAD = 1
const LENGTH = 2
const CHUNK_SIZE = 3
const CHUNK_DATA = 4
const CHUNK_DATA_END = 5
const TRAILER = 6
const UNTIL_CLOSE = 7

const kConnection = Symbol('uigniter.gateway.connection')
type TaggedSocket = Socket & { [kConnection]: UpstreamConnection }

function protocolError (message: string): NodeJS.ErrnoException {
  const err = new Error(`upstream protocol error: ${message}`) as NodeJS.ErrnoException
  err.code = 'EPROTO'
  return err
}

function hangUp (): NodeJS.ErrnoException {
  const err = new Error('socket hang up') as NodeJS.ErrnoException
  err.code = 'ECONNRESET'
  return err
}

/**
 * One keep-alive HTTP/1.1 connection to an endpoint, one request at a time:
 * writes the request head (and body, re-chunked when it is chunked) and
 * parses the response (Content-Length, chunked, or until close; no body for
 * HEAD, 204, 304), handing the body on as it comes. The gateway's own,
 * rather than http.request and its Agent: those cost about as much CPU again
 * as the whole rest of a proxied request.
 */
export class UpstreamConnection {
  private handler: UpstreamHandler | undefined
  private state = IDLE
  /** Bytes of an unfinished head or chunk-size/trailer line. */
  private pending: Buffer | undefined
  private remaining = 0
  private keepAlive = true
  private noBody = false
  private gotBytes = false
  private requestDone = true
  private requests = 0
  private dead = false

  constructor (readonly socket: Socket, private readonly owner: ConnectionOwner) {
    (socket as TaggedSocket)[kConnection] = this
    socket.on('data', onSocketData)
    socket.on('end', onSocketEnd)
    socket.on('error', onSocketError)
    socket.on('close', onSocketClose)
    socket.on('drain', onSocketDrain)
  }

  get destroyed (): boolean {
    return this.dead
  }

  /**
   * Sends a request head; the body, if any, follows through writeBody and
   * endBody. `head` is the complete head, blank line included.
   */
  send (handler: UpstreamHandler, head: string, hasBody: boolean, isHeadRequest: boolean): void {
    this.handler = handler
    this.state = HEAD
    this.gotBytes = false
    this.keepAlive = true
    this.noBody = isHeadRequest
    this.requestDone = !hasBody
    this.requests++
    this.socket.write(head, 'latin1')
  }

  /** Whether this is not the connection's first request (a stale keep-alive connection is possible). */
  get reused (): boolean {
    return this.requests > 1
  }

  writeBody (chunk: Buffer, chunked: boolean): boolean {
    if (chunk.length === 0) return true
    if (!chunked) return this.socket.write(chunk)
    this.socket.write(`${chunk.length.toString(16)}\r\n`, 'latin1')
    this.socket.write(chunk)
    return this.socket.write('\r\n', 'latin1')
  }

  endBody (chunked: boolean): void {
    if (chunked) this.socket.write('0\r\n\r\n', 'latin1')
    this.requestDone = true
  }

  pause (): void {
    this.socket.pause()
  }

  resume (): void {
    this.socket.resume()
  }

  /** Drops the request in progress without a word to its handler, and the connection with it. */
  abort (): void {
    this.handler = undefined
    this.destroy()
  }

  destroy (): void {
    this.dead = true
    this.socket.destroy()
  }

  /** @internal */
  onData (chunk: Buffer): void {
    if (this.handler === undefined) {
      // Bytes nobody asked for: this connection cannot be trusted any more.
      this.destroy()
      return
    }
    this.gotBytes = true
    let data = chunk
    while (data.length > 0 && this.handler !== undefined) {
      switch (this.state) {
        case HEAD: {
          const buf = this.pending === undefined ? data : Buffer.concat([this.pending, data])
          const end = buf.indexOf('\r\n\r\n', 0, 'latin1')
          if (end < 0) {
            if (buf.length > MAX_HEAD_BYTES) return this.fail(protocolError('response head too large'))
            this.pending = buf
            return
          }
          this.pending = undefined
          data = buf.subarray(end + 4)
          const next = this.parseHead(buf.toString('latin1', 0, end))
          if (next === FAILED) return
          if (next === DONE) this.complete(undefined, data.length > 0)
          break
        }
        case LENGTH: {
          const n = Math.min(this.remaining, data.length)
          const piece = n === data.length ? data : data.subarray(0, n)
          this.remaining -= n
          data = data.subarray(n)
          if (this.remaining === 0) this.complete(piece, data.length > 0)
          else this.handler.onBody(piece)
          break
        }
        case CHUNK_SIZE:
        case TRAILER: {
          const buf = this.pending === undefined ? data : Buffer.concat([this.pending, data])
          const eol = buf.indexOf('\r\n', 0, 'latin1')
          if (eol < 0) {
            if (buf.length > MAX_LINE_BYTES) return this.fail(protocolError('chunk line too long'))
            this.pending = buf
            return
          }
          this.pending = undefined
          const line = buf.toString('latin1', 0, eol)
          data = buf.subarray(eol + 2)
          if (this.state === TRAILER) {
            if (line === '') this.complete(undefined, data.length > 0)
            break
          }
          const semi = line.indexOf(';')
          const size = parseInt(semi < 0 ? line : line.slice(0, semi), 16)
          if (!Number.isSafeInteger(size) || size < 0) return this.fail(protocolError('bad chunk size'))
          if (size === 0) {
            this.state = TRAILER
          } else {
            this.remaining = size
            this.state = CHUNK_DATA
          }
          break
        }
        case CHUNK_DATA: {
          const n = Math.min(this.remaining, data.length)
          const piece = n === data.length ? data : data.subarray(0, n)
          this.remaining -= n
          data = data.subarray(n)
          if (this.remaining === 0) {
            this.state = CHUNK_DATA_END
            this.remaining = 2
          }
          this.handler.onBody(piece)
          break
        }
        case CHUNK_DATA_END: {
          // The CRLF after a chunk's data, possibly split across reads.
          const n = Math.min(this.remaining, data.length)
          data = data.subarray(n)
          this.remaining -= n
          if (this.remaining === 0) this.state = CHUNK_SIZE
          break
        }
        case UNTIL_CLOSE: {
          this.handler.onBody(data)
          data = data.subarray(data.length)
          break
        }
        default:
          return this.fail(protocolError('unexpected bytes'))
      }
    }
  }

  /** @internal The endpoint closed its side. */
  onEnd (): void {
    if (this.handler !== undefined && this.state === UNTIL_CLOSE) {
      this.keepAlive = false
      this.complete(undefined, false)
      return
    }
    if (this.handler !== undefined) this.fail(hangUp())
    else this.destroy()
  }

  /** @internal */
  onError (err: NodeJS.ErrnoException): void {
    if (this.handler !== undefined) this.fail(err)
    else this.destroy()
  }

  /** @internal */
  onClose (): void {
    this.dead = true
    if (this.handler !== undefined) this.fail(hangUp())
    this.owner.closed(this)
  }

  /** @internal */
  onDrain (): void {
    this.handler?.onDrain()
  }

  /**
   * Parses the status line and headers: FAILED (the exchange failed), MORE
   * (a body follows, or the real head after an interim one) or DONE. The
   * handler gets the headers less the hop-by-hop ones.
   */
  private parseHead (head: string): number {
    const handler = this.handler as UpstreamHandler
    let eol = head.indexOf('\r\n')
    if (eol < 0) eol = head.length
    const statusLine = head.slice(0, eol)
    if (!statusLine.startsWith('HTTP/1.') || statusLine.length < 12 || statusLine.charCodeAt(8) !== 32 ||
      (statusLine.length > 12 && statusLine.charCodeAt(12) !== 32)) {
      this.fail(protocolError('bad status line'))
      return FAILED
    }
    const status = Number(statusLine.slice(9, 12))
    if (!Number.isInteger(status) || status < 100) {
      this.fail(protocolError('bad status code'))
      return FAILED
    }
    const http10 = statusLine.charCodeAt(7) === 48 /* 0 */
    let headers: string[] = []
    let length = -1
    let chunked = false
    let encoded = false
    let close = http10
    let tokens: Set<string> | undefined
    let start = eol + 2
    while (start < head.length) {
      let end = head.indexOf('\r\n', start)
      if (end < 0) end = head.length
      const colon = head.indexOf(':', start)
      const first = head.charCodeAt(start)
      if (colon <= start || colon > end || first === 32 || first === 9) {
        this.fail(protocolError('bad header line'))
        return FAILED
      }
      const name = head.slice(start, colon)
      const value = head.slice(colon + 1, end).trim()
      start = end + 2
      const lower = name.toLowerCase()
      if (lower === 'content-length') {
        if (!/^\d+$/.test(value) || (length >= 0 && Number(value) !== length)) {
          this.fail(protocolError('bad Content-Length'))
          return FAILED
        }
        length = Number(value)
      } else if (isHopByHop(lower)) {
        if (lower === 'transfer-encoding') {
          encoded = true
          chunked = /(?:^|,)\s*chunked\s*$/i.test(value)
        } else if (lower === 'connection') {
          const v = value.toLowerCase()
          close = http10 ? !v.includes('keep-alive') : v.includes('close')
          tokens = connectionTokens(value, tokens)
        }
        continue
      }
      headers.push(name, value)
    }
    if (status < 200) {
      // 103 Early Hints and the like: interim; the real response follows. (101 is never asked for.)
      if (status === 101) {
        this.fail(protocolError('unexpected 101 Switching Protocols'))
        return FAILED
      }
      this.state = HEAD
      return MORE
    }
    if (tokens !== undefined) headers = withoutTokens(headers, tokens)
    this.keepAlive = !close
    const reason = statusLine.slice(13)
    if (this.noBody || status === 204 || status === 304) {
      handler.onHead(status, reason, headers)
      return DONE
    }
    if (encoded) {
      // A Transfer-Encoding overrides a Content-Length (RFC 9112 §6.3), and the connection is not reused.
      if (length >= 0) this.keepAlive = false
      if (chunked) {
        this.state = CHUNK_SIZE
      } else {
        this.state = UNTIL_CLOSE
        this.keepAlive = false
      }
    } else if (length >= 0) {
      this.state = LENGTH
      this.remaining = length
    } else {
      this.state = UNTIL_CLOSE
      this.keepAlive = false
    }
    handler.onHead(status, reason, headers)
    return this.state === LENGTH && length === 0 ? DONE : MORE
  }

  private complete (last: Buffer | undefined, extra: boolean): void {
    const handler = this.handler
    this.handler = undefined
    this.state = IDLE
    this.pending = undefined
    const reusable = this.keepAlive && !extra && this.requestDone
    handler?.onEnd(last)
    // The handler may have destroyed it meanwhile (its endpoint was forgotten).
    if (reusable && !this.dead) {
      // Paused for a slow client just as the response ended: the next request must not find it so.
      if (this.socket.isPaused()) this.socket.resume()
      this.owner.recycle(this)
    } else {
      this.destroy()
    }
  }

  private fail (err: NodeJS.ErrnoException): void {
    const handler = this.handler
    this.handler = undefined
    this.state = IDLE
    this.pending = undefined
    const stale = this.reused && !this.gotBytes && err.code !== 'EPROTO'
    this.destroy()
    handler?.onError(err, stale)
  }
}

function onSocketData (this: Socket, chunk: Buffer): void {
  (this as TaggedSocket)[kConnection].onData(chunk)
}

function onSocketEnd (this: Socket): void {
  (this as TaggedSocket)[kConnection].onEnd()
}

function onSocketError (this: Socket, err: NodeJS.ErrnoException): void {
  (this as TaggedSocket)[kConnection].onError(err)
}

function onSocketClose (this: Socket): void {
  (this as TaggedSocket)[kConnection].onClose()
}

function onSocketDrain (this: Socket): void {
  (this as TaggedSocket)[kConnection].onDrain()
}
