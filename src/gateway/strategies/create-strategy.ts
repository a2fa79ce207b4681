import type { StrategyName } from '../../core/service.js'
import { ConsistentHash } from './consistent-hash.js'
import { FastestResponse } from './fastest-response.js'
import { LeastConnections } from './least-connections.js'
import { PowerOfTwo } from './power-of-two.js'
import { PriorityTiers } from './priority.js'
import { RandomPick } from './random.js'
import { RoundRobin } from './round-robin.js'
import type { Strategy, StrategyEndpoint } from './strategy.js'
import { Weighted } from './weighted.js'

/**
 * A new, empty strategy of that name.
 *
 * @example
 * const strategy = createStrategy('weighted')
 * strategy.update(endpoints)
 * const endpoint = strategy.pick(undefined, undefined)
 */
export function createStrategy<E extends StrategyEndpoint> (name: StrategyName): Strategy<E> {
  switch (name) {
    case 'round-robin': return new RoundRobin<E>()
    case 'weighted': return new Weighted<E>()
    case 'priority': return new PriorityTiers<E>()
    case 'least-connections': return new LeastConnections<E>()
    case 'fastest-response': return new FastestResponse<E>()
    case 'power-of-two': return new PowerOfTwo<E>()
    case 'random': return new RandomPick<E>()
    case 'consistent-hash': return new ConsistentHash<E>()
  }
}
