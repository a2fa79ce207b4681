import type { Strategy, StrategyEndpoint } from './strategy.js'

/**
 * Power of two choices: two distinct random candidates, the one with fewer
 * requests in flight. Nearly as even as least-connections without its herd
 * onto one endpoint that has just been re-admitted or added.
 */
export class PowerOfTwo<E extends StrategyEndpoint> implements Strategy<E> {
  private candidates: readonly E[] = []

  update (candidates: readonly E[]): void {
    this.candidates = candidates
  }

  pick (_key: string | undefined, tried: readonly E[] | undefined): E | undefined {
    const list = tried === undefined ? this.candidates : this.candidates.filter((e) => !tried.includes(e))
    const n = list.length
    if (n < 2) return list[0]
    const i = Math.floor(Math.random() * n)
    let j = Math.floor(Math.random() * (n - 1))
    if (j >= i) j++
    const a = list[i] as E
    const b = list[j] as E
    return b.inFlight < a.inFlight ? b : a
  }
}
