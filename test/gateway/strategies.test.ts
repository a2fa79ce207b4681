import assert from 'node:assert/strict'
import { test } from 'node:test'
import { createStrategy } from '../../src/gateway/strategies/create-strategy.js'
import { ConsistentHash } from '../../src/gateway/strategies/consistent-hash.js'
import { FastestResponse } from '../../src/gateway/strategies/fastest-response.js'
import type { StrategyEndpoint } from '../../src/gateway/strategies/strategy.js'

interface Fake extends StrategyEndpoint {
  id: string
  weight: number
  priority: number
  inFlight: number
  ewmaMs: number | null
  sampledAt: number
}

function fake (id: string, more: Partial<Fake> = {}): Fake {
  return { id, weight: 1, priority: 0, inFlight: 0, ewmaMs: null, sampledAt: 0, ...more }
}

function picks (strategy: { pick: (k: string | undefined, t: Fake[] | undefined) => Fake | undefined }, n: number, key?: (i: number) => string): string[] {
  return Array.from({ length: n }, (_, i) => strategy.pick(key?.(i), undefined)?.id ?? '-')
}

test('round robin takes each in turn, and skips the ones a retry already tried', () => {
  const [a, b, c] = [fake('a'), fake('b'), fake('c')]
  const s = createStrategy<Fake>('round-robin')
  s.update([a, b, c])
  assert.deepEqual(picks(s, 6), ['a', 'b', 'c', 'a', 'b', 'c'])
  assert.equal(s.pick(undefined, [a, b])?.id, 'c')
  assert.equal(s.pick(undefined, [a, b, c]), undefined)
})

test('weighted is nginx\'s smooth weighted round robin: 3:1:1 interleaved, exact over every 5 picks', () => {
  const s = createStrategy<Fake>('weighted')
  s.update([fake('a', { weight: 3 }), fake('b'), fake('c')])
  const seq = picks(s, 10)
  assert.deepEqual(seq.slice(0, 5), ['a', 'b', 'a', 'c', 'a'], 'interleaved, not a a a b c')
  assert.deepEqual(seq.slice(5), seq.slice(0, 5))
})

test('priority: round robin in the best tier, the next tier only when the best has no candidate left', () => {
  const [a, b, x] = [fake('a'), fake('b'), fake('x', { priority: 1 })]
  const s = createStrategy<Fake>('priority')
  s.update([x, a, b])
  assert.deepEqual(picks(s, 4), ['a', 'b', 'a', 'b'])
  assert.equal(s.pick(undefined, [a, b])?.id, 'x', 'a retry that tried the whole tier fails over')
  s.update([x])
  assert.deepEqual(picks(s, 2), ['x', 'x'])
})

test('least connections: the fewest in flight; ties rotate', () => {
  const [a, b, c] = [fake('a', { inFlight: 2 }), fake('b', { inFlight: 0 }), fake('c', { inFlight: 1 })]
  const s = createStrategy<Fake>('least-connections')
  s.update([a, b, c])
  assert.equal(s.pick(undefined, undefined)?.id, 'b')
  assert.equal(s.pick(undefined, [b])?.id, 'c')
  a.inFlight = 0; c.inFlight = 0
  assert.equal(new Set(picks(s, 3)).size, 3, 'idle endpoints share the load')
})

test('fastest response: unmeasured ones first, then the lowest latency times the queue; stale ones get a probe', () => {
  let now = 10_000
  const s = new FastestResponse<Fake>(() => now)
  const fast = fake('fast', { ewmaMs: 1, sampledAt: now })
  const slow = fake('slow', { ewmaMs: 30, sampledAt: now })
  const fresh = fake('new')
  s.update([fast, slow, fresh])
  assert.equal(s.pick(undefined, undefined)?.id, 'new', 'an endpoint never measured is tried first')
  fresh.inFlight = 1
  assert.equal(s.pick(undefined, undefined)?.id, 'fast', '...but only one request at a time until it answers')
  fast.inFlight = 40
  assert.equal(s.pick(undefined, undefined)?.id, 'slow', '41 queued at 1 ms cost more than one at 30 ms')
  fast.inFlight = 0
  now += 5000
  fast.sampledAt = now
  fresh.inFlight = 0; fresh.ewmaMs = 50; fresh.sampledAt = now
  assert.equal(s.pick(undefined, undefined)?.id, 'slow', 'not measured for seconds: probed again')
})

test('power of two choices picks the less loaded of two, and both of two candidates get work', () => {
  const [a, b] = [fake('a', { inFlight: 5 }), fake('b', { inFlight: 1 })]
  const s = createStrategy<Fake>('power-of-two')
  s.update([a, b])
  assert.deepEqual(new Set(picks(s, 20)), new Set(['b']), 'with two candidates both are drawn: always the lighter')
  assert.equal(s.pick(undefined, [b])?.id, 'a')
})

test('consistent hash: a key sticks, keys spread about evenly, and removing an endpoint moves only its keys', () => {
  const eps = ['a', 'b', 'c', 'd'].map((id) => fake(id))
  const s = new ConsistentHash<Fake>()
  s.update(eps)
  const keys = Array.from({ length: 4000 }, (_, i) => `user-${i}`)
  const before = new Map(keys.map((k) => [k, s.pick(k, undefined)?.id]))
  assert.equal(s.pick('user-7', undefined)?.id, before.get('user-7'))
  const counts = new Map<string, number>()
  for (const id of before.values()) counts.set(id ?? '-', (counts.get(id ?? '-') ?? 0) + 1)
  for (const [id, n] of counts) assert.ok(n > 700 && n < 1300, `${id} owns ${n} of 4000 keys`)

  s.update(eps.filter((e) => e.id !== 'c'))
  let moved = 0
  for (const k of keys) {
    const now = s.pick(k, undefined)?.id
    if (before.get(k) === 'c') assert.notEqual(now, 'c')
    else if (now !== before.get(k)) moved++
  }
  assert.equal(moved, 0, 'keys of the endpoints that stay do not move')

  s.update(eps)
  const back = keys.filter((k) => s.pick(k, undefined)?.id === before.get(k)).length
  assert.equal(back, keys.length, 'adding it back restores the same mapping')
  const next = s.pick('user-7', [eps.find((e) => e.id === before.get('user-7')) as Fake])
  assert.ok(next !== undefined && next.id !== before.get('user-7'), 'a retry walks on along the ring')
  assert.equal(new Set(picks(s, 4)).size, 4, 'no key: round robin')
})

test('random spreads over all candidates', () => {
  const s = createStrategy<Fake>('random')
  const eps = [fake('a'), fake('b'), fake('c')]
  s.update(eps)
  const counts = new Map<string, number>()
  for (const id of picks(s, 3000)) counts.set(id, (counts.get(id) ?? 0) + 1)
  for (const id of ['a', 'b', 'c']) assert.ok((counts.get(id) ?? 0) > 800, `${id}: ${counts.get(id)}`)
  assert.equal(s.pick(undefined, [eps[0] as Fake, eps[1] as Fake])?.id, 'c')
})
