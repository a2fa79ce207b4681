import { createServer, type Server, type Socket } from 'node:net'
import { UigniterError, hasErrno } from '../core/errors.js'
import type { GatewayService } from './gateway-service.js'
import { TcpProxyConnection } from './tcp-proxy-connection.js'

/** One TCP port of the gateway, proxied to a port of a service's endpoints. */
export class TcpListener {
  private readonly server: Server
  private readonly connections = new Set<TcpProxyConnection>()

  constructor (private readonly service: GatewayService, readonly address: string, readonly gatewayPort: number, public port: number,
    private readonly connectTimeoutMs: number) {
    // pauseOnConnect: nothing is read from a client before its endpoint is
    // connected, so a held connection loses none of the bytes it sent.
    this.server = createServer({ allowHalfOpen: true, pauseOnConnect: true, noDelay: true }, (socket) => this.onConnection(socket))
  }

  /** Starts listening; UIG_ERR_GATEWAY_PORT_IN_USE when the port is taken (or not ours to take). */
  async listen (): Promise<void> {
    await new Promise<void>((resolve, reject) => {
      const onError = (err: Error): void => {
        reject(hasErrno(err, 'EADDRINUSE', 'EACCES', 'EADDRNOTAVAIL')
          ? new UigniterError('UIG_ERR_GATEWAY_PORT_IN_USE', `the gateway cannot listen on ${this.address}:${this.gatewayPort} for ${this.service.name} (${(err as NodeJS.ErrnoException).code})`, { cause: err })
          : err)
      }
      this.server.once('error', onError)
      this.server.listen(this.gatewayPort, this.address, () => {
        this.server.off('error', onError)
        resolve()
      })
    })
    this.server.on('error', () => { /* a listening server's errors are per connection; each is handled there */ })
  }

  /** Stops accepting; the connections open now go on until either side ends them. */
  close (): void {
    this.server.close()
  }

  /** Stops accepting and cuts every connection. */
  destroy (): void {
    this.server.close()
    for (const c of [...this.connections]) c.destroy()
  }

  private onConnection (socket: Socket): void {
    const service = this.service
    service.tcpConnections++
    service.lastRequestAt = Date.now()
    const connection = new TcpProxyConnection(service, socket, () => this.port, this.connectTimeoutMs)
    this.connections.add(connection)
    socket.once('close', () => this.connections.delete(connection))
    connection.forward()
  }
}
