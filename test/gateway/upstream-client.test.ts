import assert from 'node:assert/strict'
import { createHash, randomBytes } from 'node:crypto'
import { once } from 'node:events'
import { request } from 'node:http'
import { createServer, type Socket } from 'node:net'
import { test, type TestContext } from 'node:test'
import type { UpstreamConnection, UpstreamHandler } from '../../src/gateway/upstream-connection.js'
import { UpstreamPool } from '../../src/gateway/upstream-pool.js'
import { gatewayFor, send, startHttpUpstreams, type Upstream } from './gateway-fixtures.js'

test('response framing: chunked, HEAD, 204, 304, close-delimited, Connection: close, 103 Early Hints, empty body', async (t) => {
  const { port: up, upstreams } = await startHttpUpstreams(t, 1, (_u, req, res) => {
    req.resume()
    switch (req.url) {
      case '/chunked':
        res.write('one,')
        setTimeout(() => { res.write('two,'); res.end('three') }, 5)
        return
      case '/head':
        res.writeHead(200, { 'content-length': '5' })
        res.end(req.method === 'HEAD' ? undefined : 'hello')
        return
      case '/204':
        res.writeHead(204)
        res.end()
        return
      case '/304':
        res.writeHead(304, { etag: '"x"' })
        res.end()
        return
      case '/close':
        res.writeHead(200, { connection: 'close' })
        res.end('bye')
        return
      case '/hints':
        res.writeEarlyHints({ link: '</a.css>; rel=preload' })
        res.writeHead(200, { 'content-length': '2' })
        res.end('ok')
        return
      case '/empty':
        res.writeHead(200, { 'content-length': '0' })
        res.end()
        return
      default:
        res.end('?')
    }
  })
  const { port, gateway } = await gatewayFor(t, up, upstreams)
  for (let i = 0; i < 2; i++) {
    const a = await send(port, '/chunked')
    assert.equal(a.body, 'one,two,three')
    assert.equal(a.headers['transfer-encoding'], 'chunked')
    const h = await send(port, '/head', { method: 'HEAD' })
    assert.equal(h.status, 200)
    assert.equal(h.headers['content-length'], '5')
    assert.equal(h.body, '')
    assert.equal((await send(port, '/head')).body, 'hello', 'the connection after a HEAD is in step')
    assert.equal((await send(port, '/204')).status, 204)
    const n = await send(port, '/304')
    assert.equal(n.status, 304)
    assert.equal(n.headers.etag, '"x"')
    assert.equal((await send(port, '/close')).body, 'bye')
    assert.equal((await send(port, '/hints')).body, 'ok')
    const e = await send(port, '/empty')
    assert.equal(e.status, 200)
    assert.equal(e.body, '')
  }
  assert.equal(gateway.endpointStats('api')[0]?.failures, 0)
})

test('a response with neither length nor chunking is read until the upstream closes', async (t) => {
  const raw = createServer((socket) => {
    socket.once('data', () => socket.end('HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil close'))
    socket.on('error', () => {})
  })
  raw.listen(0, '127.0.0.1')
  await once(raw, 'listening')
  t.after(() => raw.close())
  const port = (raw.address() as { port: number }).port
  const fake: Upstream = { id: 'raw', host: '127.0.0.1', server: raw, hits: 0 }
  const g = await gatewayFor(t, port, [fake])
  for (let i = 0; i < 3; i++) assert.equal((await send(g.port, '/')).body, 'until close')
})

test('a large response streams to a slow client with backpressure, intact', async (t) => {
  const body = randomBytes(8 * 1024 * 1024)
  const sha = createHash('sha256').update(body).digest('hex')
  const { port: up, upstreams } = await startHttpUpstreams(t, 1, (_u, req, res) => {
    req.resume()
    res.writeHead(200, { 'content-length': String(body.length) })
    res.end(body)
  })
  const { port, gateway } = await gatewayFor(t, up, upstreams)
  const got = await new Promise<{ sha: string, n: number }>((resolve, reject) => {
    const req = request({ host: '127.0.0.1', port, path: '/', headers: { host: 'api' }, agent: false }, (res) => {
      const h = createHash('sha256')
      let n = 0
      res.pause()
      // A slow reader: the gateway must stop reading from the upstream rather than buffer 8 MB.
      const tick = setInterval(() => {
        let chunk: Buffer | null
        while ((chunk = res.read(65536) as Buffer | null) !== null) { h.update(chunk); n += chunk.length }
      }, 2)
      res.on('end', () => { clearInterval(tick); resolve({ sha: h.digest('hex'), n }) })
      res.on('error', reject)
    })
    req.on('error', reject)
    req.end()
  })
  assert.equal(got.n, body.length)
  assert.equal(got.sha, sha)
  assert.equal((await send(port, '/')).raw.length, body.length, 'the connection is reusable afterwards')
  assert.equal(gateway.load('api').inFlight, 0)
})

test('an app that closes idle keep-alive connections: the request that meets a closed one is retried, for any method without a body', async (t) => {
  const { port: up, upstreams } = await startHttpUpstreams(t, 1, (u, req, res) => {
    req.resume()
    res.end(u.id)
    // Close the connection right after answering, without saying so: the gateway's next reuse meets a dead socket.
    setImmediate(() => req.socket.destroy())
  })
  const { port, gateway } = await gatewayFor(t, up, upstreams)
  for (let i = 0; i < 10; i++) {
    const a = await send(port, '/', { method: i % 2 === 0 ? 'GET' : 'POST' })
    assert.equal(a.status, 200, a.body)
  }
  assert.equal(gateway.endpointStats('api')[0]?.failures, 0, 'stale connections are not the endpoint\'s failures')
})

type TestExchange = UpstreamHandler & { onConnection: (c: UpstreamConnection | undefined, err?: Error) => void, done: Promise<void> }

/** A bare request through a pool, logging what happens to it. */
function poolRequest (pool: UpstreamPool, port: number, name: string, log: string[]): TestExchange {
  let resolve!: () => void
  const done = new Promise<void>((r) => { resolve = r })
  const h: TestExchange = {
    done,
    onConnection (c, err) {
      if (c === undefined) { log.push(`${name}: ${err?.message}`); resolve(); return }
      c.send(h, 'GET / HTTP/1.1\r\nHost: x\r\n\r\n', false, false)
    },
    onHead (status) { log.push(`${name}: ${status}`) },
    onBody () {},
    onEnd () { resolve() },
    onError (err) { log.push(`${name}: error ${err.message}`); resolve() },
    onDrain () {}
  }
  const c = pool.lease(port, h)
  if (c !== undefined) h.onConnection(c)
  return h
}

async function rawServer (t: TestContext, onSocket: (socket: Socket) => void): Promise<{ port: number, sockets: Socket[] }> {
  const sockets: Socket[] = []
  const server = createServer((socket) => {
    sockets.push(socket)
    socket.on('error', () => {})
    onSocket(socket)
  })
  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  t.after(() => { for (const s of sockets) s.destroy(); server.close() })
  return { port: (server.address() as { port: number }).port, sockets }
}

test('pool: at its maximum, requests wait for a connection in order and reuse it', async (t) => {
  const { port, sockets } = await rawServer(t, (socket) => socket.on('data', () => socket.write('HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok')))
  const pool = new UpstreamPool('127.0.0.1', 1000, 1)
  t.after(() => pool.destroy())
  const log: string[] = []
  const all = ['a', 'b', 'c'].map((name) => poolRequest(pool, port, name, log))
  await Promise.all(all.map((x) => x.done))
  assert.deepEqual(log, ['a: 200', 'b: 200', 'c: 200'])
  assert.equal(sockets.length, 1, 'one connection carried all three, one after the other')
  assert.equal(pool.size, 1)
})

test('pool: destroy fails the request on a connection and the ones waiting for one', async (t) => {
  const { port } = await rawServer(t, () => {})
  const pool = new UpstreamPool('127.0.0.1', 1000, 1)
  const log: string[] = []
  const d = poolRequest(pool, port, 'd', log)
  const e = poolRequest(pool, port, 'e', log)
  await new Promise((resolve) => setTimeout(resolve, 20))
  pool.destroy()
  await Promise.all([d.done, e.done])
  assert.deepEqual(log.sort(), ['d: error socket hang up', 'e: the endpoint is gone'])
})

test('requests beyond the pool\'s maximum through the gateway all complete', async (t) => {
  const { port: up, upstreams } = await startHttpUpstreams(t, 1, (u, req, res) => { req.resume(); setTimeout(() => res.end(u.id), 2) })
  const { port } = await gatewayFor(t, up, upstreams)
  const answers = await Promise.all(Array.from({ length: 300 }, async () => await send(port, '/', { agent: false })))
  assert.equal(answers.filter((a) => a.status === 200).length, 300)
})
