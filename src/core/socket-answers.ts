import { request } from 'node:http'

/** True when something answers HTTP on the socket: a live daemon, not a stale file. */
export async function socketAnswers (socketPath: string): Promise<boolean> {
  return await new Promise((resolve) => {
    const req = request({ socketPath, path: '/healthz', timeout: 2000 }, (res) => { res.resume(); resolve(res.statusCode === 200) })
    req.on('error', () => resolve(false))
    req.on('timeout', () => { req.destroy(); resolve(false) })
    req.end()
  })
}
