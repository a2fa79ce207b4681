import { STATUS_CODES, type ServerResponse } from 'node:http'
import { UigniterError, type ErrorCode } from '../core/errors.js'

/**
 * Answers a request with one of the gateway's own errors, as the API does:
 * `{ code, message, statusCode }`. 503s carry Retry-After. `statusCode`
 * overrides the code's own status (a removed service's held requests: 503,
 * since the service may be back shortly).
 */
export function sendGatewayError (res: ServerResponse, code: ErrorCode, message: string, retryAfterS?: number): void {
  // Headers out already (the answer began), or nobody to tell: all that is left is to cut the connection.
  if (res.headersSent || res.destroyed) {
    res.destroy()
    return
  }
  try {
    const body = new UigniterError(code, message).toJSON()
    const payload = JSON.stringify(body)
    const headers: string[] = ['Content-Type', 'application/json; charset=utf-8', 'Content-Length', String(Buffer.byteLength(payload))]
    if (retryAfterS !== undefined) headers.push('Retry-After', String(Math.max(1, Math.ceil(retryAfterS))))
    // The reason is given, never left to writeHead: a writeHead that threw on an upstream's status line leaves
    // that reason in res.statusMessage, and writeHead would reuse it and throw again (issue 10).
    res.statusMessage = STATUS_CODES[body.statusCode] ?? 'Error'
    res.writeHead(body.statusCode, res.statusMessage, headers)
    res.end(payload)
  } catch {
    // This answer cannot be written either: the client gets a closed connection, and nothing else is affected.
    res.destroy()
  }
}
