import assert from 'node:assert/strict'
import { once } from 'node:events'
import { Agent, request } from 'node:http'
import { createServer, type Server, type Socket } from 'node:net'
import fc from 'fast-check'

/**
 * A hostile HTTP upstream and the property-based generator of what it
 * answers: well-formed responses (whose every byte the client must get), and
 * malformed ones of each kind the gateway must turn into a 502, a clean
 * close of the client's connection, or nothing worse.
 *
 * Each request names its case by an `x-case` header, so that a retried
 * request meets the same answer again.
 */

/** What the client must see. */
export type Expect =
  /** Exactly this status, reason, headers and body. */
  | { kind: 'exact', status: number, reason: string, headers: Array<[string, string]>, body: Buffer }
  /** A 502 with one of these codes. */
  | { kind: 'error', codes: string[] }
  /** Its connection closed before a complete response (the body had begun, or the framing broke in it). */
  | { kind: 'close' }

export interface HostileCase {
  /** What was generated, for a failure message. */
  label: string
  /** The bytes written, in the pieces they are written in (one turn of the event loop apart). */
  pieces: Buffer[]
  /** After the last piece: FIN, RST, or leave the connection open (only when the response is complete). */
  end: 'close' | 'reset' | 'keep'
  expect: Expect
}

const MALFORMED = 'UIG_ERR_GATEWAY_UPSTREAM_MALFORMED'
const UPSTREAM = 'UIG_ERR_GATEWAY_UPSTREAM'

// ---------------------------------------------------------------- generators

const tokenChar = fc.constantFrom(...'abcdefghijklmnopqrstuvwxyz0123456789-_.!#$%&\'*+^`|~'.split(''))
const headerName = fc.stringOf(tokenChar, { minLength: 1, maxLength: 12 }).map((s) => `x-${s}`)
const printable = fc.constantFrom(...Array.from({ length: 95 }, (_, i) => String.fromCharCode(32 + i)))
/** A header value as it arrives after OWS is trimmed: no leading or trailing space. */
const headerValue = fc.stringOf(printable, { maxLength: 40 }).map((s) => s.trim())
const reason = fc.oneof(fc.constant(''), fc.stringOf(printable, { minLength: 1, maxLength: 30 }).map((s) => s.trim()).filter((s) => s !== ''))
/** Statuses whose response has a body. */
const status = fc.constantFrom(200, 201, 202, 203, 206, 299, 400, 401, 403, 404, 418, 429, 500, 501, 502, 503, 599)
const body = fc.uint8Array({ maxLength: 4000 }).map((a) => Buffer.from(a))
const headers = fc.uniqueArray(fc.tuple(headerName, headerValue), { maxLength: 6, selector: ([n]) => n.toLowerCase() })

type Framing = 'length' | 'chunked' | 'close'

interface Valid {
  status: number
  reason: string
  headers: Array<[string, string]>
  body: Buffer
  framing: Framing
  /** chunked: how the body is cut into chunks (sizes, cycled), extensions, trailers. */
  chunkSizes: number[]
  extensions: boolean
  trailers: Array<[string, string]>
  /** 1xx interim responses first. */
  interim: number[]
  /** Header names written in odd cases. */
  mixedCase: boolean
}

const validArb: fc.Arbitrary<Valid> = fc.record({
  status,
  reason,
  headers,
  body,
  framing: fc.constantFrom<Framing>('length', 'chunked', 'close'),
  chunkSizes: fc.array(fc.integer({ min: 1, max: 1500 }), { minLength: 1, maxLength: 4 }),
  extensions: fc.boolean(),
  trailers: fc.array(fc.tuple(headerName, headerValue), { maxLength: 2 }),
  interim: fc.oneof({ weight: 4, arbitrary: fc.constant([]) }, { weight: 1, arbitrary: fc.array(fc.constantFrom(100, 102, 103), { minLength: 1, maxLength: 3 }) }),
  mixedCase: fc.boolean()
})

function statusLine (v: { status: number, reason: string }): string {
  return `HTTP/1.1 ${v.status}${v.reason === '' ? '' : ` ${v.reason}`}\r\n`
}

/** The head of a valid response, CRLFCRLF included, and its body bytes as framed. */
function render (v: Valid, extraHead = ''): { head: string, framed: Buffer } {
  let head = v.interim.map((s) => `HTTP/1.1 ${s} Interim\r\nX-Interim: 1\r\n\r\n`).join('')
  head += statusLine(v)
  for (const [n, value] of v.headers) head += `${v.mixedCase ? n.toUpperCase() : n}: ${value}\r\n`
  let framed: Buffer
  if (v.framing === 'length') {
    head += `${v.mixedCase ? 'CONTENT-LENGTH' : 'Content-Length'}: ${v.body.length}\r\n`
    framed = v.body
  } else if (v.framing === 'chunked') {
    head += `Transfer-Encoding: ${v.mixedCase ? 'Chunked' : 'chunked'}\r\n`
    const parts: Buffer[] = []
    let at = 0
    let i = 0
    while (at < v.body.length) {
      const n = Math.min(v.chunkSizes[i++ % v.chunkSizes.length] as number, v.body.length - at)
      parts.push(Buffer.from(`${n.toString(16)}${v.extensions ? ';ext=1' : ''}\r\n`, 'latin1'), v.body.subarray(at, at + n), Buffer.from('\r\n'))
      at += n
    }
    parts.push(Buffer.from(`0\r\n${v.trailers.map(([n, value]) => `${n}: ${value}\r\n`).join('')}\r\n`, 'latin1'))
    framed = Buffer.concat(parts)
  } else {
    head += 'Connection: close\r\n'
    framed = v.body
  }
  return { head: head + extraHead + '\r\n', framed }
}

/** Cuts bytes into 1-4 pieces at generated points. */
function split (bytes: Buffer, cuts: number[]): Buffer[] {
  const points = [...new Set(cuts.map((c) => Math.floor(c * bytes.length)))].filter((p) => p > 0 && p < bytes.length).sort((a, b) => a - b)
  const pieces: Buffer[] = []
  let at = 0
  for (const p of points) {
    pieces.push(bytes.subarray(at, p))
    at = p
  }
  pieces.push(bytes.subarray(at))
  return pieces
}

const cuts = fc.array(fc.double({ min: 0, max: 1, noNaN: true }), { maxLength: 3 })

/** Well-formed: the client gets every byte; garbage after a complete response is dropped with the connection. */
const validCase: fc.Arbitrary<HostileCase> = fc.tuple(validArb, cuts, fc.constantFrom<'close' | 'reset' | 'keep'>('close', 'keep'),
  fc.option(fc.uint8Array({ minLength: 1, maxLength: 64 }), { freq: 4 })).map(([v, c, end, garbage]) => {
  const { head, framed } = render(v)
  const after = garbage === null || v.framing === 'close' ? Buffer.alloc(0) : Buffer.from(garbage)
  const pieces = split(Buffer.concat([Buffer.from(head, 'latin1'), framed]), c)
  // Garbage goes with the response's last bytes: arriving later, on a connection the gateway had reused, it would be
  // the next request's answer (as it would be behind any HTTP/1.1 client).
  if (after.length > 0) pieces.push(Buffer.concat([pieces.pop() as Buffer, after]))
  return {
    label: `valid ${v.framing}${after.length > 0 ? ' + garbage' : ''}${v.interim.length > 0 ? ` after ${v.interim.join(',')}` : ''}`,
    pieces,
    end: v.framing === 'close' || after.length > 0 ? 'close' : end,
    expect: { kind: 'exact', status: v.status, reason: v.reason, headers: v.headers, body: v.body }
  }
})

/** What breaks a head; each must be answered 502 MALFORMED. */
const headBreakers: Array<fc.Arbitrary<{ label: string, head: (v: Valid) => string }>> = [
  // The crash of issue 10: a control character in the reason phrase.
  fc.tuple(fc.constantFrom('\x00', '\x01', '\x07', '\x1b', '\x7f', '\x0b', '\r'), fc.nat(5)).map(([c, at]) => ({
    label: `control character ${JSON.stringify(c)} in the reason`,
    head: (v) => render({ ...v, interim: [] }).head.replace(/^HTTP\/1\.1 (\d+)[^\r]*\r\n/, (_m, s: string) => `HTTP/1.1 ${s} O${'K'.repeat(at)}${c}K\r\n`)
  })),
  fc.constantFrom('HTTP/1.1 2000 OK', 'HTTP/1.1 20 OK', 'HTTP/2 200 OK', 'http/1.1 200 OK', 'HTTP/1.1 099 Low', 'HTTP/1.1 600 High',
    'HTTP/1.1 999 High', 'HTTP/1.1  200 OK', 'HTTP/1.1 1e2 OK', 'HTTP/1.1 200OK', 'HTTP/1.1 -20 OK', 'HTTP/1.1 +20 OK', 'HTTP/1.1 0x1 OK',
    ' HTTP/1.1 200 OK', 'HTTP/1.1', 'ICY 200 OK', '', 'HTTP/1.1 200 OK\x00').map((line) => ({
    label: `status line ${JSON.stringify(line)}`,
    head: (v) => render({ ...v, interim: [] }).head.replace(/^[^\r]*\r\n/, `${line}\r\n`)
  })),
  fc.constantFrom('Bad Name', 'Bad(Name)', 'x-a ', ' x-a', 'x\x00y', 'x@y', 'caf\xe9', '"q"').map((name) => ({
    label: `header name ${JSON.stringify(name)}`,
    head: (v) => render(v, `${name}: value\r\n`).head
  })),
  fc.constantFrom('a\x00b', 'a\x01b', 'a\rb', 'a\nb', 'a\x7fb', '\x1b[31m', 'a\x0cb').map((value) => ({
    label: `header value ${JSON.stringify(value)}`,
    head: (v) => render(v, `X-Bad: ${value}\r\n`).head
  })),
  fc.constant({ label: 'obs-fold', head: (v: Valid) => render(v, 'X-Folded: first\r\n  second\r\n').head }),
  fc.constant({ label: 'a line with no colon', head: (v: Valid) => render(v, 'no colon here\r\n').head }),
  fc.constant({ label: 'an empty header name', head: (v: Valid) => render(v, ': value\r\n').head }),
  fc.tuple(fc.nat(1000), fc.integer({ min: 1, max: 1000 })).map(([a, d]) => ({
    label: 'conflicting Content-Length',
    head: (v: Valid) => render({ ...v, framing: 'close' }, `Content-Length: ${a}\r\nContent-Length: ${a + d}\r\n`).head.replace('Connection: close\r\n', '')
  })),
  fc.constantFrom('-1', '1e3', '0x10', '5, 5', '99999999999999999999', '', ' ', '+5', '5 5', '1.0').map((value) => ({
    label: `Content-Length ${JSON.stringify(value)}`,
    head: (v: Valid) => render({ ...v, framing: 'close' }, `Content-Length: ${value}\r\n`).head.replace('Connection: close\r\n', '')
  })),
  fc.constant({ label: 'Transfer-Encoding and Content-Length', head: (v: Valid) => render({ ...v, framing: 'chunked' }, 'Content-Length: 10\r\n').head }),
  fc.constantFrom('gzip', 'chunked, gzip', 'gzip, chunked', 'chunked, chunked', 'identity', 'chunked;q=1', 'x').map((te) => ({
    label: `Transfer-Encoding ${te}`,
    head: (v: Valid) => render({ ...v, framing: 'close' }, `Transfer-Encoding: ${te}\r\n`).head
  })),
  fc.constant({ label: 'two Transfer-Encoding headers', head: (v: Valid) => render({ ...v, framing: 'chunked' }, 'Transfer-Encoding: chunked\r\n').head }),
  fc.constant({ label: 'HTTP/1.0 and chunked', head: (v: Valid) => render({ ...v, framing: 'chunked', interim: [] }).head.replace('HTTP/1.1', 'HTTP/1.0') }),
  fc.integer({ min: 65 * 1024, max: 200 * 1024 }).map((n) => ({ label: `a ${n}-byte header`, head: (v: Valid) => render(v, `X-Huge: ${'h'.repeat(n)}\r\n`).head })),
  fc.constant({ label: '1001 header lines', head: (v: Valid) => render(v, 'X-M: 1\r\n'.repeat(1001)).head }),
  fc.constant({ label: '101 Switching Protocols', head: (v: Valid) => `HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n${render(v).head}` }),
  fc.constant({ label: '17 interim responses', head: (v: Valid) => 'HTTP/1.1 100 Continue\r\n\r\n'.repeat(17) + render(v).head })
]

const malformedHeadCase: fc.Arbitrary<HostileCase> = fc.tuple(validArb, fc.oneof(...headBreakers), cuts, fc.constantFrom<'close' | 'reset'>('close', 'reset'))
  .map(([v, breaker, c, end]) => {
    const head = breaker.head(v)
    const { framed } = render(v)
    return {
      label: breaker.label,
      pieces: split(Buffer.concat([Buffer.from(head, 'latin1'), framed]), c),
      end,
      expect: { kind: 'error', codes: [MALFORMED] }
    }
  })

/** Framing that breaks once the body began: the client's connection is closed. */
const brokenBodyCase: fc.Arbitrary<HostileCase> = fc.tuple(validArb, fc.constantFrom('fffffffffffffffffff', '-1', '0x10', '1g', 'zz', '', ' 5', '+5', '5\x00', '10000000000000000'),
  fc.boolean(), fc.boolean(), cuts, fc.constantFrom<'close' | 'reset' | 'keep'>('close', 'reset', 'keep')).map(([v, size, noCrlf, hugeTrailer, c, end]) => {
  const { head } = render({ ...v, framing: 'chunked' })
  const first = v.body.subarray(0, Math.min(10, v.body.length))
  let tail: string
  let label: string
  if (noCrlf && first.length > 0) {
    tail = `${first.length.toString(16)}\r\n${first.toString('latin1')}XX0\r\n\r\n`
    label = 'no CRLF after chunk data'
  } else if (hugeTrailer) {
    tail = `0\r\n${'X-T: tttttttttttttttttttttttttttttttt\r\n'.repeat(2000)}\r\n`
    label = 'a trailer section over 64 KiB'
  } else {
    tail = `${first.length > 0 ? `${first.length.toString(16)}\r\n${first.toString('latin1')}\r\n` : ''}${size}\r\nabc\r\n0\r\n\r\n`
    label = `chunk size ${JSON.stringify(size)}`
  }
  return { label, pieces: split(Buffer.from(head + tail, 'latin1'), c), end, expect: { kind: 'close' } }
})

/** The upstream goes away part of the way through a response (FIN or RST). */
const earlyCloseCase: fc.Arbitrary<HostileCase> = fc.tuple(validArb, fc.double({ min: 0, max: 1, noNaN: true, maxExcluded: true }), fc.constantFrom<'close' | 'reset'>('close', 'reset'))
  .map(([v, at, end]) => {
    const framing: Framing = v.framing === 'close' ? 'length' : v.framing
    const { head, framed } = render({ ...v, framing })
    const bytes = Buffer.concat([Buffer.from(head, 'latin1'), framed])
    const headEnd = Buffer.byteLength(head, 'latin1')
    const cut = Math.floor(at * bytes.length)
    return {
      label: `${end} at ${cut}/${bytes.length} (head ${headEnd})`,
      pieces: cut === 0 ? [] : [bytes.subarray(0, cut)],
      end,
      // Before the head is complete nothing was answered: a 502 (a GET is retried first); after it, the answer began.
      expect: cut < headEnd ? { kind: 'error', codes: [UPSTREAM] } : { kind: 'close' }
    }
  })

/** Bytes at random, then the connection closes: nothing in them may make it past the gateway but a 502. */
const garbageCase: fc.Arbitrary<HostileCase> = fc.tuple(fc.uint8Array({ minLength: 1, maxLength: 2000 }), fc.constantFrom<'close' | 'reset'>('close', 'reset'), cuts)
  .map(([bytes, end, c]) => ({ label: 'random bytes', pieces: split(Buffer.from(bytes), c), end, expect: { kind: 'error', codes: [MALFORMED, UPSTREAM] } }))

/** Every kind of answer, the well-formed ones a third of them. */
export const hostileCase: fc.Arbitrary<HostileCase> = fc.oneof(
  { weight: 4, arbitrary: validCase },
  { weight: 5, arbitrary: malformedHeadCase },
  { weight: 2, arbitrary: brokenBodyCase },
  { weight: 2, arbitrary: earlyCloseCase },
  { weight: 1, arbitrary: garbageCase }
)

// ---------------------------------------------------------------- the upstream

/**
 * A raw TCP server that reads request heads and answers each with the case
 * its `x-case` header names, then ends the connection as the case says.
 */
export class HostileUpstream {
  readonly cases = new Map<string, HostileCase>()
  requests = 0
  private readonly server: Server
  private readonly sockets = new Set<Socket>()

  constructor () {
    this.server = createServer((socket) => this.onConnection(socket))
  }

  async listen (host: string, port = 0): Promise<number> {
    this.server.listen(port, host)
    await once(this.server, 'listening')
    const address = this.server.address()
    assert.ok(address !== null && typeof address === 'object')
    return address.port
  }

  async close (): Promise<void> {
    for (const s of this.sockets) s.destroy()
    await new Promise((resolve) => this.server.close(resolve))
  }

  private onConnection (socket: Socket): void {
    this.sockets.add(socket)
    socket.on('close', () => this.sockets.delete(socket))
    socket.on('error', () => socket.destroy())
    let buffered = Buffer.alloc(0)
    let busy = false
    const next = (): void => {
      if (busy || socket.destroyed) return
      const end = buffered.indexOf('\r\n\r\n')
      if (end < 0) return
      const head = buffered.toString('latin1', 0, end)
      buffered = buffered.subarray(end + 4)
      this.requests++
      const id = /\r\nx-case: ([^\r]*)/i.exec(head)?.[1] ?? ''
      const c = this.cases.get(id)
      if (c === undefined) {
        socket.end('HTTP/1.1 400 No Such Case\r\nContent-Length: 0\r\n\r\n')
        return
      }
      busy = true
      void this.play(socket, c).then(() => {
        busy = false
        next()
      })
    }
    socket.on('data', (chunk: Buffer) => {
      buffered = Buffer.concat([buffered, chunk])
      next()
    })
  }

  private async play (socket: Socket, c: HostileCase): Promise<void> {
    for (const piece of c.pieces) {
      if (socket.destroyed) return
      socket.write(piece)
      // A turn of the event loop between pieces: the gateway reads them apart.
      await new Promise((resolve) => setImmediate(resolve))
    }
    if (socket.destroyed) return
    if (c.end === 'close') socket.end()
    else if (c.end === 'reset') socket.resetAndDestroy()
  }
}

// ---------------------------------------------------------------- the client

/** What a client got: a complete response, or an error (a closed or reset connection, or its own timeout). */
export type Outcome =
  | { kind: 'response', status: number, reason: string, headers: string[], body: Buffer }
  | { kind: 'failed', error: string }

export const clientAgent = new Agent({ keepAlive: true, maxSockets: 64 })

/** One GET through the gateway, with a deadline: a request that hangs is a failure of its own. */
export async function get (port: number, host: string, caseId: string | undefined, timeoutMs = 15_000): Promise<Outcome> {
  return await new Promise((resolve) => {
    const req = request({ host: '127.0.0.1', port, path: '/', headers: { host, ...(caseId === undefined ? {} : { 'x-case': caseId }) }, agent: clientAgent }, (res) => {
      const chunks: Buffer[] = []
      res.on('data', (c: Buffer) => chunks.push(c))
      res.on('end', () => {
        if (!res.complete) resolve({ kind: 'failed', error: 'incomplete' })
        else resolve({ kind: 'response', status: res.statusCode ?? 0, reason: res.statusMessage ?? '', headers: res.rawHeaders, body: Buffer.concat(chunks) })
      })
      res.on('error', (err) => resolve({ kind: 'failed', error: (err as NodeJS.ErrnoException).code ?? err.message }))
    })
    req.setTimeout(timeoutMs, () => req.destroy(new Error(`no answer within ${timeoutMs} ms`)))
    req.on('error', (err) => resolve({ kind: 'failed', error: (err as NodeJS.ErrnoException).code ?? err.message }))
    req.end()
  })
}

/** Asserts that an outcome is what its case allows. */
export function check (c: HostileCase, o: Outcome): void {
  const what = `${c.label}: ${JSON.stringify(o.kind === 'response' ? { ...o, body: o.body.toString('latin1').slice(0, 300) } : o)}`
  // A reset may discard what the gateway had not read yet: then it saw only the reset, before any answer.
  const reset = c.end === 'reset'
  if (o.kind === 'failed') {
    assert.ok(!o.error.startsWith('no answer'), `hung: ${what}`)
    assert.equal(c.expect.kind, 'close', `a closed connection where a response was due: ${what}`)
    return
  }
  if (reset && c.expect.kind !== 'exact' && o.status === 502 && (JSON.parse(o.body.toString()) as { code: string }).code === UPSTREAM) return
  switch (c.expect.kind) {
    case 'exact': {
      assert.equal(o.status, c.expect.status, what)
      assert.equal(o.reason, c.expect.reason === '' ? o.reason : c.expect.reason, what)
      assert.ok(o.body.equals(c.expect.body), `body differs: ${what}`)
      const got = new Map<string, string>()
      for (let i = 0; i < o.headers.length; i += 2) got.set((o.headers[i] as string).toLowerCase(), o.headers[i + 1] as string)
      for (const [n, v] of c.expect.headers) assert.equal(got.get(n.toLowerCase()), v, `header ${n}: ${what}`)
      break
    }
    case 'error': {
      assert.equal(o.status, 502, what)
      const parsed = JSON.parse(o.body.toString()) as { code: string, statusCode: number }
      assert.ok(c.expect.codes.includes(parsed.code), what)
      assert.equal(parsed.statusCode, 502)
      break
    }
    case 'close':
      assert.fail(`a complete response where the connection had to close: ${what}`)
  }
}
