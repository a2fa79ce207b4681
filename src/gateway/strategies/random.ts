import type { Strategy, StrategyEndpoint } from './strategy.js'

/** A uniformly random candidate. */
export class RandomPick<E extends StrategyEndpoint> implements Strategy<E> {
  private candidates: readonly E[] = []

  update (candidates: readonly E[]): void {
    this.candidates = candidates
  }

  pick (_key: string | undefined, tried: readonly E[] | undefined): E | undefined {
    const list = tried === undefined ? this.candidates : this.candidates.filter((e) => !tried.includes(e))
    return list[Math.floor(Math.random() * list.length)]
  }
}
