import assert from 'node:assert/strict'
import { test } from 'node:test'
import type { EndpointEvent } from '../../src/gateway/gateway.js'
import { answerId, endpointsOf, gatewayFor, routeFor, send, startHttpUpstreams, stopUpstream, tally, until, jsonBody } from './gateway-fixtures.js'

test('retry: with one upstream refusing connections every GET succeeds; a POST with a body gets 502 UPSTREAM', async (t) => {
  const { port: up, upstreams } = await startHttpUpstreams(t, 3)
  const { gateway, port, registry } = await gatewayFor(t, up, upstreams, 'round-robin', { outlier: { consecutiveFailures: 1000, ejectionMs: 1000, maxEjectionMs: 1000 } })
  await stopUpstream(upstreams[1]!)
  const counts = await tally(port, 30)
  assert.deepEqual([...counts.entries()].sort(), [['u0', 15], ['u2', 15]], 'u1\'s turns were retried on the next one')
  // u0, then u1 (refused) and u2, u0 ...: every other request met u1.
  assert.equal(gateway.endpointStats('api').find((e) => e.id === 'u1')?.failures, 15)
  assert.match(await registry.metrics(), /uigniter_gateway_retries_total\{service="api"\} 15/)
  assert.match(await registry.metrics(), /uigniter_gateway_upstream_failures_total\{service="api"\} 15/)

  await gateway.configure(routeFor('post', up))
  gateway.setEndpoints('post', endpointsOf([upstreams[1]!, upstreams[0]!]))
  const post = await send(port, '/', { method: 'POST', body: 'x'.repeat(1000), headers: { host: 'post' } })
  assert.equal(post.status, 502)
  assert.equal(jsonBody(post).code, 'UIG_ERR_GATEWAY_UPSTREAM')
  // u1 is next in turn again: a POST without a body was refused before anything was sent, so it may go elsewhere.
  await send(port, '/', { headers: { host: 'post' } })
  const bodiless = await send(port, '/', { method: 'POST', headers: { host: 'post' } })
  assert.equal(bodiless.status, 200)
})

test('endpointDied: a GET hanging on the dead endpoint is retried elsewhere at once; a POST with a body gets 502', async (t) => {
  const { port: up, upstreams } = await startHttpUpstreams(t, 2, (u, req, res) => {
    if (u.id === 'u0' && req.url === '/hang') return // a VM that is gone: nobody will ever answer
    answerId(u, req, res)
  })
  const { gateway, port } = await gatewayFor(t, up, upstreams)
  const died: string[] = []
  gateway.on('ejected', (e: EndpointEvent) => died.push(e.endpointId))
  const pending = send(port, '/hang')
  await until('the GET hangs on u0', () => gateway.inFlight('api', 'u0') === 1)
  assert.equal((await send(port, '/')).body, 'u1', 'round robin: u1\'s turn')
  const post2 = send(port, '/hang', { method: 'POST', body: 'payload' })
  await until('two requests hang on u0', () => gateway.inFlight('api', 'u0') === 2)
  const started = Date.now()
  gateway.endpointDied('api', 'u0')
  const a = await pending
  assert.equal(a.status, 200)
  assert.equal(a.body, 'u1')
  assert.ok(Date.now() - started < 500, 'retried at once, not after a timeout')
  const b = await post2
  assert.equal(b.status, 502)
  assert.match(jsonBody(b).message, /stopped/)
  assert.equal(gateway.inFlight('api', 'u0'), 0)
  assert.deepEqual(gateway.endpointStats('api').map((e) => e.id), ['u1'], 'the dead endpoint is forgotten')
  assert.deepEqual(died, [], 'a death is not an ejection')
  assert.deepEqual([...(await tally(port, 4)).entries()], [['u1', 4]])
})

test('outlier ejection: ejected after N connection failures, re-admitted after the ejection time, doubled the next time; the last endpoint is never ejected', async (t) => {
  const { port: up, upstreams } = await startHttpUpstreams(t, 2)
  const { gateway, port } = await gatewayFor(t, up, upstreams, 'round-robin', { outlier: { consecutiveFailures: 2, ejectionMs: 150, maxEjectionMs: 250 } })
  const events: Array<[string, EndpointEvent]> = []
  gateway.on('ejected', (e: EndpointEvent) => events.push(['ejected', e]))
  gateway.on('readmitted', (e: EndpointEvent) => events.push(['readmitted', e]))
  await stopUpstream(upstreams[1]!)

  await tally(port, 4)
  assert.equal(events.length, 1)
  assert.equal(events[0]![0], 'ejected')
  assert.equal(events[0]![1].endpointId, 'u1')
  assert.match(events[0]![1].reason, /2 consecutive connection failures; ejected for 150 ms/)
  assert.equal(gateway.endpointStats('api').find((e) => e.id === 'u1')?.ejected, true)
  const failures = gateway.endpointStats('api').find((e) => e.id === 'u1')?.failures
  await tally(port, 6)
  assert.equal(gateway.endpointStats('api').find((e) => e.id === 'u1')?.failures, failures, 'an ejected endpoint gets no request')

  await until('re-admitted', () => events.length === 2)
  assert.equal(events[1]![0], 'readmitted')
  await tally(port, 4)
  await until('ejected again', () => events.length === 3)
  assert.match(events[2]![1].reason, /ejected for 250 ms/, 'twice 150, capped at 250')
  await until('re-admitted again', () => events.length === 4)

  // The last endpoint standing: failures, but no ejection (fail open).
  gateway.setEndpoints('api', endpointsOf([upstreams[1]!]))
  const a = await send(port, '/')
  assert.equal(a.status, 502)
  await send(port, '/')
  assert.equal(events.length, 4)
  assert.equal(gateway.endpointStats('api')[0]?.ejected, false)
})

test('draining: an endpoint left out of the routable set finishes its in-flight request and takes no new one; whenIdle resolves as it ends', async (t) => {
  let finish: (() => void) | undefined
  const { port: up, upstreams } = await startHttpUpstreams(t, 2, (u, req, res) => {
    if (req.url === '/slow') finish = () => answerId(u, req, res)
    else answerId(u, req, res)
  })
  const { gateway, port } = await gatewayFor(t, up, upstreams)
  const slow = send(port, '/slow')
  await until('slow request on u0', () => gateway.inFlight('api', 'u0') === 1 && finish !== undefined)
  gateway.setEndpoints('api', endpointsOf([upstreams[1]!]))
  assert.deepEqual([...(await tally(port, 5)).entries()], [['u1', 5]])
  assert.equal(gateway.inFlight('api', 'u0'), 1)
  assert.equal(gateway.load('api').inFlight, 1)
  let idleAt = 0
  const idle = gateway.whenIdle('api', 'u0', 10_000).then((v) => { idleAt = Date.now(); return v })
  assert.equal(await gateway.whenIdle('api', 'u0', 50), false, 'the deadline ends a wait on a busy endpoint')
  assert.equal(idleAt, 0, 'busy: the other wait goes on')
  const finishedAt = Date.now()
  finish!()
  const a = await slow
  assert.equal(a.status, 200)
  assert.equal(a.body, 'u0')
  assert.equal(await idle, true)
  assert.ok(idleAt - finishedAt < 500, `resolved as the request ended (${idleAt - finishedAt} ms), not at the deadline`)
  assert.equal(gateway.inFlight('api', 'u0'), 0)
  assert.equal(await gateway.whenIdle('api', 'u0', 10_000), true, 'idle and forgotten: at once')
  assert.deepEqual(gateway.endpointStats('api').map((e) => e.id), ['u1'])
  assert.equal(gateway.load('api').inFlight, 0)
  assert.ok(gateway.load('api').lastRequestAt > Date.now() - 5000)
})
