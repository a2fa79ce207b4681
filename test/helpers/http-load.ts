import { Agent, request } from 'node:http'

export interface HttpAnswer { status: number, body: string, headers: Record<string, string | string[] | undefined>, ms: number }

/** One GET; rejects on a connection error or after `timeoutMs`. */
export async function httpGet (url: string, options: { agent?: Agent, timeoutMs?: number, headers?: Record<string, string> } = {}): Promise<HttpAnswer> {
  const started = performance.now()
  return await new Promise((resolve, reject) => {
    const req = request(url, { agent: options.agent ?? false, timeout: options.timeoutMs ?? 30_000, ...(options.headers !== undefined ? { headers: options.headers } : {}) }, (res) => {
      let body = ''
      res.setEncoding('utf8')
      res.on('data', (c: string) => { body += c })
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body, headers: res.headers, ms: performance.now() - started }))
      res.on('error', reject)
    })
    req.on('error', reject)
    req.on('timeout', () => req.destroy(new Error(`no answer from ${url} within ${options.timeoutMs ?? 30_000} ms`)))
    req.end()
  })
}

export interface LoadResult { ok: number, failures: string[], bodies: Map<string, number> }

/**
 * Keeps `concurrency` GET loops running against `url` (keep-alive) until
 * stopped; every answer other than 200, and every error, is a failure.
 * `bodies` counts the answers by body (the hello example answers its hostname).
 */
export function startLoad (url: string, concurrency: number): { stop: () => Promise<LoadResult> } {
  const agent = new Agent({ keepAlive: true, maxSockets: concurrency })
  const result: LoadResult = { ok: 0, failures: [], bodies: new Map() }
  let running = true
  const loops = Array.from({ length: concurrency }, async () => {
    while (running) {
      try {
        const answer = await httpGet(url, { agent, timeoutMs: 20_000 })
        if (answer.status === 200) {
          result.ok++
          const key = answer.body.trim()
          result.bodies.set(key, (result.bodies.get(key) ?? 0) + 1)
        } else {
          result.failures.push(`${answer.status} ${answer.body.slice(0, 200)}`)
        }
      } catch (err) {
        result.failures.push((err as Error).message)
      }
    }
  })
  return {
    stop: async () => {
      running = false
      await Promise.all(loops)
      agent.destroy()
      return result
    }
  }
}
