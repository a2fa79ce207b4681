import { request } from 'node:http'
import { UigniterError } from './errors.js'

/**
 * GETs a URL on 127.0.0.1, retrying connection failures until the deadline:
 * QEMU's port forward accepts before the app listens, then resets or hangs,
 * so a short `attemptTimeoutMs` keeps a benchmark from waiting on a dead attempt.
 */
export async function httpGetWithRetry (port: number, path: string, timeoutMs: number, attemptTimeoutMs = 5000): Promise<{ status: number, body: string }> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    try {
      return await new Promise((resolve, reject) => {
        const req = request({ host: '127.0.0.1', port, path, timeout: attemptTimeoutMs }, (res) => {
          let body = ''
          res.setEncoding('utf8')
          res.on('data', (c: string) => { body += c })
          res.on('end', () => resolve({ status: res.statusCode ?? 0, body }))
          res.on('error', reject)
        })
        req.on('timeout', () => req.destroy(new Error('timeout')))
        req.on('error', reject)
        req.end()
      })
    } catch (err) {
      if (Date.now() > deadline) throw new UigniterError('UIG_ERR_VM_TIMEOUT', `the app did not answer HTTP on guest port within ${timeoutMs} ms: ${(err as Error).message}`)
      await new Promise((r) => setTimeout(r, 100))
    }
  }
}
