import type { Strategy, StrategyEndpoint } from './strategy.js'

/**
 * Smooth weighted round robin (nginx's): over any run of sum-of-weights
 * picks each candidate gets exactly its weight, interleaved rather than in
 * bursts (weights 3:1:1 give a a b a c, not a a a b c).
 */
export class Weighted<E extends StrategyEndpoint> implements Strategy<E> {
  private candidates: readonly E[] = []
  private current: number[] = []

  update (candidates: readonly E[]): void {
    // Keep the running weights of the endpoints that stay, so that a change
    // elsewhere does not restart everyone's turn.
    const previous = new Map<string, number>()
    this.candidates.forEach((e, i) => previous.set(e.id, this.current[i] ?? 0))
    this.candidates = candidates
    this.current = candidates.map((e) => previous.get(e.id) ?? 0)
  }

  pick (_key: string | undefined, tried: readonly E[] | undefined): E | undefined {
    const list = this.candidates
    const current = this.current
    let total = 0
    let best = -1
    for (let i = 0; i < list.length; i++) {
      const e = list[i] as E
      if (tried !== undefined && tried.includes(e)) continue
      const w = Math.max(1, e.weight)
      const c = (current[i] as number) + w
      current[i] = c
      total += w
      if (best < 0 || c > (current[best] as number)) best = i
    }
    if (best < 0) return undefined
    current[best] = (current[best] as number) - total
    return list[best]
  }
}
