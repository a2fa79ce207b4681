// JSON over HTTP for api and worker: reading and answering requests, and
// calling another service through the uigniter gateway.

import { Agent, request } from 'node:http'

/** An error the server answers as `{ code, message }` with `status`. */
export class HttpError extends Error {
  constructor (status, code, message, extra = {}) {
    super(message)
    this.status = status
    this.code = code
    this.extra = extra
  }
}

export function sendJson (res, status, body) {
  const text = JSON.stringify(body) + '\n'
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) })
  res.end(text)
}

/** Answers an error: HttpError as it says, a kv failure as 503 or 502, anything else as 500. */
export function sendError (res, err, log) {
  if (err instanceof HttpError) return sendJson(res, err.status, { code: err.code, message: err.message, ...err.extra })
  if (err?.name === 'KvError') {
    // The kv service being down or slow is a 503 (try again); a kv that answers nonsense is a 502.
    const status = err.code === 'KV_PROTOCOL' ? 502 : 503
    return sendJson(res, status, { code: err.code, message: err.message })
  }
  log(`internal error: ${err?.stack ?? err}`)
  return sendJson(res, 500, { code: 'INTERNAL', message: 'internal error' })
}

/** The request body as JSON (an object), at most `limit` bytes; 400, 413 or 415 otherwise. */
export async function readJson (req, limit = 64 * 1024) {
  const type = req.headers['content-type'] ?? 'application/json'
  if (!/^application\/json\b/i.test(type)) throw new HttpError(415, 'UNSUPPORTED_MEDIA_TYPE', `send application/json, not ${type}`)
  const chunks = []
  let size = 0
  for await (const chunk of req) {
    size += chunk.length
    if (size > limit) throw new HttpError(413, 'BODY_TOO_LARGE', `the body is larger than ${limit} bytes`)
    chunks.push(chunk)
  }
  let body
  try {
    body = JSON.parse(Buffer.concat(chunks).toString('utf8'))
  } catch (err) {
    throw new HttpError(400, 'BAD_JSON', `the body is not valid JSON: ${err.message}`)
  }
  if (body === null || typeof body !== 'object' || Array.isArray(body)) throw new HttpError(400, 'BAD_REQUEST', 'the body must be a JSON object')
  return body
}

/**
 * How to reach a service by name: through the gateway, which the guest learns
 * of at boot (UIGNITER_GATEWAY_HOST, UIGNITER_GATEWAY_HTTP_PORT).
 */
export function serviceUrl (service, path, env = process.env) {
  const host = env.UIGNITER_GATEWAY_HOST
  const port = env.UIGNITER_GATEWAY_HTTP_PORT
  if (host === undefined || port === undefined) {
    throw new Error('UIGNITER_GATEWAY_HOST and UIGNITER_GATEWAY_HTTP_PORT are not set: run this under uigniter, or set them')
  }
  return new URL(`/svc/${service}${path}`, `http://${host}:${port}`)
}

const agent = new Agent({ keepAlive: true, maxSockets: 64 })

/**
 * POSTs `body` as JSON; resolves to { status, body } whatever the status.
 * Throws HttpError 502 UPSTREAM_UNREACHABLE when no answer comes (refused,
 * reset, timed out). A request sent on a kept-alive connection the gateway
 * had just closed is sent again once: the callers' requests are idempotent.
 */
export async function postJson (url, body, { timeoutMs = 60_000 } = {}) {
  for (let attempt = 0; ; attempt++) {
    try {
      return await postOnce(url, body, timeoutMs)
    } catch (err) {
      if (!(err.reusedSocket && err.code === 'ECONNRESET' && attempt === 0)) {
        const why = err.code === 'TIMEOUT' ? `no answer within ${timeoutMs} ms` : `${err.code ?? ''} ${err.message}`.trim()
        throw new HttpError(502, 'UPSTREAM_UNREACHABLE', `POST ${url} failed: ${why}`)
      }
    }
  }
}

function postOnce (url, body, timeoutMs) {
  const text = JSON.stringify(body)
  return new Promise((resolve, reject) => {
    const req = request(url, {
      method: 'POST',
      agent,
      headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) }
    }, (res) => {
      const chunks = []
      res.on('data', (c) => chunks.push(c))
      res.on('error', reject)
      res.on('end', () => {
        clearTimeout(timer)
        const raw = Buffer.concat(chunks).toString('utf8')
        let parsed
        try { parsed = JSON.parse(raw) } catch { parsed = { message: raw.slice(0, 500) } }
        resolve({ status: res.statusCode, body: parsed })
      })
    })
    // A deadline on the whole exchange: a held request (a service waking from
    // zero) is silent until it is answered, so an idle-socket timeout would not do.
    const timer = setTimeout(() => req.destroy(Object.assign(new Error('timed out'), { code: 'TIMEOUT' })), timeoutMs)
    req.on('error', (err) => {
      clearTimeout(timer)
      err.reusedSocket = req.reusedSocket
      reject(err)
    })
    req.end(text)
  })
}

/** Starts `server` on PORT (default 8080) and closes it gracefully on SIGTERM or SIGINT. */
export function serve (server, name, onClose = () => {}) {
  const port = Number(process.env.PORT ?? 8080)
  // Longer than Node's 5 s: the proxy in front, not the app, should close idle
  // kept-alive connections (one reused just as the server closes it is reset).
  server.keepAliveTimeout = 65_000
  server.listen(port, () => console.log(`${name}: listening on :${server.address().port}`))
  const stop = (signal) => {
    console.log(`${name}: ${signal}, stopping`)
    server.close(() => { onClose(); console.log(`${name}: stopped`) })
    server.closeIdleConnections()
  }
  process.once('SIGTERM', stop)
  process.once('SIGINT', stop)
}
