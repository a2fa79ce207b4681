import type { Strategy, StrategyEndpoint } from './strategy.js'

/**
 * The lowest priority value wins: round robin within the best tier that has
 * a candidate; the next tier only when the better ones have none (ejected,
 * removed, or all tried by a retry).
 */
export class PriorityTiers<E extends StrategyEndpoint> implements Strategy<E> {
  private tiers: Array<{ priority: number, endpoints: E[], next: number }> = []

  update (candidates: readonly E[]): void {
    const cursors = new Map(this.tiers.map((t) => [t.priority, t.next]))
    const byPriority = new Map<number, E[]>()
    for (const e of candidates) {
      const tier = byPriority.get(e.priority)
      if (tier === undefined) byPriority.set(e.priority, [e])
      else tier.push(e)
    }
    this.tiers = [...byPriority.entries()]
      .sort((a, b) => a[0] - b[0])
      .map(([priority, endpoints]) => ({ priority, endpoints, next: cursors.get(priority) ?? 0 }))
  }

  pick (_key: string | undefined, tried: readonly E[] | undefined): E | undefined {
    for (const tier of this.tiers) {
      const n = tier.endpoints.length
      for (let k = 0; k < n; k++) {
        const i = (tier.next + k) % n
        const e = tier.endpoints[i] as E
        if (tried === undefined || !tried.includes(e)) {
          tier.next = i + 1
          return e
        }
      }
    }
    return undefined
  }
}
