import type { LoadBalancing } from '../core/service.js'

/** An endpoint the gateway may send a service's requests to. */
export interface GatewayEndpoint {
  /** The VM id, or `external:HOST`. */
  id: string
  /** IPv4 address. */
  host: string
  weight: number
  priority: number
}

/** How the gateway routes one service. */
export interface GatewayRoute {
  /** Its name: Host `NAME[.anything]` or the `/svc/NAME/` prefix route HTTP to it. */
  service: string
  loadBalancing: LoadBalancing
  /** The endpoints' HTTP port; absent: no HTTP route (404 UIG_ERR_GATEWAY_NO_SERVICE). */
  httpPort?: number
  /** One listener on `address:gatewayPort` each, proxied to `endpoint.host:port`. */
  tcp: Array<{ gatewayPort: number, port: number }>
  hold: { maxRequests: number, timeoutMs: number }
}
