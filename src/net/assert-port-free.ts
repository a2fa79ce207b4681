import { createServer } from 'node:net'
import { UigniterError, hasErrno } from '../core/errors.js'

/**
 * Throws UIG_ERR_NET_PORT_IN_USE when a host program listens on
 * `address:port` (or on the same port of every address), by binding it for a
 * moment: a port forward there would silently steal that program's traffic.
 * Throws UIG_ERR_NET_PUBLISH_INVALID when `address` is not one of the host's.
 *
 * @example
 * await assertPortFree('127.0.0.1', 8080)
 */
export async function assertPortFree (address: string, port: number): Promise<void> {
  await new Promise<void>((resolve, reject) => {
    const server = createServer()
    server.once('error', (err) => {
      if (hasErrno(err, 'EADDRINUSE')) {
        reject(new UigniterError('UIG_ERR_NET_PORT_IN_USE',
          `host port ${address}:${port} is in use by a program on this host (ss -ltnp 'sport = :${port}' shows which); publish another host port`, { cause: err }))
      } else if (hasErrno(err, 'EADDRNOTAVAIL')) {
        reject(new UigniterError('UIG_ERR_NET_PUBLISH_INVALID',
          `${address} is not an address of this host; publish on 127.0.0.1, 0.0.0.0 or one of the host's addresses`, { cause: err }))
      } else reject(err)
    })
    // exclusive: a port held by another process of a node cluster counts too.
    server.listen({ host: address, port, exclusive: true }, () => { server.close(() => resolve()) })
  })
}
