import type { ServerResponse } from 'node:http'
import { UigniterError, type ErrorCode } from '../core/errors.js'

/**
 * Answers a request with one of the gateway's own errors, as the API does:
 * `{ code, message, statusCode }`. 503s carry Retry-After. `statusCode`
 * overrides the code's own status (a removed service's held requests: 503,
 * since the service may be back shortly).
 */
export function sendGatewayError (res: ServerResponse, code: ErrorCode, message: string, retryAfterS?: number): void {
  if (res.headersSent || res.destroyed) {
    res.destroy()
    return
  }
  const body = new UigniterError(code, message).toJSON()
  const payload = JSON.stringify(body)
  const headers: string[] = ['Content-Type', 'application/json; charset=utf-8', 'Content-Length', String(Buffer.byteLength(payload))]
  if (retryAfterS !== undefined) headers.push('Retry-After', String(Math.max(1, Math.ceil(retryAfterS))))
  res.writeHead(body.statusCode, headers)
  res.end(payload)
}
