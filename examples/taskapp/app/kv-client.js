// A small memcached text-protocol client (get and set), shared by api and worker.
//
// One connection, opened on first use and again after any failure: through
// the gateway's TCP port, a connection ends whenever the kv replica behind it
// is replaced, so losing it is routine. memcached answers in order, so
// requests are pipelined on that connection and matched to answers first in,
// first out. A request that fails because the connection failed is retried
// on a new one (get and set are idempotent); a timeout is not retried.

import { connect } from 'node:net'

/** A kv failure, with a stable `code`: KV_UNAVAILABLE, KV_TIMEOUT, KV_PROTOCOL or KV_BAD_REQUEST. */
export class KvError extends Error {
  constructor (code, message, options) {
    super(message, options)
    this.name = 'KvError'
    this.code = code
  }
}

const CRLF = '\r\n'
const MAX_KEY_BYTES = 250
const MAX_VALUE_BYTES = 1024 * 1024
const RETRY_DELAYS_MS = [100, 400, 1000]

export class KvClient {
  #host
  #port
  #timeoutMs
  #retries
  /** The live connection: { socket, pending: [], buf }, or null. */
  #conn = null
  #closed = false

  /**
   * @param {{ host: string, port: number, timeoutMs?: number, retries?: number }} options
   *   timeoutMs bounds each attempt (connecting included); retries is how many
   *   more attempts a request gets when its connection fails (at most 3).
   */
  constructor ({ host, port, timeoutMs = 5000, retries = 2 }) {
    if (typeof host !== 'string' || host === '') throw new TypeError('KvClient: host must be a non-empty string')
    if (!Number.isInteger(port) || port < 1 || port > 65535) throw new TypeError(`KvClient: port must be 1..65535, not ${port}`)
    if (!Number.isInteger(timeoutMs) || timeoutMs < 1) throw new TypeError(`KvClient: timeoutMs must be a positive integer, not ${timeoutMs}`)
    if (!Number.isInteger(retries) || retries < 0 || retries > RETRY_DELAYS_MS.length) throw new TypeError(`KvClient: retries must be 0..${RETRY_DELAYS_MS.length}`)
    this.#host = host
    this.#port = port
    this.#timeoutMs = timeoutMs
    this.#retries = retries
  }

  get address () { return `${this.#host}:${this.#port}` }

  /** The value stored under `key` as a UTF-8 string with its flags, or null when there is none. */
  async get (key) {
    checkKey(key)
    return await this.#call(`get ${key}${CRLF}`, parseGet)
  }

  /** Stores `value` (a string or Buffer) under `key`; exptime in seconds (0: never), as memcached takes it. */
  async set (key, value, { flags = 0, exptime = 0 } = {}) {
    checkKey(key)
    const data = Buffer.isBuffer(value) ? value : Buffer.from(String(value), 'utf8')
    if (data.length > MAX_VALUE_BYTES) throw new KvError('KV_BAD_REQUEST', `value for ${key} is ${data.length} bytes; memcached takes at most ${MAX_VALUE_BYTES}`)
    if (!Number.isInteger(flags) || flags < 0 || flags > 0xffffffff) throw new KvError('KV_BAD_REQUEST', `flags must be a 32-bit unsigned integer, not ${flags}`)
    if (!Number.isInteger(exptime) || exptime < 0) throw new KvError('KV_BAD_REQUEST', `exptime must be a whole number of seconds ≥ 0, not ${exptime}`)
    const head = Buffer.from(`set ${key} ${flags} ${exptime} ${data.length}${CRLF}`, 'ascii')
    await this.#call(Buffer.concat([head, data, Buffer.from(CRLF)]), parseStored)
  }

  /** JSON helpers: the app stores objects. */
  async getJson (key) {
    const hit = await this.get(key)
    if (hit === null) return null
    try {
      return JSON.parse(hit.value)
    } catch (err) {
      throw new KvError('KV_PROTOCOL', `value under ${key} is not JSON`, { cause: err })
    }
  }

  async setJson (key, object, options) {
    await this.set(key, JSON.stringify(object), options)
  }

  /** Ends the connection; pending requests fail with KV_UNAVAILABLE. */
  close () {
    this.#closed = true
    this.#conn?.socket.destroy()
  }

  async #call (command, parse) {
    for (let attempt = 0; ; attempt++) {
      try {
        return await this.#send(command, parse)
      } catch (err) {
        if (err.code !== 'KV_UNAVAILABLE' || attempt >= this.#retries || this.#closed) throw err
        await new Promise((resolve) => setTimeout(resolve, RETRY_DELAYS_MS[attempt]))
      }
    }
  }

  #send (command, parse) {
    if (this.#closed) return Promise.reject(new KvError('KV_UNAVAILABLE', 'kv client is closed'))
    const conn = this.#conn ?? this.#open()
    return new Promise((resolve, reject) => {
      const entry = { parse, resolve, reject, timer: null }
      entry.timer = setTimeout(() => {
        // The answer may still come, and would then be matched to the next
        // request: the connection is out of step, so it goes.
        conn.pending.splice(conn.pending.indexOf(entry), 1)
        fail(entry, new KvError('KV_TIMEOUT', `kv at ${this.address} did not answer within ${this.#timeoutMs} ms`))
        conn.socket.destroy()
      }, this.#timeoutMs)
      conn.pending.push(entry)
      // net.Socket queues writes made before it connects.
      conn.socket.write(command)
    })
  }

  #open () {
    const socket = connect({ host: this.#host, port: this.#port })
    socket.setNoDelay(true)
    socket.setKeepAlive(true, 10_000)
    const conn = { socket, pending: [], buf: Buffer.alloc(0), error: null }
    this.#conn = conn
    socket.on('data', (chunk) => {
      conn.buf = conn.buf.length === 0 ? chunk : Buffer.concat([conn.buf, chunk])
      this.#drain(conn)
    })
    socket.on('error', (err) => { conn.error = err })
    socket.on('close', () => {
      if (this.#conn === conn) this.#conn = null
      const why = conn.error?.message ?? 'the connection closed'
      for (const entry of conn.pending.splice(0)) {
        fail(entry, new KvError('KV_UNAVAILABLE', `kv at ${this.address} is unreachable: ${why}`, { cause: conn.error ?? undefined }))
      }
    })
    return conn
  }

  #drain (conn) {
    while (conn.buf.length > 0) {
      const entry = conn.pending[0]
      if (entry === undefined) {
        conn.error = new Error(`unexpected data from kv: ${JSON.stringify(conn.buf.subarray(0, 40).toString('latin1'))}`)
        conn.socket.destroy()
        return
      }
      let answer
      try {
        answer = entry.parse(conn.buf)
      } catch (err) {
        // The stream cannot be trusted after an answer we could not read.
        conn.pending.shift()
        fail(entry, err)
        conn.error = err
        conn.socket.destroy()
        return
      }
      if (answer === null) return
      conn.buf = conn.buf.subarray(answer.consumed)
      conn.pending.shift()
      clearTimeout(entry.timer)
      if (answer.error !== undefined) entry.reject(answer.error)
      else entry.resolve(answer.value)
    }
  }
}

function fail (entry, err) {
  clearTimeout(entry.timer)
  entry.reject(err)
}

function checkKey (key) {
  if (typeof key !== 'string' || key === '' || Buffer.byteLength(key) > MAX_KEY_BYTES || /[\s\x00-\x1f\x7f]/.test(key)) {
    throw new KvError('KV_BAD_REQUEST', `invalid kv key ${JSON.stringify(key)}: 1..${MAX_KEY_BYTES} bytes, no spaces or control characters`)
  }
}

/** The first line of buf (without CRLF) and where what follows starts, or null when it is not complete. */
function firstLine (buf) {
  const end = buf.indexOf(CRLF)
  return end === -1 ? null : { line: buf.subarray(0, end).toString('latin1'), next: end + 2 }
}

/** ERROR, CLIENT_ERROR and SERVER_ERROR leave the stream in step: the request failed, not the connection. */
function serverError (line, next) {
  if (line === 'ERROR' || line.startsWith('CLIENT_ERROR') || line.startsWith('SERVER_ERROR')) {
    return { consumed: next, error: new KvError('KV_PROTOCOL', `kv answered: ${line}`) }
  }
  return null
}

function parseStored (buf) {
  const first = firstLine(buf)
  if (first === null) return null
  if (first.line === 'STORED') return { consumed: first.next, value: true }
  if (first.line === 'NOT_STORED') return { consumed: first.next, value: false }
  const err = serverError(first.line, first.next)
  if (err !== null) return err
  throw new KvError('KV_PROTOCOL', `unexpected answer to set: ${JSON.stringify(first.line)}`)
}

function parseGet (buf) {
  const first = firstLine(buf)
  if (first === null) return null
  if (first.line === 'END') return { consumed: first.next, value: null }
  const err = serverError(first.line, first.next)
  if (err !== null) return err
  const m = /^VALUE \S+ (\d+) (\d+)$/.exec(first.line)
  if (m === null) throw new KvError('KV_PROTOCOL', `unexpected answer to get: ${JSON.stringify(first.line)}`)
  const flags = Number(m[1])
  const bytes = Number(m[2])
  const dataEnd = first.next + bytes
  const tail = `${CRLF}END${CRLF}`
  if (buf.length < dataEnd + tail.length) return null
  if (buf.subarray(dataEnd, dataEnd + tail.length).toString('latin1') !== tail) {
    throw new KvError('KV_PROTOCOL', 'get: the value is not followed by END')
  }
  return { consumed: dataEnd + tail.length, value: { value: buf.subarray(first.next, dataEnd).toString('utf8'), flags } }
}
