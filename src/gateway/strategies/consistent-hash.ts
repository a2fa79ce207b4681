import { hash32 } from '../hash32.js'
import { RoundRobin } from './round-robin.js'
import type { Strategy, StrategyEndpoint } from './strategy.js'

/**
 * Points per endpoint on the ring: enough that N endpoints each own about
 * 1/N of the keys (within a few per cent), few enough to rebuild at once.
 */
const VIRTUAL_NODES = 160

/**
 * Consistent hashing on a ring with virtual nodes: a key goes to the
 * endpoint owning the first point at or after its hash, so that adding or
 * removing an endpoint moves only the keys of the points it gains or loses
 * (about 1/N). A retry walks on along the ring. A request without a key
 * (no such header or cookie) goes round robin.
 */
export class ConsistentHash<E extends StrategyEndpoint> implements Strategy<E> {
  private points = new Uint32Array(0)
  private owners: E[] = []
  private readonly fallback = new RoundRobin<E>()
  private readonly pointsById = new Map<string, Uint32Array>()

  update (candidates: readonly E[]): void {
    this.fallback.update(candidates)
    const entries: Array<{ point: number, owner: E }> = []
    const seen = new Set<string>()
    for (const e of candidates) {
      seen.add(e.id)
      let points = this.pointsById.get(e.id)
      if (points === undefined) {
        points = new Uint32Array(VIRTUAL_NODES)
        for (let i = 0; i < VIRTUAL_NODES; i++) points[i] = hash32(`${e.id}#${i}`)
        this.pointsById.set(e.id, points)
      }
      for (const point of points) entries.push({ point, owner: e })
    }
    for (const id of this.pointsById.keys()) if (!seen.has(id)) this.pointsById.delete(id)
    // Ties (two ids hashing to one point) are broken by id, so that the ring
    // does not depend on the order of the candidates.
    entries.sort((a, b) => a.point - b.point || (a.owner.id < b.owner.id ? -1 : 1))
    this.points = Uint32Array.from(entries, (x) => x.point)
    this.owners = entries.map((x) => x.owner)
  }

  pick (key: string | undefined, tried: readonly E[] | undefined): E | undefined {
    if (key === undefined) return this.fallback.pick(key, tried)
    const points = this.points
    const n = points.length
    if (n === 0) return undefined
    const h = hash32(key)
    let lo = 0
    let hi = n
    while (lo < hi) {
      const mid = (lo + hi) >>> 1
      if ((points[mid] as number) < h) lo = mid + 1
      else hi = mid
    }
    for (let k = 0; k < n; k++) {
      const e = this.owners[(lo + k) % n] as E
      if (tried === undefined || !tried.includes(e)) return e
    }
    return undefined
  }
}
