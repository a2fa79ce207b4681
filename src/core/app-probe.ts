import { request } from 'node:http'
import { connect } from 'node:net'
import { setTimeout as sleep } from 'node:timers/promises'

/** Where an app should answer, as the host reaches it. */
export interface AppProbe {
  host: string
  port: number
  /** GET this path and want 2xx/3xx; without it, a TCP connection that stays open. */
  httpPath?: string
}

/**
 * A connection that stays open this long counts as an answer. QEMU's
 * user-mode forward accepts on the host before it knows whether the guest
 * listens, and closes the connection when the guest refuses: an accept
 * alone proves nothing there.
 */
const TCP_SETTLE_MS = 250

/** One attempt: resolves to whether the app answered. Never throws. */
export async function probeOnce (probe: AppProbe, timeoutMs = 2000): Promise<boolean> {
  if (probe.httpPath !== undefined) {
    return await new Promise((resolve) => {
      const req = request({ host: probe.host, port: probe.port, path: probe.httpPath, timeout: timeoutMs, agent: false }, (res) => {
        res.resume()
        const status = res.statusCode ?? 0
        resolve(status >= 200 && status < 400)
      })
      req.on('timeout', () => req.destroy(new Error('timeout')))
      req.on('error', () => resolve(false))
      req.end()
    })
  }
  return await new Promise((resolve) => {
    const socket = connect({ host: probe.host, port: probe.port, timeout: timeoutMs })
    let settled = false
    const done = (ok: boolean): void => {
      if (settled) return
      settled = true
      socket.destroy()
      resolve(ok)
    }
    socket.once('connect', () => { setTimeout(() => done(true), TCP_SETTLE_MS).unref() })
    socket.once('timeout', () => done(false))
    socket.once('error', () => done(false))
    socket.once('close', () => done(false))
  })
}

/**
 * Probes every `intervalMs` until the app answers or the deadline passes;
 * `gaveUp` can end the wait early (the VM died), with its reason.
 */
export async function waitForAppAnswer (probe: AppProbe, timeoutMs: number, gaveUp: () => string | undefined, intervalMs = 100): Promise<void> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    if (await probeOnce(probe, Math.min(2000, Math.max(100, deadline - Date.now())))) return
    const reason = gaveUp()
    if (reason !== undefined) throw new Error(reason)
    if (Date.now() > deadline) {
      throw new Error(`the app did not answer ${probe.httpPath !== undefined ? `GET ${probe.httpPath}` : 'TCP'} on ${probe.host}:${probe.port} within ${timeoutMs} ms`)
    }
    await sleep(intervalMs)
  }
}
