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

/** A response head (status line and headers) larger than this is refused. */
const MAX_HEAD_BYTES = 64 * 1024
/** A chunk-size line or trailer line longer than this is refused. */
const MAX_LINE_BYTES = 4096
/** Trailer fields (dropped) of one response, in all. */
const MAX_TRAILER_BYTES = 64 * 1024
/** Header lines of one head. */
const MAX_HEADER_LINES = 1000
/** 1xx interim responses before the final one; an endless stream of them would hold the request forever. */
const MAX_INTERIM = 16

/**
 * What may not appear in a head (RFC 9112 §2.2, §5; what Node's own
 * parser and its writeHead refuse): control characters other than HTAB, and
 * a CR or LF that is not part of a CRLF. obs-text (0x80-0xff) is allowed.
 */
// eslint-disable-next-line no-control-regex -- control characters are exactly what it looks for
const BAD_HEAD_CHAR = /[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\r(?!\n)|(?<!\r)\n/
/** A header name: a token (RFC 9110 §5.1). */
const TOKEN = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/
/** `HTTP/1.x NNN` and then the end or a space before the reason. */
const STATUS_LINE = /^HTTP\/1\.[0-9] [0-9]{3}(?: |$)/
/** A Content-Length value; 15 digits stay within a safe integer. */
const CONTENT_LENGTH = /^[0-9]{1,15}$/
/** A chunk size in hex (16 digits at most; checked for a safe integer after), then optional whitespace and extensions. */
const CHUNK_SIZE_LINE = /^([0-9A-Fa-f]{1,16})[ \t]*(?:;.*)?$/

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

/**
 * The upstream's bytes are not a well-formed HTTP/1.1 response. The code
 * `EPROTO` tells the exchange: answer 502 UIG_ERR_GATEWAY_UPSTREAM_MALFORMED,
 * do not retry (the endpoint may have acted on the request).
 */
function protocolError (message: string): NodeJS.ErrnoException {
  const err = new Error(`malformed response: ${message}`) as NodeJS.ErrnoException
  err.code = 'EPROTO'
  return err
}

/** A bug of ours met while handling an upstream's bytes: the one exchange fails, not the process. */
function internalError (cause: unknown): NodeJS.ErrnoException {
  const err = new Error(`gateway internal error: ${cause instanceof Error ? cause.message : String(cause)}`, { cause }) as NodeJS.ErrnoException
  err.code = 'EINTERNAL'
  return err
}

/** Trims optional whitespace (SP, HTAB: RFC 9110 §5.6.3), and nothing else (String.trim would take NBSP, a valid obs-text byte). */
function trimOws (s: string): string {
  let a = 0
  let b = s.length
  while (a < b && (s.charCodeAt(a) === 32 || s.charCodeAt(a) === 9)) a++
  while (b > a && (s.charCodeAt(b - 1) === 32 || s.charCodeAt(b - 1) === 9)) b--
  return a === 0 && b === s.length ? s : s.slice(a, b)
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
  /** Bytes of an unfinished chunk-size/trailer line. */
  private pending: Buffer | undefined
  /** Pieces of an unfinished head, kept apart (not concatenated at each read: a head sent a byte at a time would cost quadratic copying). */
  private headPieces: Buffer[] = []
  private headBytes = 0
  /** The last bytes (up to 3) of the unfinished head, to find a CRLFCRLF split across reads. */
  private headTail: Buffer | undefined
  private interim = 0
  private trailerBytes = 0
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
    this.interim = 0
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
          // The head ends at the first CRLFCRLF, which may straddle the previous read.
          const tail = this.headTail
          const probe = tail === undefined ? data : Buffer.concat([tail, data.subarray(0, 3)])
          let end = -1
          if (tail !== undefined) {
            const i = probe.indexOf('\r\n\r\n', 0, 'latin1')
            if (i >= 0) end = i + 4 - tail.length
          }
          if (end < 0) {
            const i = data.indexOf('\r\n\r\n', 0, 'latin1')
            if (i >= 0) end = i + 4
          }
          if (end < 0) {
            this.headBytes += data.length
            if (this.headBytes > MAX_HEAD_BYTES) return this.fail(protocolError(`response head larger than ${MAX_HEAD_BYTES} bytes`))
            this.headPieces.push(data)
            const joined = tail === undefined ? data : Buffer.concat([tail, data])
            this.headTail = Buffer.from(joined.subarray(Math.max(0, joined.length - 3)))
            return
          }
          if (this.headBytes + end > MAX_HEAD_BYTES) return this.fail(protocolError(`response head larger than ${MAX_HEAD_BYTES} bytes`))
          let head: string
          if (this.headPieces.length === 0) {
            head = data.toString('latin1', 0, end - 4)
          } else {
            this.headPieces.push(data.subarray(0, end))
            const buf = Buffer.concat(this.headPieces)
            head = buf.toString('latin1', 0, buf.length - 4)
          }
          this.resetHead()
          data = data.subarray(end)
          const next = this.parseHead(head)
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
            // Trailer fields are dropped (they were not announced to the client); only their size is bounded.
            if (line === '') this.complete(undefined, data.length > 0)
            else if ((this.trailerBytes += eol + 2) > MAX_TRAILER_BYTES) return this.fail(protocolError('trailer section too large'))
            break
          }
          // Strict: parseInt would take "1x", " 1", "+1" and "0x1"; a size two parsers read apart is how responses are smuggled.
          const m = CHUNK_SIZE_LINE.exec(line)
          const size = m === null ? NaN : parseInt(m[1] as string, 16)
          if (!Number.isSafeInteger(size) || BAD_HEAD_CHAR.test(line)) return this.fail(protocolError('bad chunk size'))
          if (size === 0) {
            this.state = TRAILER
            this.trailerBytes = 0
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
          // The CRLF after a chunk's data, possibly split across reads; anything else is a framing error.
          const expected = this.remaining === 2 ? 13 : 10
          if (data[0] !== expected) return this.fail(protocolError('no CRLF after chunk data'))
          data = data.subarray(1)
          if (--this.remaining === 0) this.state = CHUNK_SIZE
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
    try {
      if (this.handler !== undefined) this.fail(hangUp())
    } finally {
      // Whatever happened above, the pool must learn that its slot is free.
      this.owner.closed(this)
    }
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
    // Everything below reaches Node's writeHead, which throws on what it refuses: it is checked here first.
    if (BAD_HEAD_CHAR.test(head)) return this.malformed('control character or bare CR/LF in the head')
    let eol = head.indexOf('\r\n')
    if (eol < 0) eol = head.length
    const statusLine = head.slice(0, eol)
    if (!STATUS_LINE.test(statusLine)) return this.malformed('bad status line')
    const status = Number(statusLine.slice(9, 12))
    // RFC 9110 §15: a status code is 100-599.
    if (status < 100 || status > 599) return this.malformed(`status code ${status} out of range`)
    const http10 = statusLine.charCodeAt(7) === 48 /* 0 */
    let headers: string[] = []
    let length = -1
    let lengths = 0
    let encodings = 0
    let chunked = false
    let close = http10
    let tokens: Set<string> | undefined
    let lines = 0
    let start = eol + 2
    while (start < head.length) {
      let end = head.indexOf('\r\n', start)
      if (end < 0) end = head.length
      if (++lines > MAX_HEADER_LINES) return this.malformed(`more than ${MAX_HEADER_LINES} header lines`)
      const colon = head.indexOf(':', start)
      // No colon, an empty name, or a line that begins with whitespace: obs-fold (RFC 9112 §5.2), which a proxy must not pass on.
      if (colon <= start || colon > end) return this.malformed('bad header line (no name, or a folded line)')
      const name = head.slice(start, colon)
      // A name is a token; whitespace before the colon is refused (RFC 9112 §5.1).
      if (!TOKEN.test(name)) return this.malformed('bad header name')
      const value = trimOws(head.slice(colon + 1, end))
      start = end + 2
      const lower = name.toLowerCase()
      if (lower === 'content-length') {
        if (!CONTENT_LENGTH.test(value)) return this.malformed('bad Content-Length')
        const n = Number(value)
        if (length >= 0 && n !== length) return this.malformed('conflicting Content-Length headers')
        // Sent on once: Node's parser (and others) refuse a repeated Content-Length even when the values agree.
        if (lengths++ > 0) continue
        length = n
      } else if (isHopByHop(lower)) {
        if (lower === 'transfer-encoding') {
          encodings++
          chunked = value.toLowerCase() === 'chunked'
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
      // 101 answers an Upgrade, and the gateway never asks for one.
      if (status === 101) return this.malformed('101 Switching Protocols without an Upgrade request')
      // 103 Early Hints and the like: interim; the real response follows.
      if (++this.interim > MAX_INTERIM) return this.malformed(`more than ${MAX_INTERIM} interim (1xx) responses`)
      this.state = HEAD
      return MORE
    }
    if (encodings > 0) {
      // Only `chunked`, alone, once. Both framings at once is how responses are smuggled (RFC 9112 §6.3 says
      // "ought to be handled as an error"); another coding would reach the client undecoded, its name dropped; an
      // HTTP/1.0 response cannot be chunked.
      if (length >= 0) return this.malformed('both Transfer-Encoding and Content-Length')
      if (encodings > 1 || !chunked || http10) return this.malformed('unsupported Transfer-Encoding')
    }
    if (tokens !== undefined) headers = withoutTokens(headers, tokens)
    this.keepAlive = !close
    const reason = statusLine.slice(13)
    if (this.noBody || status === 204 || status === 304) {
      handler.onHead(status, reason, headers)
      return DONE
    }
    if (chunked) {
      this.state = CHUNK_SIZE
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

  private malformed (why: string): number {
    this.fail(protocolError(why))
    return FAILED
  }

  private resetHead (): void {
    this.headPieces = []
    this.headBytes = 0
    this.headTail = undefined
  }

  private complete (last: Buffer | undefined, extra: boolean): void {
    const handler = this.handler
    this.handler = undefined
    this.state = IDLE
    this.pending = undefined
    this.resetHead()
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

  /** @internal One of our own paths threw while handling this connection's events: its exchange fails, the connection goes. */
  crash (cause: unknown): void {
    try {
      this.fail(internalError(cause))
    } catch {
      // The handler's own error path threw: nothing more can be told to it.
      this.handler = undefined
      this.destroy()
    }
  }

  private fail (err: NodeJS.ErrnoException): void {
    const handler = this.handler
    this.handler = undefined
    this.state = IDLE
    this.pending = undefined
    this.resetHead()
    const stale = this.reused && !this.gotBytes && err.code !== 'EPROTO'
    this.destroy()
    handler?.onError(err, stale)
  }
}

// The socket's events enter here. Whatever the upstream sends, the parser
// fails only its own exchange; should one of our own paths throw all the
// same (a bug), it is contained here too: that exchange fails (logged as a
// gateway error) and the connection goes, rather than the throw reaching
// the event loop and ending the daemon with every other request.

function onSocketData (this: Socket, chunk: Buffer): void {
  const conn = (this as TaggedSocket)[kConnection]
  try {
    conn.onData(chunk)
  } catch (err) {
    conn.crash(err)
  }
}

function onSocketEnd (this: Socket): void {
  const conn = (this as TaggedSocket)[kConnection]
  try {
    conn.onEnd()
  } catch (err) {
    conn.crash(err)
  }
}

function onSocketError (this: Socket, err: NodeJS.ErrnoException): void {
  const conn = (this as TaggedSocket)[kConnection]
  try {
    conn.onError(err)
  } catch (e) {
    conn.crash(e)
  }
}

function onSocketClose (this: Socket): void {
  const conn = (this as TaggedSocket)[kConnection]
  try {
    conn.onClose()
  } catch (err) {
    conn.crash(err)
  }
}

function onSocketDrain (this: Socket): void {
  const conn = (this as TaggedSocket)[kConnection]
  try {
    conn.onDrain()
  } catch (err) {
    conn.crash(err)
  }
}
