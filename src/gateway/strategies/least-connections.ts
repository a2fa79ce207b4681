import type { Strategy, StrategyEndpoint } from './strategy.js'

/**
 * The candidate with the fewest requests and connections in flight; ties go
 * round robin, so that an idle service still spreads its requests.
 */
export class LeastConnections<E extends StrategyEndpoint> implements Strategy<E> {
  private candidates: readonly E[] = []
  private next = 0

  update (candidates: readonly E[]): void {
    this.candidates = candidates
  }

  pick (_key: string | undefined, tried: readonly E[] | undefined): E | undefined {
    const list = this.candidates
    const n = list.length
    let best: E | undefined
    let bestIndex = 0
    for (let k = 0; k < n; k++) {
      const i = (this.next + k) % n
      const e = list[i] as E
      if (tried !== undefined && tried.includes(e)) continue
      if (best === undefined || e.inFlight < best.inFlight) {
        best = e
        bestIndex = i
      }
    }
    this.next = bestIndex + 1
    return best
  }
}
