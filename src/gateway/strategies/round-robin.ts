import type { Strategy, StrategyEndpoint } from './strategy.js'

/** Each candidate in turn. */
export class RoundRobin<E extends StrategyEndpoint> implements Strategy<E> {
  private candidates: readonly E[] = []
  private next = 0

  update (candidates: readonly E[]): void {
    this.candidates = candidates
  }

  pick (_key: string | undefined, tried: readonly E[] | undefined): E | undefined {
    const list = this.candidates
    const n = list.length
    for (let k = 0; k < n; k++) {
      const i = (this.next + k) % n
      const e = list[i] as E
      if (tried === undefined || !tried.includes(e)) {
        this.next = i + 1
        return e
      }
    }
    return undefined
  }
}
