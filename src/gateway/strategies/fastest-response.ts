import type { Strategy, StrategyEndpoint } from './strategy.js'

/**
 * An endpoint not sampled for this long gets one probe request, so that one
 * that was slow once (a GC pause, a cold cache) is not shunned for ever.
 */
const STALE_MS = 2000

/**
 * Fastest response: the lowest EWMA of response-header latency, times the
 * requests already in flight to it (peak-EWMA, as Finagle and Linkerd do), so
 * that the fastest endpoint is favoured until its queue makes it slower than
 * the next. An endpoint without a (fresh) sample and nothing in flight goes
 * first, to be measured; ties go to the one with fewer in flight.
 */
export class FastestResponse<E extends StrategyEndpoint> implements Strategy<E> {
  private candidates: readonly E[] = []

  constructor (private readonly now: () => number = () => performance.now()) {}

  update (candidates: readonly E[]): void {
    this.candidates = candidates
  }

  pick (_key: string | undefined, tried: readonly E[] | undefined): E | undefined {
    const now = this.now()
    let best: E | undefined
    let bestCost = 0
    for (const e of this.candidates) {
      if (tried !== undefined && tried.includes(e)) continue
      const cost = e.ewmaMs === null || now - e.sampledAt > STALE_MS
        ? (e.inFlight === 0 ? 0 : Infinity)
        : e.ewmaMs * (e.inFlight + 1)
      if (best === undefined || cost < bestCost || (cost === bestCost && e.inFlight < best.inFlight)) {
        best = e
        bestCost = cost
      }
    }
    return best
  }
}
