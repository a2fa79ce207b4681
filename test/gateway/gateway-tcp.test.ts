import assert from 'node:assert/strict'
import { once } from 'node:events'
import { connect, createServer, type Socket } from 'node:net'
import { test } from 'node:test'
import { UigniterError } from '../../src/core/errors.js'
import { freePort } from '../../src/core/free-port.js'
import { endpointsOf, routeFor, startGateway, startTcpUpstreams, stopUpstream, until } from './gateway-fixtures.js'

/** Connects to the gateway's TCP port; `read(n)` resolves with the next n bytes. */
async function dial (port: number): Promise<{ socket: Socket, read: (n: number) => Promise<string> }> {
  const socket = connect({ host: '127.0.0.1', port })
  await once(socket, 'connect')
  let buffered = ''
  let waiter: (() => void) | undefined
  socket.setEncoding('utf8')
  socket.on('data', (d: string) => { buffered += d; waiter?.() })
  socket.on('error', () => {})
  const read = async (n: number): Promise<string> => {
    const deadline = Date.now() + 3000
    while (buffered.length < n) {
      if (Date.now() > deadline) throw new Error(`read ${n}: only ${JSON.stringify(buffered)}`)
      await new Promise<void>((resolve) => { waiter = resolve; setTimeout(resolve, 50) })
    }
    const out = buffered.slice(0, n)
    buffered = buffered.slice(n)
    return out
  }
  return { socket, read }
}

test('TCP: each connection goes to one endpoint (round robin between connections) and is counted in flight while open', async (t) => {
  const { port: up, upstreams } = await startTcpUpstreams(t, 2)
  const { gateway, registry } = await startGateway(t)
  const gp = await freePort()
  await gateway.configure(routeFor('db', undefined, 'round-robin', { tcp: [{ gatewayPort: gp, port: up }] }))
  gateway.setEndpoints('db', endpointsOf(upstreams))
  const a = await dial(gp)
  const b = await dial(gp)
  assert.equal(await a.read(3), 'u0:')
  assert.equal(await b.read(3), 'u1:')
  for (let i = 0; i < 3; i++) {
    a.socket.write(`ping${i}`)
    assert.equal(await a.read(5), `ping${i}`, 'the same connection, the same endpoint')
  }
  assert.deepEqual(gateway.load('db').inFlight, 2)
  assert.equal(gateway.inFlight('db', 'u0'), 1)
  assert.match(await registry.metrics(), /uigniter_gateway_tcp_connections_open\{service="db"\} 2/)
  const u0Idle = gateway.whenIdle('db', 'u0', 10_000)
  assert.equal(await gateway.whenIdle('db', 'u1', 30), false, 'an open connection keeps it busy until the deadline')
  a.socket.end()
  assert.equal(await u0Idle, true, 'the connection\'s close ends the wait')
  b.socket.destroy()
  assert.equal(await gateway.whenIdle('db', 'u1', 10_000), true)
  await until('both closed', () => gateway.load('db').inFlight === 0)
  assert.ok(gateway.load('db').lastRequestAt > 0)
  assert.match(await registry.metrics(), /uigniter_gateway_tcp_connections_total\{service="db"\} 2/)
})

test('TCP: a half-close passes through: the client ends its side and still reads the answer', async (t) => {
  const { port: up, upstreams } = await startTcpUpstreams(t, 1, (_u, socket) => {
    let got = ''
    socket.setEncoding('utf8')
    socket.on('data', (d: string) => { got += d })
    socket.on('end', () => socket.end(`got ${got}`))
  })
  const { gateway } = await startGateway(t)
  const gp = await freePort()
  await gateway.configure(routeFor('db', undefined, 'round-robin', { tcp: [{ gatewayPort: gp, port: up }] }))
  gateway.setEndpoints('db', endpointsOf(upstreams))
  const c = await dial(gp)
  c.socket.end('question')
  assert.equal(await c.read(12), 'got question')
})

test('TCP: a refused connect is tried on another endpoint', async (t) => {
  const { port: up, upstreams } = await startTcpUpstreams(t, 2)
  const { gateway } = await startGateway(t)
  const gp = await freePort()
  await gateway.configure(routeFor('db', undefined, 'round-robin', { tcp: [{ gatewayPort: gp, port: up }] }))
  await stopUpstream(upstreams[0]!)
  gateway.setEndpoints('db', endpointsOf(upstreams))
  for (let i = 0; i < 3; i++) {
    const c = await dial(gp)
    assert.equal(await c.read(3), 'u1:')
    c.socket.destroy()
  }
  assert.ok((gateway.endpointStats('db').find((e) => e.id === 'u0')?.failures ?? 0) >= 1)
})

test('TCP: a connection held with no endpoint keeps the bytes it sent, and gets them through once one appears', async (t) => {
  const { port: up, upstreams } = await startTcpUpstreams(t, 1)
  const { gateway, woken } = await startGateway(t)
  const gp = await freePort()
  await gateway.configure(routeFor('db', undefined, 'round-robin', { tcp: [{ gatewayPort: gp, port: up }] }))
  const c = await dial(gp)
  c.socket.write('sent early|')
  c.socket.write('and more')
  await until('held', () => gateway.load('db').held === 1)
  assert.deepEqual(woken, ['db'])
  gateway.setEndpoints('db', endpointsOf(upstreams))
  assert.equal(await c.read(22), 'u0:sent early|and more')
})

test('TCP: a held connection is closed at the hold timeout, and at once past the hold limit', async (t) => {
  const { gateway } = await startGateway(t)
  const gp = await freePort()
  await gateway.configure(routeFor('db', undefined, 'round-robin', { tcp: [{ gatewayPort: gp, port: 1 }], hold: { maxRequests: 1, timeoutMs: 200 } }))
  const first = await dial(gp)
  await until('held', () => gateway.load('db').held === 1)
  const second = await dial(gp)
  await once(second.socket, 'close')
  assert.equal(gateway.load('db').held, 1, 'the second was turned away, the first still waits')
  const started = Date.now()
  await once(first.socket, 'close')
  assert.ok(Date.now() - started < 1000)
})

test('TCP: endpointDied cuts its connections', async (t) => {
  const { port: up, upstreams } = await startTcpUpstreams(t, 1)
  const { gateway } = await startGateway(t)
  const gp = await freePort()
  await gateway.configure(routeFor('db', undefined, 'round-robin', { tcp: [{ gatewayPort: gp, port: up }] }))
  gateway.setEndpoints('db', endpointsOf(upstreams))
  const c = await dial(gp)
  assert.equal(await c.read(3), 'u0:')
  gateway.endpointDied('db', 'u0')
  await once(c.socket, 'close')
  assert.equal(gateway.load('db').inFlight, 0)
})

test('configure with a TCP port in use: UIG_ERR_GATEWAY_PORT_IN_USE, and the previous route stays', async (t) => {
  const { port: up, upstreams } = await startTcpUpstreams(t, 1)
  const { gateway } = await startGateway(t)
  const gp = await freePort()
  await gateway.configure(routeFor('db', undefined, 'round-robin', { tcp: [{ gatewayPort: gp, port: up }] }))
  gateway.setEndpoints('db', endpointsOf(upstreams))
  const squatter = createServer()
  squatter.listen(0, '127.0.0.1')
  await once(squatter, 'listening')
  t.after(() => squatter.close())
  const taken = (squatter.address() as { port: number }).port
  await assert.rejects(gateway.configure(routeFor('db', undefined, 'least-connections', { tcp: [{ gatewayPort: gp, port: up }, { gatewayPort: taken, port: up }] })),
    (err: unknown) => err instanceof UigniterError && err.code === 'UIG_ERR_GATEWAY_PORT_IN_USE' && err.statusCode === 409)
  await assert.rejects(gateway.configure(routeFor('other', undefined, 'round-robin', { tcp: [{ gatewayPort: gp, port: up }] })),
    (err: unknown) => err instanceof UigniterError && err.code === 'UIG_ERR_GATEWAY_PORT_IN_USE', 'a port another service has')
  const c = await dial(gp)
  assert.equal(await c.read(3), 'u0:', 'the old listener still serves')
  c.socket.destroy()
  assert.equal(gateway.load('other').inFlight, 0)

  // Moving the service to another port closes the old listener.
  const gp2 = await freePort()
  await gateway.configure(routeFor('db', undefined, 'round-robin', { tcp: [{ gatewayPort: gp2, port: up }] }))
  const d = await dial(gp2)
  assert.equal(await d.read(3), 'u0:')
  d.socket.destroy()
  const refused = connect({ host: '127.0.0.1', port: gp })
  const [err] = await once(refused, 'error') as [NodeJS.ErrnoException]
  assert.equal(err.code, 'ECONNREFUSED')
})
