import assert from 'node:assert/strict'
import { test } from 'node:test'
import fc from 'fast-check'
import { routeFor, send, startGateway, startHttpUpstreams, until, jsonBody } from './gateway-fixtures.js'
import { HostileUpstream, check, get, hostileCase, type HostileCase } from './hostile-http.js'

/** Requests in flight at once, and batches: BATCH × RUNS requests to the hostile upstream. */
const BATCH = 50
const RUNS = 100

test('a hostile upstream: thousands of generated answers, each forwarded whole, answered 502 with a code, or closed cleanly; the gateway and a healthy service beside it are unaffected', { timeout: 180_000 }, async (t) => {
  const hostile = new HostileUpstream()
  // 127.0.0.1: the fixtures' upstreams take 127.0.0.10 and up.
  const hostilePort = await hostile.listen('127.0.0.1')
  t.after(() => hostile.close())
  const { port: healthyPort, upstreams } = await startHttpUpstreams(t, 1)
  const { gateway, port } = await startGateway(t)
  await gateway.configure(routeFor('hostile', hostilePort))
  gateway.setEndpoints('hostile', [{ id: 'hostile-0', host: '127.0.0.1', weight: 1, priority: 0 }])
  await gateway.configure(routeFor('healthy', healthyPort))
  gateway.setEndpoints('healthy', [{ id: 'healthy-0', host: upstreams[0]!.host, weight: 1, priority: 0 }])

  // The answer that ended the daemon in issue 10, first and alone.
  hostile.cases.set('issue-10', {
    label: 'issue 10: a control character in the reason phrase',
    pieces: [Buffer.from('HTTP/1.1 200 O\x01K\r\nContent-Length: 2\r\n\r\nok', 'latin1')],
    end: 'keep',
    expect: { kind: 'error', codes: ['UIG_ERR_GATEWAY_UPSTREAM_MALFORMED'] }
  })
  for (let i = 0; i < 10; i++) check(hostile.cases.get('issue-10')!, await get(port, 'hostile', 'issue-10'))

  let next = 0
  let requests = 0
  const kinds = new Map<string, number>()
  await fc.assert(fc.asyncProperty(fc.array(hostileCase, { minLength: BATCH, maxLength: BATCH }), async (cases: HostileCase[]) => {
    const ids = cases.map((c) => {
      const id = String(next++)
      hostile.cases.set(id, c)
      kinds.set(c.expect.kind, (kinds.get(c.expect.kind) ?? 0) + 1)
      return id
    })
    // The healthy service, asked in the middle of it all.
    const healthy = Array.from({ length: 4 }, async () => await get(port, 'healthy', undefined))
    const outcomes = await Promise.all(ids.map(async (id) => await get(port, 'hostile', id)))
    requests += ids.length
    cases.forEach((c, i) => check(c, outcomes[i]!))
    for (const h of await Promise.all(healthy)) {
      assert.equal(h.kind, 'response')
      assert.equal(h.kind === 'response' && h.status, 200)
      assert.equal(h.kind === 'response' && h.body.toString(), 'u0')
    }
    for (const id of ids) hostile.cases.delete(id)
  }), { numRuns: RUNS })
  assert.ok(requests >= BATCH * RUNS, `${requests} requests`)
  t.diagnostic(`${requests} generated answers (${[...kinds].map(([k, n]) => `${k} ${n}`).join(', ')}); the upstream saw ${hostile.requests} requests (retries included)`)

  // Nothing left behind: no request in flight, the gateway routes as before.
  await until('nothing in flight to the hostile upstream', () => gateway.load('hostile').inFlight === 0, 5000)
  assert.equal(gateway.load('healthy').inFlight, 0)
  const ok = await send(port, '/', { headers: { host: 'healthy' } })
  assert.equal(ok.status, 200)
  assert.equal(ok.body, 'u0')
  const unknown = await send(port, '/', { headers: { host: 'nobody' } })
  assert.equal(unknown.status, 404)
  assert.equal(jsonBody(unknown).code, 'UIG_ERR_GATEWAY_NO_SERVICE')
  // The hostile endpoint is the service's only one: failing, but never ejected (fail open), and it still serves a good answer.
  hostile.cases.set('good', { label: 'good', pieces: [Buffer.from('HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ngood')], end: 'keep', expect: { kind: 'exact', status: 200, reason: 'OK', headers: [], body: Buffer.from('good') } })
  check(hostile.cases.get('good')!, await get(port, 'hostile', 'good'))
})
