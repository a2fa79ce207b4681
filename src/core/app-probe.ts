import { connect } from 'node:net'
import { setTimeout as sleep } from 'node:timers/promises'
import { UigniterError } from './errors.js'

/** Where an app should answer, as the host reaches it, and what counts as an answer. */
export interface AppProbe {
  host: string
  port: number
  /** GET this path and want 2xx/3xx; without it, a TCP connection that stays open (or bytes from the app). */
  httpPath?: string
  /** Any HTTP answer will do (warming an app up, not checking its health). */
  anyStatus?: boolean
  /** HTTP: the Host header (default `host`), for what routes by it (the gateway). */
  hostHeader?: string
  /** TCP: the app speaks first (a greeting); only bytes from it are an answer, an open connection alone is not. */
  speaksFirst?: boolean
}

/** What the app answered. */
export interface AppAnswer {
  /** The HTTP status; 0 for a TCP probe. */
  status: number
  /** HTTP: the response body (de-chunked); TCP: what the app sent before it closed. */
  body: string
}

/** How long one attempt waits. */
export interface AttemptTimeouts {
  /** For the connection. */
  connectMs: number
  /**
   * Once connected, for each next sign of the app: a guest slow to answer
   * keeps its attempt, rather than writing its answer to a socket the probe
   * closed.
   */
  answerMs: number
}

/**
 * A connection that stays open this long counts as an answer. QEMU's
 * user-mode forward accepts on the host before it knows whether the guest
 * listens, and closes the connection when the guest refuses: an accept
 * alone proves nothing there. Bytes from the app prove more, so they
 * answer at once.
 */
const TCP_SETTLE_MS = 250

/**
 * How long a probe waits for the app to close its end after an answer. Each
 * piece the app still sends restarts it, up to the attempt's answer timeout
 * in all (and MAX_ANSWER_BYTES).
 */
const CLOSE_WAIT_MS = 1000

/** The status line must come within this much: anything else is not HTTP. */
const MAX_STATUS_LINE = 1024

/** An answer is read up to this; a guest that sends more is hostile or is not answering a probe. */
const MAX_ANSWER_BYTES = 1 << 20

/**
 * One attempt, the one implementation of "does the app answer" (health
 * checks, warm-ups, templates, the CLI's image test, tests and benchmarks):
 * resolves to the answer, or undefined when there is none (refused, closed,
 * silent, not HTTP, or a status the probe does not accept). Never throws.
 *
 * An answered probe ends cleanly: it says goodbye (a half-close) and waits
 * for the app to close its side, so that no half-open connection is left in
 * a guest about to be snapshotted (a single-threaded app blocked on it would
 * be stuck in every clone). What the app sends meanwhile is the rest of its
 * answer.
 *
 * @example
 * const answer = await askApp({ host: '10.0.0.2', port: 8080, httpPath: '/health' }, 1000)
 * if (answer !== undefined) console.log(answer.status, answer.body)
 */
export async function askApp (probe: AppProbe, timeouts: number | AttemptTimeouts = 2000): Promise<AppAnswer | undefined> {
  const { connectMs, answerMs } = typeof timeouts === 'number' ? { connectMs: timeouts, answerMs: timeouts } : timeouts
  const http = probe.httpPath !== undefined
  return await new Promise((resolve) => {
    const socket = connect({ host: probe.host, port: probe.port, timeout: connectMs })
    const chunks: Buffer[] = []
    let bytes = 0
    let statusLine = ''
    let status = 0
    let phase: 'asking' | 'closing' | 'done' = 'asking'
    let timer: NodeJS.Timeout | undefined

    const fail = (): void => {
      if (phase !== 'asking') return
      phase = 'done'
      clearTimeout(timer)
      socket.destroy()
      resolve(undefined)
    }
    const finish = (): void => {
      if (phase !== 'closing') return
      phase = 'done'
      clearTimeout(timer)
      socket.destroy()
      const all = Buffer.concat(chunks)
      resolve({ status, body: (http ? httpBody(all) : all).toString('utf8') })
    }
    let saidGoodbye = false
    const goodbyeWhenWhole = (): void => {
      // Not before an HTTP answer is whole: a server that sees the probe's end (Node's, by default) cuts its answer short.
      if (saidGoodbye || (http && !httpComplete(Buffer.concat(chunks)))) return
      saidGoodbye = true
      socket.end()
    }
    let closingEnds = 0
    const answered = (): void => {
      if (phase !== 'asking') return
      phase = 'closing'
      closingEnds = Date.now() + Math.max(CLOSE_WAIT_MS, answerMs)
      clearTimeout(timer)
      timer = setTimeout(finish, CLOSE_WAIT_MS)
      // Answered: say goodbye and let the app close its end.
      goodbyeWhenWhole()
    }

    socket.once('timeout', fail)
    socket.on('error', () => { if (phase === 'asking') fail(); else finish() })
    socket.once('close', () => { if (phase === 'asking') fail(); else finish() })
    socket.once('connect', () => {
      socket.setTimeout(answerMs)
      if (http) socket.write(`GET ${probe.httpPath} HTTP/1.1\r\nHost: ${probe.hostHeader ?? probe.host}\r\nConnection: close\r\n\r\n`)
      else if (probe.speaksFirst !== true) timer = setTimeout(answered, TCP_SETTLE_MS)
    })
    socket.on('data', (chunk: Buffer) => {
      if (phase === 'done') return
      bytes += chunk.length
      if (bytes > MAX_ANSWER_BYTES) {
        if (phase === 'asking') fail()
        else finish()
        return
      }
      chunks.push(chunk)
      if (phase === 'closing') {
        // Still sending: it is not stuck, let it finish (but a trickle does not hold the probe past the attempt's time).
        clearTimeout(timer)
        timer = setTimeout(finish, Math.max(0, Math.min(CLOSE_WAIT_MS, closingEnds - Date.now())))
        goodbyeWhenWhole()
        return
      }
      if (!http) {
        answered()
        return
      }
      statusLine += chunk.toString('latin1', 0, Math.min(chunk.length, MAX_STATUS_LINE))
      const match = /^HTTP\/1\.[01] (\d{3})/.exec(statusLine)
      if (match !== null) {
        status = Number(match[1])
        if (probe.anyStatus === true || (status >= 200 && status < 400)) answered()
        else fail()
      } else if (statusLine.length > MAX_STATUS_LINE || statusLine.includes('\r\n')) {
        fail()
      }
    })
  })
}

/** One attempt: whether the app answered (see askApp). Never throws. */
export async function probeOnce (probe: AppProbe, timeoutMs = 2000): Promise<boolean> {
  return (await askApp(probe, timeoutMs)) !== undefined
}

export interface WaitOptions {
  /** Between attempts; default 100 ms. */
  intervalMs?: number
  /** Of each attempt; default up to 2 s each, never past the deadline (at least 100 ms). */
  attempt?: Partial<AttemptTimeouts>
}

/**
 * Probes every `intervalMs` until the app answers or the deadline passes
 * (UIG_ERR_VM_TIMEOUT); `gaveUp` can end the wait early (the VM died), with
 * its reason. Resolves to the answer.
 */
export async function waitForAppAnswer (probe: AppProbe, timeoutMs: number, gaveUp: () => string | undefined = () => undefined, options: WaitOptions = {}): Promise<AppAnswer> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const left = Math.min(2000, Math.max(100, deadline - Date.now()))
    const answer = await askApp(probe, { connectMs: options.attempt?.connectMs ?? left, answerMs: options.attempt?.answerMs ?? left })
    if (answer !== undefined) return answer
    const reason = gaveUp()
    if (reason !== undefined) throw new Error(reason)
    if (Date.now() > deadline) {
      const what = probe.httpPath !== undefined ? `GET ${probe.httpPath}` : 'TCP'
      throw new UigniterError('UIG_ERR_VM_TIMEOUT', `the app did not answer ${what} on ${probe.host}:${probe.port} within ${timeoutMs} ms`)
    }
    await sleep(options.intervalMs ?? 100)
  }
}

/**
 * GET `path` on 127.0.0.1:`port` (a QEMU port forward) until the app answers,
 * with any status: what `image test` and the boot tests read. A short
 * `attemptTimeoutMs` keeps a benchmark from waiting on a dead attempt (the
 * forward accepts before the app listens, then resets or hangs).
 */
export async function httpGetWithRetry (port: number, path: string, timeoutMs: number, attemptTimeoutMs = 5000): Promise<AppAnswer> {
  return await waitForAppAnswer({ host: '127.0.0.1', port, httpPath: path, anyStatus: true }, timeoutMs, undefined,
    { attempt: { connectMs: attemptTimeoutMs, answerMs: attemptTimeoutMs } })
}

interface HttpParts { head: string, body: Buffer }

/** The head (lower case) and the raw body of an HTTP/1.x response as read off the socket, once its head is whole. */
function httpParts (response: Buffer): HttpParts | undefined {
  const end = response.indexOf('\r\n\r\n')
  if (end < 0) return undefined
  return { head: response.toString('latin1', 0, end).toLowerCase(), body: response.subarray(end + 4) }
}

function isChunked (head: string): boolean {
  return /\r\ntransfer-encoding:[^\r]*chunked/.test(head)
}

function contentLength (head: string): number | undefined {
  const length = /\r\ncontent-length:\s*(\d+)/.exec(head)?.[1]
  return length === undefined ? undefined : Number(length)
}

/** Whether the response is all there by its own framing; false when only the app's close can tell. */
function httpComplete (response: Buffer): boolean {
  const parts = httpParts(response)
  if (parts === undefined) return false
  const status = Number(/^http\/1\.[01] (\d{3})/.exec(parts.head)?.[1])
  if (status === 204 || status === 304) return true
  if (isChunked(parts.head)) return dechunk(parts.body).complete
  const length = contentLength(parts.head)
  return length !== undefined && parts.body.length >= length
}

/** The body of a response: de-chunked, or cut to Content-Length, or all that came before the close. */
function httpBody (response: Buffer): Buffer {
  const parts = httpParts(response)
  if (parts === undefined) return Buffer.alloc(0)
  if (isChunked(parts.head)) return dechunk(parts.body).data
  const length = contentLength(parts.head)
  return length === undefined ? parts.body : parts.body.subarray(0, length)
}

/** A chunked body's data, as far as it is whole, and whether its last chunk came. */
function dechunk (body: Buffer): { data: Buffer, complete: boolean } {
  const parts: Buffer[] = []
  let at = 0
  let complete = false
  for (;;) {
    const eol = body.indexOf('\r\n', at)
    if (eol < 0) break
    const size = Number.parseInt(body.toString('latin1', at, eol), 16)
    if (size === 0) {
      complete = true
      break
    }
    if (!(size > 0) || body.length < eol + 2 + size) break
    parts.push(body.subarray(eol + 2, eol + 2 + size))
    at = eol + 2 + size + 2
  }
  return { data: Buffer.concat(parts), complete }
}
