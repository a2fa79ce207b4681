import assert from 'node:assert/strict'
import { describe, test } from 'node:test'
import fc from 'fast-check'
import type { PlacementRules, ScheduleDecision, ScheduleRequest, SchedulerNode } from '../../src/core/cluster.js'
import { schedule, SCORE_WEIGHTS } from '../../src/cluster/scheduler.js'
import { groupDigits } from '../../src/cluster/scheduler-message.js'

interface NodeOver {
  labels?: Record<string, string>
  accel?: 'kvm' | 'tcg'
  cordoned?: boolean
  vcpus?: number
  memoryMiB?: number
  usedVcpus?: number
  usedMiB?: number
  images?: string[]
  templates?: string[]
  replicas?: Record<string, number>
}

function node (name: string, o: NodeOver = {}): SchedulerNode {
  return {
    name,
    labels: o.labels ?? {},
    accel: o.accel ?? 'tcg',
    cordoned: o.cordoned ?? false,
    capacity: { vcpus: o.vcpus ?? 8, memoryMiB: o.memoryMiB ?? 8192 },
    allocated: { vcpus: o.usedVcpus ?? 0, memoryMiB: o.usedMiB ?? 0 },
    images: new Set(o.images ?? []),
    templates: new Set(o.templates ?? []),
    replicas: new Map(Object.entries(o.replicas ?? {}))
  }
}

function rules (o: Partial<Omit<PlacementRules, 'affinity' | 'antiAffinity'>> & { affinity?: Partial<PlacementRules['affinity']>, antiAffinity?: Partial<PlacementRules['antiAffinity']> } = {}): PlacementRules {
  return {
    ...(o.node !== undefined ? { node: o.node } : {}),
    ...(o.accel !== undefined ? { accel: o.accel } : {}),
    nodeSelector: o.nodeSelector ?? {},
    affinity: { required: o.affinity?.required ?? [], preferred: o.affinity?.preferred ?? [] },
    antiAffinity: { required: o.antiAffinity?.required ?? [], preferred: o.antiAffinity?.preferred ?? [] },
    spread: o.spread ?? true
  }
}

function request (o: Partial<ScheduleRequest> = {}): ScheduleRequest {
  return { replica: 'api-3', service: 'api', resources: { vcpus: 1, memoryMiB: 512 }, rules: rules(), ...o }
}

const least = { scoring: 'least-allocated' } as const

function placed (d: ScheduleDecision): Extract<ScheduleDecision, { placed: true }> {
  assert.ok(d.placed, `expected a placement, got: ${d.message}`)
  return d
}

/** The one reason `target` was filtered for, when it is the only other node beside an open one. */
function reasonFor (req: ScheduleRequest, target: SchedulerNode): string {
  const d = schedule(req, [target], least)
  assert.equal(d.placed, false, `expected ${target.name} to be filtered`)
  assert.equal(d.filtered.length, 1)
  return d.filtered[0]?.reason ?? ''
}

/** Records a placement on the node, as the leader does after each decision. */
function bind (nodes: SchedulerNode[], name: string, req: ScheduleRequest): SchedulerNode[] {
  return nodes.map(n => {
    if (n.name !== name) return n
    const replicas = new Map(n.replicas)
    if (req.service !== null) replicas.set(req.service, (replicas.get(req.service) ?? 0) + 1)
    return { ...n, allocated: { vcpus: n.allocated.vcpus + req.resources.vcpus, memoryMiB: n.allocated.memoryMiB + req.resources.memoryMiB }, replicas }
  })
}

describe('scheduler: filters, each with its reason', () => {
  test('a cordoned node', () => {
    assert.equal(reasonFor(request(), node('a', { cordoned: true })), 'cordoned (uncordon it to place here)')
  })

  test('rules.node pins the replica', () => {
    const req = request({ rules: rules({ node: 'b' }) })
    assert.equal(reasonFor(req, node('a')), 'rules.node pins the replica to b')
    assert.equal(placed(schedule(req, [node('a'), node('b'), node('c')], least)).node, 'b')
  })

  test('a volume holds its replica to the node it lives on, even against the other rules', () => {
    const req = request({ volumeNodes: { 'db-data-0': 'c' } })
    assert.equal(reasonFor(req, node('a')), 'volume db-data-0 lives on node c')
    assert.equal(placed(schedule(req, [node('a'), node('b'), node('c')], least)).node, 'c')
    const gone = schedule(req, [node('a'), node('b')], least)
    assert.equal(gone.placed, false, 'its node is lost: pending, not placed elsewhere with an empty volume')
    assert.ok(gone.filtered.every((f) => f.reason === 'volume db-data-0 lives on node c'))
  })

  test('nodeSelector: a missing label and a different value are named', () => {
    const req = request({ rules: rules({ nodeSelector: { zone: 'eu-1', disk: 'ssd' } }) })
    assert.equal(reasonFor(req, node('a', { labels: { disk: 'ssd' } })), 'label zone=eu-1 missing')
    assert.equal(reasonFor(req, node('a', { labels: { zone: 'eu-1', disk: 'hdd' } })), 'label disk is hdd (nodeSelector wants ssd)')
    assert.equal(placed(schedule(req, [node('a', { labels: { disk: 'ssd' } }), node('b', { labels: { zone: 'eu-1', disk: 'ssd', extra: 'x' } })], least)).node, 'b')
  })

  test('the accelerator', () => {
    assert.equal(reasonFor(request({ rules: rules({ accel: 'kvm' }) }), node('a', { accel: 'tcg' })), 'accelerator tcg (the replica asks for kvm)')
  })

  test('free memory and vCPUs, with what is free and what is asked', () => {
    const big = request({ resources: { vcpus: 2, memoryMiB: 2048 } })
    assert.equal(reasonFor(big, node('a', { memoryMiB: 8192, usedMiB: 6292 })), 'memory 1,900 MiB free < 2,048 MiB asked')
    assert.equal(reasonFor(big, node('a', { vcpus: 8, usedVcpus: 7 })), 'vCPUs 1 free < 2 asked')
    assert.equal(reasonFor(big, node('a', { vcpus: 4, usedVcpus: 6, memoryMiB: 1024 })), 'vCPUs 0 free < 2 asked and memory 1,024 MiB free < 2,048 MiB asked')
    assert.equal(placed(schedule(big, [node('a', { vcpus: 2, memoryMiB: 2048 })], least)).node, 'a', 'exactly enough fits')
  })

  test('required affinity: the node must run a replica of each named service', () => {
    const req = request({ rules: rules({ affinity: { required: ['db', 'cache'] } }) })
    assert.equal(reasonFor(req, node('a', { replicas: { db: 1 } })), 'runs no replica of cache (required affinity)')
    assert.equal(placed(schedule(req, [node('a', { replicas: { db: 1 } }), node('b', { replicas: { db: 2, cache: 1 } })], least)).node, 'b')
  })

  test('required affinity on itself lets the first replica go anywhere, then follows it', () => {
    const req = request({ rules: rules({ affinity: { required: ['api'] } }) })
    const first = placed(schedule(req, [node('a'), node('b')], least))
    const after = bind([node('a'), node('b')], first.node, req)
    const second = placed(schedule(req, after, least))
    assert.equal(second.node, first.node)
    assert.match(second.message, /filtered: runs no replica of api \(required affinity\)/)
  })

  test('required anti-affinity: with another service, and with itself (one per node)', () => {
    const req = request({ rules: rules({ antiAffinity: { required: ['batch', 'api'] } }) })
    assert.equal(reasonFor(req, node('a', { replicas: { batch: 3 } })), 'runs 3 replicas of batch (required anti-affinity)')
    assert.equal(reasonFor(req, node('a', { replicas: { api: 1 } })), 'already runs a replica of api (anti-affinity with itself: one per node)')
  })
})

describe('scheduler: scores', () => {
  const emptier = node('emptier', { usedVcpus: 1, usedMiB: 1024 })
  const fuller = node('fuller', { usedVcpus: 6, usedMiB: 6144 })
  const plain = request({ service: null })

  test('least-allocated prefers the emptier node, most-allocated the fuller one', () => {
    const a = placed(schedule(plain, [fuller, emptier], least))
    assert.equal(a.node, 'emptier')
    assert.deepEqual(Object.keys(a.parts), ['free'])
    // (1 - (1+1)/8 + 1 - (1024+512)/8192) / 2 · 25
    assert.equal(a.parts.free, Math.round(25 * ((6 / 8) + (6656 / 8192)) / 2))
    const b = placed(schedule(plain, [emptier, fuller], { scoring: 'most-allocated' }))
    assert.equal(b.node, 'fuller')
    assert.deepEqual(Object.keys(b.parts), ['packed'])
    assert.equal(b.parts.packed, Math.round(25 * ((7 / 8) + (6656 / 8192)) / 2))
  })

  test('the weights add up to 100 and so does the best possible score', () => {
    assert.equal(Object.values(SCORE_WEIGHTS).reduce((s, w) => s + w, 0), 100)
    const req = request({ resources: { vcpus: 0, memoryMiB: 0 }, imageDigest: 'sha256:x', template: 't', rules: rules({ affinity: { preferred: [{ service: 'db', weight: 10 }] } }) })
    const d = placed(schedule(req, [node('a', { images: ['sha256:x'], templates: ['t'], replicas: { db: 1 } })], least))
    assert.equal(d.score, 100)
  })

  test('spread: three replicas with self anti-affinity land on three nodes, a fourth is pending', () => {
    const req = request({ rules: rules({ antiAffinity: { required: ['api'] } }) })
    let nodes = [node('a'), node('b'), node('c')]
    const chosen: string[] = []
    for (let i = 0; i < 3; i++) {
      const d = placed(schedule({ ...req, replica: `api-${i}` }, nodes, least))
      chosen.push(d.node)
      nodes = bind(nodes, d.node, req)
    }
    assert.deepEqual([...chosen].sort(), ['a', 'b', 'c'])
    const fourth = schedule({ ...req, replica: 'api-3' }, nodes, least)
    assert.equal(fourth.placed, false)
    assert.equal(fourth.filtered.length, 3)
  })

  test('spread alone (no anti-affinity) beats a small resource edge: the node without a replica wins', () => {
    const req = request()
    const d = placed(schedule(req, [node('a', { replicas: { api: 1 } }), node('b', { usedVcpus: 4, usedMiB: 4096 })], least))
    assert.equal(d.node, 'b')
    assert.equal(d.parts.spread, SCORE_WEIGHTS.spread)
    const off = placed(schedule(request({ rules: rules({ spread: false }) }), [node('a', { replicas: { api: 1 } }), node('b', { usedVcpus: 4, usedMiB: 4096 })], least))
    assert.equal(off.node, 'a', 'without spread the emptier node wins')
    assert.equal(off.parts.spread, undefined)
  })

  test('preferred affinity moves a replica next to the service it names; preferred anti-affinity away', () => {
    const nodes = [node('a'), node('b', { usedVcpus: 2, usedMiB: 2048, replicas: { db: 1 } })]
    assert.equal(placed(schedule(request(), nodes, least)).node, 'a')
    const near = placed(schedule(request({ rules: rules({ affinity: { preferred: [{ service: 'db', weight: 50 }] } }) }), nodes, least))
    assert.equal(near.node, 'b')
    assert.equal(near.parts.affinity, SCORE_WEIGHTS.affinity)
    const away = request({ rules: rules({ antiAffinity: { preferred: [{ service: 'db', weight: 50 }] } }) })
    const far = placed(schedule(away, [node('a', { replicas: { db: 1 } }), node('b', { usedVcpus: 2, usedMiB: 2048 })], least))
    assert.equal(far.node, 'b')
  })

  test('affinity weighs each preferred service: the heavier one present wins', () => {
    const req = request({ rules: rules({ affinity: { preferred: [{ service: 'db', weight: 80 }, { service: 'cache', weight: 20 }] } }) })
    const d = placed(schedule(req, [node('a', { replicas: { cache: 1 } }), node('b', { replicas: { db: 1 } })], least))
    assert.equal(d.node, 'b')
    assert.equal(d.parts.affinity, 16)
  })

  test('a node that holds the template (or the image) wins a close call', () => {
    const nodes = [node('a'), node('b', { usedVcpus: 1, usedMiB: 1024, templates: ['api-tpl'] })]
    assert.equal(placed(schedule(request(), nodes, least)).node, 'a')
    const t = placed(schedule(request({ template: 'api-tpl' }), nodes, least))
    assert.equal(t.node, 'b')
    assert.equal(t.parts.template, SCORE_WEIGHTS.template)
    assert.equal(placed(schedule(request({ template: 'api-tpl' }), [nodes[0] as SchedulerNode, node('b', { usedVcpus: 1, usedMiB: 1024 })], least)).node, 'a')
    const withImage = [node('a'), node('b', { usedVcpus: 1, usedMiB: 1024, images: ['sha256:abc'] })]
    const i = placed(schedule(request({ imageDigest: 'sha256:abc' }), withImage, least))
    assert.equal(i.node, 'b')
    assert.equal(i.parts.image, SCORE_WEIGHTS.image)
  })

  test('ties are broken with options.random, each tied node equally likely', () => {
    const nodes = [node('a'), node('b'), node('c')]
    const pick = (r: number): string => placed(schedule(request(), nodes, { scoring: 'least-allocated', random: () => r })).node
    assert.equal(pick(0.99), 'a', 'a high draw keeps the first')
    assert.equal(pick(0), 'c', 'a zero draw takes each new tie')
    let calls = 0
    schedule(request(), nodes, { scoring: 'least-allocated', random: () => { calls++; return 0.5 } })
    assert.equal(calls, 2, 'one draw per tie after the first')
    let seed = 42
    const lcg = (): number => { seed = (seed * 1103515245 + 12345) % 2147483648; return seed / 2147483648 }
    const tally: Record<string, number> = { a: 0, b: 0, c: 0 }
    for (let i = 0; i < 3000; i++) tally[placed(schedule(request(), nodes, { scoring: 'least-allocated', random: lcg })).node]! += 1
    for (const n of ['a', 'b', 'c']) assert.ok((tally[n] ?? 0) > 850 && (tally[n] ?? 0) < 1150, `tie share of ${n}: ${tally[n]}`)
  })
})

describe('scheduler: messages', () => {
  test('a placement: parts above zero, highest first, then the filtered nodes', () => {
    const req = request({ resources: { vcpus: 1, memoryMiB: 2048 }, template: 'api-tpl', imageDigest: 'sha256:none' })
    const d = placed(schedule(req, [node('node-a', { usedMiB: 6292 }), node('node-b', { vcpus: 4, templates: ['api-tpl'] })], least))
    assert.equal(d.message, 'placed api-3 on node-b (score 66: spread 30, free 19, template 17); node-a filtered: memory 1,900 MiB free < 2,048 MiB asked')
    assert.deepEqual(d.parts, { spread: 30, free: 19, template: 17, image: 0 })
    assert.deepEqual(d.filtered, [{ node: 'node-a', reason: 'memory 1,900 MiB free < 2,048 MiB asked' }])
  })

  test('pending: every node with its reason, the first five named, then "and N more"', () => {
    const req = request({ resources: { vcpus: 16, memoryMiB: 512 }, rules: rules({ accel: 'kvm' }) })
    const few = schedule(req, [node('node-a', { cordoned: true }), node('node-b', { accel: 'kvm' })], least)
    assert.equal(few.placed, false)
    assert.equal(few.message, 'api-3 fits no node: node-a: cordoned (uncordon it to place here), node-b: vCPUs 8 free < 16 asked')
    const many = schedule(req, Array.from({ length: 1207 }, (_, i) => node(`n${i}`, { accel: i % 2 === 0 ? 'kvm' : 'tcg' })), least)
    assert.equal(many.placed, false)
    assert.equal(many.filtered.length, 1207)
    assert.equal(many.message, 'api-3 fits no node: n0: vCPUs 8 free < 16 asked, n1: accelerator tcg (the replica asks for kvm), ' +
      'n2: vCPUs 8 free < 16 asked, n3: accelerator tcg (the replica asks for kvm), n4: vCPUs 8 free < 16 asked, and 1,202 more')
    assert.equal(schedule(req, [], least).message, 'api-3 fits no node: the cluster has no nodes')
  })

  test('a placement past many filtered nodes says how many more', () => {
    const nodes = [...Array.from({ length: 7 }, (_, i) => node(`c${i}`, { cordoned: true })), node('ok')]
    assert.match(placed(schedule(request({ service: null }), nodes, least)).message,
      /^placed api-3 on ok \(score \d+: free \d+\); c0 filtered: cordoned \(uncordon it to place here\), (c\d filtered: [^,]+, ){4}and 2 more filtered$/)
  })

  test('numbers carry thousands separators', () => {
    assert.deepEqual([0, 7, 999, 1000, 1900, 2048, 65536, 1234567, 1.5, 2048.25, -3000].map(groupDigits),
      ['0', '7', '999', '1,000', '1,900', '2,048', '65,536', '1,234,567', '1.5', '2,048.25', '-3,000'])
  })
})

/** An oracle written apart from the scheduler: can this node take this replica? */
function passesEveryFilter (req: ScheduleRequest, n: SchedulerNode, all: readonly SchedulerNode[]): boolean {
  const r = req.rules
  const has = (svc: string): boolean => (n.replicas.get(svc) ?? 0) > 0
  if (r.node !== undefined && r.node !== n.name) return false
  if (n.cordoned) return false
  if (r.accel !== undefined && r.accel !== n.accel) return false
  if (!Object.entries(r.nodeSelector).every(([k, v]) => n.labels[k] === v)) return false
  if (n.capacity.vcpus - n.allocated.vcpus < req.resources.vcpus) return false
  if (n.capacity.memoryMiB - n.allocated.memoryMiB < req.resources.memoryMiB) return false
  const firstOfItself = (svc: string): boolean => svc === req.service && !all.some(x => (x.replicas.get(svc) ?? 0) > 0)
  if (!r.affinity.required.every(s => has(s) || firstOfItself(s))) return false
  if (r.antiAffinity.required.some(has)) return false
  return true
}

describe('scheduler: properties', () => {
  const services = ['api', 'db', 'cache', 'web']
  /** A constraint in about one case of six, so that most requests can still be placed somewhere. */
  const rarely = <T>(a: fc.Arbitrary<T>): fc.Arbitrary<T | null> => fc.oneof({ arbitrary: fc.constant(null), weight: 5 }, { arbitrary: a, weight: 1 })
  const names = ['n0', 'n1', 'n2', 'n3', 'n4', 'n5']
  const arbNode = (name: string): fc.Arbitrary<SchedulerNode> => fc.record({
    cordoned: rarely(fc.constant(true)).map(x => x === true),
    accel: fc.constantFrom('kvm' as const, 'tcg' as const),
    zone: fc.constantFrom('a', 'b', undefined),
    vcpus: fc.noBias(fc.integer({ min: 0, max: 16 })),
    memoryMiB: fc.noBias(fc.integer({ min: 0, max: 16_384 })),
    usedVcpus: fc.integer({ min: 0, max: 6 }),
    usedMiB: fc.integer({ min: 0, max: 6144 }),
    replicas: fc.dictionary(fc.constantFrom(...services), fc.integer({ min: 0, max: 3 })),
    templates: fc.subarray(['t1', 't2']),
    images: fc.subarray(['d1', 'd2'])
  }).map(o => node(name, { ...o, labels: o.zone === undefined ? {} : { zone: o.zone } }))
  const arbNodes = fc.noBias(fc.integer({ min: 1, max: names.length })).chain(k => fc.tuple(...names.slice(0, k).map(arbNode)))
  const arbRequest: fc.Arbitrary<ScheduleRequest> = fc.record({
    service: fc.constantFrom('api', 'db', null),
    vcpus: fc.integer({ min: 0, max: 4 }),
    memoryMiB: fc.integer({ min: 0, max: 4096 }),
    pin: rarely(fc.constantFrom(...names)),
    accel: rarely(fc.constantFrom('kvm' as const, 'tcg' as const)),
    zone: rarely(fc.constantFrom('a', 'b')),
    affinity: rarely(fc.subarray(services, { minLength: 1, maxLength: 2 })).map(x => x ?? []),
    anti: rarely(fc.subarray(services, { minLength: 1, maxLength: 2 })).map(x => x ?? []),
    preferred: fc.array(fc.record({ service: fc.constantFrom(...services), weight: fc.integer({ min: 1, max: 100 }) }), { maxLength: 2 }),
    preferredAnti: fc.array(fc.record({ service: fc.constantFrom(...services), weight: fc.integer({ min: 1, max: 100 }) }), { maxLength: 2 }),
    spread: fc.boolean(),
    template: fc.option(fc.constantFrom('t1', 't2')),
    image: fc.option(fc.constantFrom('d1', 'd2'))
  }).map(o => request({
    service: o.service,
    resources: { vcpus: o.vcpus, memoryMiB: o.memoryMiB },
    ...(o.template !== null ? { template: o.template } : {}),
    ...(o.image !== null ? { imageDigest: o.image } : {}),
    rules: rules({
      ...(o.pin !== null ? { node: o.pin } : {}),
      ...(o.accel !== null ? { accel: o.accel } : {}),
      nodeSelector: o.zone !== null ? { zone: o.zone } : {},
      affinity: { required: o.affinity, preferred: o.preferred },
      antiAffinity: { required: o.anti, preferred: o.preferredAnti },
      spread: o.spread
    })
  }))

  test('a placed node passes every filter; every other node is filtered or scored no higher; pending means none passes', () => {
    let placements = 0
    let pendings = 0
    fc.assert(fc.property(arbRequest, arbNodes, fc.double({ min: 0, max: 0.999, noNaN: true }), (req, nodes, r) => {
      const d = schedule(req, nodes, { scoring: 'least-allocated', random: () => r })
      if (d.placed) placements++; else pendings++
      const passing = nodes.filter(n => passesEveryFilter(req, n, nodes)).map(n => n.name)
      assert.deepEqual(d.filtered.map(f => f.node), nodes.map(n => n.name).filter(n => !passing.includes(n)), 'filtered = the nodes the oracle rejects')
      for (const f of d.filtered) assert.ok(f.reason.length > 0 && !f.reason.includes(', '), f.reason)
      if (d.placed) {
        assert.ok(passing.includes(d.node), `placed on ${d.node}, which fails a filter`)
        assert.ok(d.score >= 0 && d.score <= 100)
        assert.equal(Object.values(d.parts).reduce((s, v) => s + v, 0), d.score)
        for (const other of passing) {
          const alone = schedule({ ...req, rules: { ...req.rules, node: other } }, nodes, least)
          // Pinned alone, spread's min/max change; compare only when spread does not apply.
          if (alone.placed && (req.service === null || !req.rules.spread)) assert.ok(alone.score <= d.score, `${other} scores ${alone.score} > ${d.score}`)
        }
      } else {
        assert.deepEqual(passing, [])
        assert.match(d.message, /fits no node/)
      }
    }), { numRuns: 500 })
    assert.ok(placements > 150 && pendings > 25, `the cases exercise both outcomes: ${placements} placed, ${pendings} pending`)
  })
})
