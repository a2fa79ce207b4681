import { request } from 'node:http'
import { UigniterError, errorCodes, type ErrorCode } from '../core/errors.js'

/** Answers larger than this from a peer are refused: a peer is another node, but a broken one must not fill our memory. */
const MAX_ANSWER_BYTES = 8 * 1024 * 1024

/**
 * JSON over HTTP to another node's API, with the cluster's shared token.
 * A peer's error comes back as the UigniterError it sent; a peer that does
 * not answer in time is UIG_ERR_NODE_UNREACHABLE.
 */
export class PeerClient {
  readonly #token: string | undefined

  constructor (token: string | undefined) {
    this.#token = token
  }

  async call<T> (apiUrl: string, method: string, path: string, body?: unknown, timeoutMs = 5000): Promise<T> {
    const url = new URL(path, apiUrl)
    const payload = body === undefined ? undefined : JSON.stringify(body)
    const headers: Record<string, string> = {}
    if (payload !== undefined) headers['content-type'] = 'application/json'
    if (this.#token !== undefined) headers.authorization = `Bearer ${this.#token}`
    return await new Promise<T>((resolve, reject) => {
      const req = request(url, { method, headers, timeout: timeoutMs }, (res) => {
        const chunks: Buffer[] = []
        let size = 0
        res.on('data', (chunk: Buffer) => {
          size += chunk.length
          if (size > MAX_ANSWER_BYTES) { req.destroy(new Error(`answer larger than ${MAX_ANSWER_BYTES} bytes`)); return }
          chunks.push(chunk)
        })
        res.on('end', () => {
          const text = Buffer.concat(chunks).toString('utf8')
          const status = res.statusCode ?? 500
          if (status >= 400) { reject(peerError(apiUrl, status, text)); return }
          try {
            resolve((res.headers['content-type']?.includes('application/json') === true ? JSON.parse(text) : text) as T)
          } catch (err) {
            reject(new UigniterError('UIG_ERR_NODE_UNREACHABLE', `node ${apiUrl} answered ${method} ${path} with malformed JSON`, { cause: err }))
          }
        })
        res.on('error', (err) => reject(unreachable(apiUrl, method, path, err)))
      })
      req.on('timeout', () => req.destroy(new Error(`no answer within ${timeoutMs} ms`)))
      req.on('error', (err) => reject(unreachable(apiUrl, method, path, err)))
      req.end(payload)
    })
  }
}

function unreachable (apiUrl: string, method: string, path: string, err: Error): UigniterError {
  return new UigniterError('UIG_ERR_NODE_UNREACHABLE', `node ${apiUrl} did not answer ${method} ${path}: ${err.message}`, { cause: err })
}

function peerError (apiUrl: string, status: number, text: string): UigniterError {
  try {
    const body = JSON.parse(text) as { code?: string, message?: string }
    if (body.code !== undefined && body.code in errorCodes) return new UigniterError(body.code as ErrorCode, body.message ?? text)
  } catch { /* not JSON */ }
  return new UigniterError('UIG_ERR_NODE_UNREACHABLE', `node ${apiUrl} answered ${status}: ${text.slice(0, 300)}`)
}
