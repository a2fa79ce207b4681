import assert from 'node:assert/strict'
import { createHash, randomBytes } from 'node:crypto'
import { test } from 'node:test'
import { answerId, endpointsOf, gatewayFor, routeFor, send, startHttpUpstreams, stopUpstream, tally, until, jsonBody } from './gateway-fixtures.js'

interface Echo {
  url: string
  host: string
  prefix: string | null
}

test('routing: /svc/NAME prefix (stripped), then the Host\'s first label; 404 NO_SERVICE otherwise', async (t) => {
  const { port: up, upstreams } = await startHttpUpstreams(t, 1, (_u, req, res) => {
    res.end(JSON.stringify({ url: req.url, host: req.headers.host, prefix: req.headers['x-forwarded-prefix'] ?? null }))
  })
  const { gateway, port } = await gatewayFor(t, up, upstreams)
  await gateway.configure(routeFor('tcp-only', undefined))

  const viaPrefix = await send(port, '/svc/api/tasks?x=1', { headers: { host: 'example.com' } })
  assert.deepEqual(jsonBody<Echo>(viaPrefix), { url: '/tasks?x=1', host: 'example.com', prefix: '/svc/api' })
  assert.equal(jsonBody<Echo>(await send(port, '/svc/api', { headers: { host: 'x' } })).url, '/')
  assert.equal(jsonBody<Echo>(await send(port, '/svc/api?q=2', { headers: { host: 'x' } })).url, '/?q=2')
  assert.deepEqual(jsonBody<Echo>(await send(port, '/a/b', { headers: { host: 'API.apps.local:8080' } })), { url: '/a/b', host: 'API.apps.local:8080', prefix: null })
  assert.equal(jsonBody<Echo>(await send(port, '/svc/nope/x', { headers: { host: 'api' } })).url, '/svc/nope/x', 'an unknown prefix is a path like any other')

  for (const [path, host] of [['/', 'other.example.com'], ['/svc/nope/', 'example.com'], ['/svc/tcp-only/', 'x'], ['/', 'tcp-only']] as const) {
    const a = await send(port, path, { headers: { host } })
    assert.equal(a.status, 404, `${host} ${path}`)
    assert.deepEqual(jsonBody(a), { code: 'UIG_ERR_GATEWAY_NO_SERVICE', message: jsonBody(a).message, statusCode: 404 })
  }
})

test('hop-by-hop headers are dropped both ways, X-Forwarded-For is appended, end-to-end ones pass', async (t) => {
  const { port: up, upstreams } = await startHttpUpstreams(t, 1, (_u, req, res) => {
    res.writeHead(200, { 'x-seen': JSON.stringify(req.headers), connection: 'keep-alive, x-secret-hop', 'x-secret-hop': 'no', 'keep-alive': 'timeout=3', 'x-end': 'yes' })
    res.end('ok')
  })
  const { port } = await gatewayFor(t, up, upstreams)
  const a = await send(port, '/', { headers: { connection: 'keep-alive, x-hop', 'x-hop': 'secret', 'proxy-authorization': 'Basic x', te: 'trailers', 'x-forwarded-for': '203.0.113.9', 'x-custom': 'kept' } })
  const seen = JSON.parse(a.headers['x-seen'] as string) as Record<string, string>
  assert.equal(seen['x-hop'], undefined, 'a header the Connection header names is hop-by-hop')
  assert.equal(seen['proxy-authorization'], undefined)
  assert.equal(seen.te, undefined)
  assert.equal(seen['x-custom'], 'kept')
  assert.equal(seen.host, 'api')
  assert.equal(seen['x-forwarded-for'], '203.0.113.9, 127.0.0.1')
  assert.equal(seen.connection, undefined, 'the client\'s Connection header is not forwarded (HTTP/1.1 keeps alive by default)')
  assert.equal(a.headers['x-secret-hop'], undefined)
  assert.equal(a.headers['x-end'], 'yes')
  assert.notEqual(a.headers['keep-alive'], 'timeout=3', 'the upstream\'s Keep-Alive is not the client\'s')
  assert.equal(a.body, 'ok')
})

test('a 1 MB request body streams to the upstream and back intact (chunked and with Content-Length)', async (t) => {
  const { port: up, upstreams } = await startHttpUpstreams(t, 1, (_u, req, res) => {
    res.writeHead(200, { 'x-te': req.headers['transfer-encoding'] ?? 'none', 'x-length': req.headers['content-length'] ?? 'none' })
    req.pipe(res)
  })
  const { port } = await gatewayFor(t, up, upstreams)
  const body = randomBytes(1024 * 1024)
  const sha = createHash('sha256').update(body).digest('hex')
  const a = await new Promise<{ sha: string, length: number, te: string, len: string }>((resolve, reject) => {
    void import('node:http').then(({ request }) => {
      const req = request({ host: '127.0.0.1', port, method: 'POST', path: '/echo', headers: { host: 'api' } }, (res) => {
        const h = createHash('sha256')
        let length = 0
        res.on('data', (c: Buffer) => { h.update(c); length += c.length })
        res.on('end', () => resolve({ sha: h.digest('hex'), length, te: String(res.headers['x-te']), len: String(res.headers['x-length']) }))
      })
      req.on('error', reject)
      for (let i = 0; i < 16; i++) req.write(body.subarray(i * 65536, (i + 1) * 65536))
      req.end()
    })
  })
  assert.equal(a.length, body.length)
  assert.equal(a.sha, sha)
  assert.equal(a.te, 'chunked')
  const b = await send(port, '/echo', { method: 'PUT', body })
  assert.equal(b.status, 200)
  assert.equal(b.headers['x-length'], String(body.length), 'a Content-Length body keeps its length')
  assert.equal(b.headers['x-te'], 'none')
  assert.equal(createHash('sha256').update(b.raw).digest('hex'), sha)
})

test('upgrade requests are answered 501', async (t) => {
  const { port: up, upstreams } = await startHttpUpstreams(t, 1)
  const { port } = await gatewayFor(t, up, upstreams)
  const a = await send(port, '/ws', { headers: { connection: 'Upgrade', upgrade: 'websocket' }, agent: false })
  assert.equal(a.status, 501)
  assert.equal(jsonBody(a).code, 'UIG_ERR_GATEWAY_UPGRADE_UNSUPPORTED')
})

test('round robin over 3 upstreams is exactly even', async (t) => {
  const { port: up, upstreams } = await startHttpUpstreams(t, 3)
  const { port } = await gatewayFor(t, up, upstreams)
  assert.deepEqual([...(await tally(port, 300)).entries()].sort(), [['u0', 100], ['u1', 100], ['u2', 100]])
})

test('weighted 3:1:1 gives exact proportions over a multiple of 5', async (t) => {
  const { port: up, upstreams } = await startHttpUpstreams(t, 3)
  const { gateway, port } = await gatewayFor(t, up, upstreams, 'weighted')
  gateway.setEndpoints('api', endpointsOf(upstreams).map((e, i) => ({ ...e, weight: i === 0 ? 3 : 1 })))
  assert.deepEqual([...(await tally(port, 250)).entries()].sort(), [['u0', 150], ['u1', 50], ['u2', 50]])
})

test('priority: tier 0 takes everything; its servers closed, tier 1 does; back to tier 0 when it returns', async (t) => {
  const { port: up, upstreams } = await startHttpUpstreams(t, 3)
  const { gateway, port } = await gatewayFor(t, up, upstreams, 'priority', { outlier: { consecutiveFailures: 1, ejectionMs: 300, maxEjectionMs: 300 } })
  const eps = endpointsOf(upstreams).map((e, i) => ({ ...e, priority: i === 2 ? 1 : 0 }))
  gateway.setEndpoints('api', eps)
  assert.deepEqual([...(await tally(port, 40)).entries()].sort(), [['u0', 20], ['u1', 20]])

  // Removed from the routable set: tier 1 takes over.
  gateway.setEndpoints('api', eps.slice(2))
  assert.deepEqual([...(await tally(port, 10)).entries()], [['u2', 10]])
  gateway.setEndpoints('api', eps)
  assert.deepEqual([...(await tally(port, 10)).entries()].sort(), [['u0', 5], ['u1', 5]])

  // Closed (connections refused): retried on tier 1, ejected, then all of it goes to tier 1.
  await stopUpstream(upstreams[0]!)
  await stopUpstream(upstreams[1]!)
  const during = await tally(port, 10)
  assert.deepEqual([...during.entries()], [['u2', 10]], 'every request answered, by tier 1')
  assert.equal(gateway.endpointStats('api').filter((e) => e.ejected).length, 2)

  // Back up: re-admitted after the ejection, tier 0 takes everything again.
  const readmitted: string[] = []
  gateway.on('readmitted', (e: { endpointId: string }) => readmitted.push(e.endpointId))
  for (const u of upstreams.slice(0, 2)) u.server.listen(up, u.host)
  await until('tier 0 re-admitted', () => readmitted.length === 2)
  assert.deepEqual([...(await tally(port, 10)).entries()].sort(), [['u0', 5], ['u1', 5]])
})

test('least connections: long requests pin one upstream, the others take the short ones', async (t) => {
  const release: Array<() => void> = []
  const { port: up, upstreams } = await startHttpUpstreams(t, 3, (u, req, res) => {
    if (req.url === '/slow') release.push(() => answerId(u, req, res))
    else answerId(u, req, res)
  })
  const { gateway, port } = await gatewayFor(t, up, upstreams, 'least-connections')
  const slow = [send(port, '/slow'), send(port, '/slow')]
  await until('2 slow requests in flight', () => gateway.load('api').inFlight === 2)
  const stats = gateway.endpointStats('api')
  assert.deepEqual(stats.map((e) => e.inFlight).sort(), [0, 1, 1], 'the slow ones went to different upstreams')
  const idle = stats.find((e) => e.inFlight === 0)!.id
  const counts = await tally(port, 20)
  assert.deepEqual([...counts.entries()], [[idle, 20]], 'short requests all go to the idle upstream')
  for (const r of release) r()
  for (const a of await Promise.all(slow)) assert.equal(a.status, 200)
})

test('fastest response favours the fast upstream over one that takes 30 ms', async (t) => {
  const { port: up, upstreams } = await startHttpUpstreams(t, 2, (u, req, res) => {
    if (u.id === 'u1') setTimeout(() => answerId(u, req, res), 30)
    else answerId(u, req, res)
  })
  const { port } = await gatewayFor(t, up, upstreams, 'fastest-response')
  const counts = await tally(port, 100)
  assert.ok((counts.get('u0') ?? 0) >= 95, JSON.stringify([...counts]))
  assert.ok((counts.get('u1') ?? 0) >= 1, 'the slow one was measured')
})

test('power of two and random spread roughly evenly', async (t) => {
  const { port: up, upstreams } = await startHttpUpstreams(t, 3)
  for (const strategy of ['power-of-two', 'random'] as const) {
    const { port } = await gatewayFor(t, up, upstreams, strategy)
    const counts = await tally(port, 300)
    for (const u of upstreams) {
      const n = counts.get(u.id) ?? 0
      assert.ok(n >= 60 && n <= 135, `${strategy}: ${u.id} got ${n} of 300`)
    }
  }
})

test('consistent hash on a header: same key same upstream, keys spread, removing one moves only its keys; no key: round robin', async (t) => {
  const { port: up, upstreams } = await startHttpUpstreams(t, 3)
  const { gateway, port } = await gatewayFor(t, up, upstreams, 'consistent-hash', {}, { loadBalancing: { strategy: 'consistent-hash', hashOn: 'header:X-User', replicaWeight: 1 } })
  const owner = new Map<string, string>()
  for (let i = 0; i < 60; i++) owner.set(`k${i}`, (await send(port, '/', { headers: { 'x-user': `k${i}` } })).body)
  for (let i = 0; i < 60; i += 7) assert.equal((await send(port, '/', { headers: { 'x-user': `k${i}` } })).body, owner.get(`k${i}`))
  const per = new Map<string, number>()
  for (const id of owner.values()) per.set(id, (per.get(id) ?? 0) + 1)
  assert.equal(per.size, 3, `keys spread: ${JSON.stringify([...per])}`)

  gateway.setEndpoints('api', endpointsOf(upstreams.filter((u) => u.id !== 'u1')))
  for (const [k, id] of owner) {
    const now = (await send(port, '/', { headers: { 'x-user': k } })).body
    if (id === 'u1') assert.notEqual(now, 'u1')
    else assert.equal(now, id, `${k} stays on ${id}`)
  }
  assert.equal(new Set([(await send(port, '/')).body, (await send(port, '/')).body]).size, 2)
})

test('consistent hash on a cookie and on the path', async (t) => {
  const { port: up, upstreams } = await startHttpUpstreams(t, 3)
  const { gateway, port } = await gatewayFor(t, up, upstreams, 'consistent-hash', {}, { loadBalancing: { strategy: 'consistent-hash', hashOn: 'cookie:sid', replicaWeight: 1 } })
  const ids = new Set<string>()
  for (let i = 0; i < 30; i++) {
    const first = (await send(port, '/', { headers: { cookie: `a=1; sid=s${i}; b=2` } })).body
    assert.equal((await send(port, '/other', { headers: { cookie: `sid=s${i}` } })).body, first)
    ids.add(first)
  }
  assert.equal(ids.size, 3)
  await gateway.configure(routeFor('api', up, 'consistent-hash', { loadBalancing: { strategy: 'consistent-hash', hashOn: 'path', replicaWeight: 1 } }))
  const a = (await send(port, '/p/1?x=1')).body
  for (let i = 0; i < 5; i++) assert.equal((await send(port, `/p/1?x=${i}`)).body, a, 'the query is not part of the path key')
})

test('metrics appear in the registry', async (t) => {
  const { port: up, upstreams } = await startHttpUpstreams(t, 2)
  const { registry, port } = await gatewayFor(t, up, upstreams)
  await tally(port, 4)
  await send(port, '/', { headers: { host: 'nobody' } })
  const text = await registry.metrics()
  assert.match(text, /uigniter_gateway_requests_total\{service="api",status="2xx"\} 4/)
  assert.match(text, /uigniter_gateway_request_duration_seconds_count\{service="api"\} 4/)
  assert.match(text, /uigniter_gateway_request_duration_seconds_bucket\{le="0.0025",service="api"\} \d/)
  assert.match(text, /uigniter_gateway_endpoint_in_flight\{service="api",endpoint="u0"\} 0/)
  assert.match(text, /uigniter_gateway_in_flight\{service="api"\} 0/)
  assert.match(text, /uigniter_gateway_unrouted_requests_total 1/)
  for (const name of ['held', 'retries_total', 'upstream_failures_total', 'ejections_total', 'rejected_total', 'tcp_connections_total', 'tcp_connections_open', 'endpoint_ejected']) {
    assert.match(text, new RegExp(`uigniter_gateway_${name}\\{`), name)
  }
})
