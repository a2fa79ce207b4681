import { connect } from 'node:net'
import { setTimeout as sleep } from 'node:timers/promises'

/** Where an app should answer, as the host reaches it. */
export interface AppProbe {
  host: string
  port: number
  /** GET this path and want 2xx/3xx; without it, a TCP connection that stays open. */
  httpPath?: string
  /** Any HTTP answer will do (warming an app up, not checking its health). */
  anyStatus?: boolean
}

/**
 * A connection that stays open this long counts as an answer. QEMU's
 * user-mode forward accepts on the host before it knows whether the guest
 * listens, and closes the connection when the guest refuses: an accept
 * alone proves nothing there.
 */
const TCP_SETTLE_MS = 250

/** How long a probe waits for the app to close its end after an answer. */
const CLOSE_WAIT_MS = 1000

/**
 * One attempt: resolves to whether the app answered. Never throws. An
 * answered probe ends cleanly: it waits for the app to close its side, so
 * that no half-open connection is left in a guest about to be snapshotted
 * (a single-threaded app blocked on it would be stuck in every clone).
 */
export async function probeOnce (probe: AppProbe, timeoutMs = 2000): Promise<boolean> {
  return await new Promise((resolve) => {
    const socket = connect({ host: probe.host, port: probe.port, timeout: timeoutMs })
    let settled = false
    const done = (ok: boolean): void => {
      if (settled) return
      settled = true
      if (!ok) {
        socket.destroy()
        resolve(false)
        return
      }
      // Answered: say goodbye and let the app close its end.
      const timer = setTimeout(() => socket.destroy(), CLOSE_WAIT_MS)
      socket.once('close', () => { clearTimeout(timer); resolve(true) })
      socket.end()
    }
    socket.once('timeout', () => done(false))
    socket.once('error', () => done(false))
    socket.once('close', () => done(false))
    socket.once('connect', () => {
      if (probe.httpPath === undefined) {
        setTimeout(() => done(true), TCP_SETTLE_MS).unref()
        return
      }
      socket.write(`GET ${probe.httpPath} HTTP/1.1\r\nHost: ${probe.host}\r\nConnection: close\r\n\r\n`)
      let head = ''
      socket.setEncoding('latin1')
      socket.on('data', (chunk: string) => {
        if (settled) return
        head += chunk
        const status = /^HTTP\/1\.[01] (\d{3})/.exec(head)
        if (status !== null) done(probe.anyStatus === true || (Number(status[1]) >= 200 && Number(status[1]) < 400))
        else if (head.length > 1024 || head.includes('\r\n')) done(false)
      })
    })
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
