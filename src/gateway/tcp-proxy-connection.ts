import { connect, type Socket } from 'node:net'
import type { GatewayService } from './gateway-service.js'
import type { HeldItem } from './hold-queue.js'
import type { UpstreamEndpoint } from './upstream-endpoint.js'
import { armConnectTimeout } from './upstream-pool.js'

/**
 * One client connection to a service's TCP port: held (paused: what the
 * client sent stays in the kernel until it is forwarded) while the service
 * has no endpoint, connected to the endpoint its strategy picks (on the
 * client's address, for consistent-hash), to another when that connect
 * fails (nothing was sent yet), then piped both ways. Half-closes pass
 * through: a client may shut down its side and still read the answer.
 */
export class TcpProxyConnection implements HeldItem {
  holdTimer: NodeJS.Timeout | undefined
  private upstream: Socket | undefined
  private endpoint: UpstreamEndpoint | undefined
  private tried: UpstreamEndpoint[] | undefined
  private connected = false
  private closed = false

  constructor (private readonly service: GatewayService, private readonly client: Socket, private readonly port: () => number,
    private readonly connectTimeoutMs: number) {
    client.on('error', () => client.destroy())
    client.on('close', () => this.onClientClose())
  }

  /** Sends it to an endpoint, or holds it until there is one. */
  forward (): void {
    if (this.closed) return
    const service = this.service
    const ep = service.strategy.pick(this.client.remoteAddress, this.tried)
    if (ep === undefined) {
      if (this.tried !== undefined && service.candidates.length > 0) {
        // Every endpoint refused it.
        this.client.destroy()
        return
      }
      service.wakeOnce()
      if (!service.hold(this)) {
        service.rejectedHoldLimit++
        this.client.destroy()
      }
      return
    }
    this.endpoint = ep
    service.acquire(ep)
    ep.connections.add(this)
    const up = connect({ host: ep.host, port: this.port(), allowHalfOpen: true, noDelay: true })
    this.upstream = up
    armConnectTimeout(up, this.connectTimeoutMs)
    up.once('connect', () => this.onConnect(up, ep))
    up.on('error', () => this.onUpstreamError(up, ep))
    up.once('close', () => this.onUpstreamClose(up, ep))
  }

  release (): void {
    this.forward()
  }

  expire (reason: 'timeout' | 'removed' | 'closed'): void {
    if (reason === 'timeout') this.service.rejectedTimeout++
    this.client.destroy()
  }

  /** Cuts both sides (the endpoint died, or the gateway closes). */
  destroy (): void {
    this.upstream?.destroy()
    this.client.destroy()
  }

  private onConnect (up: Socket, ep: UpstreamEndpoint): void {
    if (this.closed) {
      up.destroy()
      return
    }
    this.connected = true
    this.service.tcpOpen++
    this.service.recordSuccess(ep)
    this.client.pipe(up)
    up.pipe(this.client)
  }

  private onUpstreamError (up: Socket, ep: UpstreamEndpoint): void {
    if (this.connected || this.closed || this.upstream !== up) return
    // Not connected yet: nothing was sent, so another endpoint may have it.
    if (!ep.dead) this.service.recordFailure(ep)
    this.upstream = undefined
    ;(this.tried ??= []).push(ep)
    if (!ep.dead) this.service.retries++
    this.forward()
  }

  private onUpstreamClose (up: Socket, ep: UpstreamEndpoint): void {
    ep.connections.delete(this)
    this.service.release(ep)
    if (this.upstream !== up) return
    if (this.connected) {
      this.service.tcpOpen--
      this.client.destroy()
    }
  }

  private onClientClose (): void {
    this.closed = true
    if (this.holdTimer !== undefined) this.service.held.remove(this)
    this.upstream?.destroy()
  }
}
