/**
 * What a load-balancing strategy knows of an endpoint. The gateway's own
 * endpoint objects satisfy it, so that a pick is a plain property read.
 */
export interface StrategyEndpoint {
  readonly id: string
  readonly weight: number
  readonly priority: number
  /** Requests and TCP connections open to it now. */
  readonly inFlight: number
  /** EWMA of the response-header latency, null until the first answer. */
  readonly ewmaMs: number | null
  /** performance.now() of the last latency sample (0: none). */
  readonly sampledAt: number
}

/**
 * One way of picking the endpoint of a request or connection. The gateway
 * calls `update` whenever the candidates change (endpoints set, ejected or
 * re-admitted); candidates are never ejected ones.
 */
export interface Strategy<E extends StrategyEndpoint = StrategyEndpoint> {
  update (candidates: readonly E[]): void
  /**
   * An endpoint not in `tried` (the endpoints a retried request already
   * failed on; undefined on a first attempt), or undefined when every
   * candidate was tried. `key` is the consistent-hash key, when there is one.
   */
  pick (key: string | undefined, tried: readonly E[] | undefined): E | undefined
}
