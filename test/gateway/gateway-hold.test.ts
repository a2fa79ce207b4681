import assert from 'node:assert/strict'
import { test } from 'node:test'
import { answerId, endpointsOf, routeFor, send, startGateway, startHttpUpstreams, until, jsonBody } from './gateway-fixtures.js'

test('hold: with no endpoint requests wait, wake is called once, and they go in arrival order when endpoints appear', async (t) => {
  const order: string[] = []
  const { port: up, upstreams } = await startHttpUpstreams(t, 1, (u, req, res) => {
    order.push(req.url ?? '')
    answerId(u, req, res)
  })
  const { gateway, port, woken } = await startGateway(t)
  await gateway.configure(routeFor('api', up))
  const answers = [send(port, '/1'), send(port, '/2'), send(port, '/3', { method: 'POST', body: 'held body' })]
  await until('3 held', () => gateway.load('api').held === 3)
  assert.deepEqual(woken, ['api'], 'woken once for the three')
  assert.equal(gateway.load('api').inFlight, 0)
  gateway.setEndpoints('api', endpointsOf(upstreams))
  for (const a of await Promise.all(answers)) assert.equal(a.status, 200)
  assert.deepEqual(order, ['/1', '/2', '/3'])
  assert.equal(gateway.load('api').held, 0)

  // A new stretch without endpoints: woken again.
  gateway.setEndpoints('api', [])
  const again = send(port, '/4')
  await until('held again', () => gateway.load('api').held === 1)
  assert.deepEqual(woken, ['api', 'api'])
  gateway.setEndpoints('api', endpointsOf(upstreams))
  assert.equal((await again).status, 200)
})

test('hold limit: past maxRequests held, 503 HOLD_LIMIT with Retry-After at once', async (t) => {
  const { gateway, port } = await startGateway(t)
  await gateway.configure(routeFor('api', 8080, 'round-robin', { hold: { maxRequests: 1, timeoutMs: 300 } }))
  const started = Date.now()
  const answers = await Promise.all([send(port, '/'), send(port, '/'), send(port, '/')])
  const limited = answers.filter((a) => a.status === 503 && jsonBody(a).code === 'UIG_ERR_GATEWAY_HOLD_LIMIT')
  assert.equal(limited.length, 2)
  for (const a of limited) assert.ok(Number(a.headers['retry-after']) >= 1, 'Retry-After')
  const timedOut = answers.find((a) => jsonBody(a).code === 'UIG_ERR_GATEWAY_NO_ENDPOINT')
  assert.ok(timedOut !== undefined, 'the held one timed out')
  assert.ok(Date.now() - started >= 290)
})

test('hold timeout: 503 NO_ENDPOINT with Retry-After; counted as rejected', async (t) => {
  const { gateway, port, registry } = await startGateway(t)
  await gateway.configure(routeFor('api', 8080, 'round-robin', { hold: { maxRequests: 10, timeoutMs: 150 } }))
  const a = await send(port, '/')
  assert.equal(a.status, 503)
  assert.deepEqual(jsonBody(a), { code: 'UIG_ERR_GATEWAY_NO_ENDPOINT', message: jsonBody(a).message, statusCode: 503 })
  assert.ok(Number(a.headers['retry-after']) >= 1)
  assert.equal(gateway.load('api').held, 0)
  assert.match(await registry.metrics(), /uigniter_gateway_rejected_total\{service="api",reason="hold-timeout"\} 1/)
})

test('a held client that goes away leaves the queue', async (t) => {
  const { gateway, port } = await startGateway(t)
  await gateway.configure(routeFor('api', 8080))
  const { request } = await import('node:http')
  const req = request({ host: '127.0.0.1', port, path: '/', headers: { host: 'api' }, agent: false })
  req.on('error', () => {})
  req.end()
  await until('held', () => gateway.load('api').held === 1)
  req.destroy()
  await until('gone from the queue', () => gateway.load('api').held === 0)
})

test('remove: held requests get 503 NO_ENDPOINT, later ones 404 NO_SERVICE', async (t) => {
  const { gateway, port } = await startGateway(t)
  await gateway.configure(routeFor('api', 8080))
  const held = send(port, '/')
  await until('held', () => gateway.load('api').held === 1)
  await gateway.remove('api')
  const a = await held
  assert.equal(a.status, 503)
  assert.equal(jsonBody(a).code, 'UIG_ERR_GATEWAY_NO_ENDPOINT')
  assert.ok(Number(a.headers['retry-after']) >= 1)
  const later = await send(port, '/')
  assert.equal(later.status, 404)
  assert.equal(jsonBody(later).code, 'UIG_ERR_GATEWAY_NO_SERVICE')
})

test('the only endpoint dies under a GET: the GET is held until a replacement is there', async (t) => {
  let hang = true
  const { port: up, upstreams } = await startHttpUpstreams(t, 2, (u, req, res) => {
    if (hang && u.id === 'u0') return
    answerId(u, req, res)
  })
  const { gateway, port, woken } = await startGateway(t)
  await gateway.configure(routeFor('api', up))
  gateway.setEndpoints('api', endpointsOf([upstreams[0]!]))
  const pending = send(port, '/')
  await until('in flight', () => gateway.inFlight('api', 'u0') === 1)
  gateway.endpointDied('api', 'u0')
  await until('held', () => gateway.load('api').held === 1)
  assert.deepEqual(woken, ['api'])
  hang = false
  gateway.setEndpoints('api', endpointsOf([upstreams[1]!]))
  const a = await pending
  assert.equal(a.status, 200)
  assert.equal(a.body, 'u1')
})

test('close answers held requests 503', async (t) => {
  const { gateway, port } = await startGateway(t)
  await gateway.configure(routeFor('api', 8080))
  const held = send(port, '/', { agent: false })
  await until('held', () => gateway.load('api').held === 1)
  await gateway.close()
  assert.equal((await held).status, 503)
})
