import { connect } from 'node:net'

/**
 * Sends one memcached text-protocol command to HOST:PORT and resolves with the
 * reply line(s), retrying connection failures until the app listens.
 */
export async function memcachedCommand (host: string, port: number, command: string, timeoutMs = 60_000): Promise<string> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    try {
      return await new Promise((resolve, reject) => {
        const socket = connect(port, host)
        let reply = ''
        socket.setTimeout(3000, () => socket.destroy(new Error('timeout')))
        socket.on('connect', () => socket.write(command))
        socket.on('data', (c: Buffer) => { reply += c.toString(); if (reply.endsWith('\r\n')) { socket.end(); resolve(reply) } })
        socket.on('error', reject)
        socket.on('close', () => reject(new Error('closed before a reply')))
      })
    } catch (err) {
      if (Date.now() > deadline) throw err
      await new Promise((resolve) => setTimeout(resolve, 200))
    }
  }
}
