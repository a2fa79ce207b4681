import assert from 'node:assert/strict'
import { createServer as createHttpServer } from 'node:http'
import { createServer, type AddressInfo, type Server } from 'node:net'
import { test } from 'node:test'
import { askApp, httpGetWithRetry, probeOnce, waitForAppAnswer } from '../../src/core/app-probe.js'

async function listen (server: Server | ReturnType<typeof createHttpServer>): Promise<number> {
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  return (server.address() as AddressInfo).port
}

test('TCP: a connection that stays open is an answer, and the probe hangs up cleanly so the app sees its end', async () => {
  let sawEnd = false
  const server = createServer((socket) => { socket.on('end', () => { sawEnd = true; socket.end() }) })
  const port = await listen(server)
  assert.equal(await probeOnce({ host: '127.0.0.1', port }), true)
  assert.equal(sawEnd, true, 'the app read EOF: nothing is left half-open')
  server.close()
})

test('TCP: a refused connection, or one closed at once (a user-mode forward to a guest that does not listen), is no answer', async () => {
  const closing = createServer((socket) => socket.destroy())
  const port = await listen(closing)
  assert.equal(await probeOnce({ host: '127.0.0.1', port }), false)
  closing.close()
  await new Promise((resolve) => closing.once('close', resolve))
  assert.equal(await probeOnce({ host: '127.0.0.1', port }), false)
})

test('HTTP: 2xx and 3xx answer, 5xx does not', async () => {
  const server = createHttpServer((req, res) => { res.writeHead(req.url === '/ok' ? 200 : req.url === '/moved' ? 302 : 503); res.end('x') })
  const port = await listen(server)
  assert.equal(await probeOnce({ host: '127.0.0.1', port, httpPath: '/ok' }), true)
  assert.equal(await probeOnce({ host: '127.0.0.1', port, httpPath: '/moved' }), true)
  assert.equal(await probeOnce({ host: '127.0.0.1', port, httpPath: '/down' }), false)
  assert.equal(await probeOnce({ host: '127.0.0.1', port, httpPath: '/down', anyStatus: true }), true, 'warming up: any answer will do')
  server.close()
})

test('waiting gives up with the reason it is given, or at its deadline with what it probed', async () => {
  const server = createServer()
  const port = await listen(server)
  server.close()
  await assert.rejects(waitForAppAnswer({ host: '127.0.0.1', port }, 5000, () => 'the VM ended'), /the VM ended/)
  await assert.rejects(waitForAppAnswer({ host: '127.0.0.1', port, httpPath: '/health' }, 300), { code: 'UIG_ERR_VM_TIMEOUT', message: /did not answer GET \/health on 127\.0\.0\.1:\d+ within 300 ms/ })
})

test('TCP: bytes from the app answer at once, and what it sent before closing is the answer', async () => {
  const server = createServer((socket) => { socket.end('probe host=a\n') })
  const port = await listen(server)
  const started = Date.now()
  assert.deepEqual(await askApp({ host: '127.0.0.1', port }), { status: 0, body: 'probe host=a\n' })
  assert.ok(Date.now() - started < 250, 'no settle wait once the app spoke')
  assert.equal((await waitForAppAnswer({ host: '127.0.0.1', port, speaksFirst: true }, 2000)).body, 'probe host=a\n')
  server.close()
})

test('TCP, speaksFirst: an open connection that stays silent is no answer', async () => {
  const silent = createServer((socket) => { socket.on('end', () => socket.end()) })
  const port = await listen(silent)
  assert.equal(await askApp({ host: '127.0.0.1', port, speaksFirst: true }, { connectMs: 1000, answerMs: 400 }), undefined)
  assert.equal(await probeOnce({ host: '127.0.0.1', port }), true, 'without it, the open connection answers')
  silent.close()
})

test('HTTP: the answer carries the status and the body, with Content-Length, chunked, or until the close', async () => {
  const server = createHttpServer((req, res) => {
    if (req.url === '/length') {
      res.writeHead(200, { 'content-length': 5 })
      res.end('hello')
    } else if (req.url === '/host') {
      res.end(req.headers.host)
    } else if (req.url === '/chunked') {
      res.writeHead(201, { 'transfer-encoding': 'chunked' })
      res.write('one,')
      setTimeout(() => res.end('two'), 20)
    } else {
      res.writeHead(500, { connection: 'close' })
      res.end('broken')
    }
  })
  const port = await listen(server)
  assert.deepEqual(await askApp({ host: '127.0.0.1', port, httpPath: '/length' }), { status: 200, body: 'hello' })
  assert.deepEqual(await askApp({ host: '127.0.0.1', port, httpPath: '/chunked' }), { status: 201, body: 'one,two' })
  assert.equal((await askApp({ host: '127.0.0.1', port, httpPath: '/host' }))?.body, '127.0.0.1')
  assert.equal((await askApp({ host: '127.0.0.1', port, httpPath: '/host', hostHeader: 'api' }))?.body, 'api', 'a Host to route by')
  assert.equal(await askApp({ host: '127.0.0.1', port, httpPath: '/x' }), undefined, '5xx: no answer for a health check')
  assert.deepEqual(await httpGetWithRetry(port, '/x', 2000), { status: 500, body: 'broken' }, 'any status for a GET that reads the answer')
  server.close()
})

test('HTTP: something that is not HTTP is no answer, and a flood of bytes is cut off', async () => {
  const garbage = createServer((socket) => { socket.on('error', () => {}); socket.write('SSH-2.0-OpenSSH\r\n') })
  const gPort = await listen(garbage)
  assert.equal(await askApp({ host: '127.0.0.1', port: gPort, httpPath: '/' }), undefined)
  garbage.close()
  const chunk = Buffer.alloc(64 * 1024, 'x')
  const flood = createServer((socket) => {
    socket.on('error', () => {})
    socket.write('HTTP/1.1 200 OK\r\n\r\n')
    const pump = (): void => { while (!socket.destroyed && socket.write(chunk)); if (!socket.destroyed) socket.once('drain', pump) }
    pump()
  })
  const fPort = await listen(flood)
  const answer = await askApp({ host: '127.0.0.1', port: fPort, httpPath: '/' }, 5000)
  assert.equal(answer?.status, 200)
  assert.ok((answer?.body.length ?? 0) <= 1 << 20, 'read up to its cap, then the probe hangs up')
  flood.close()
})

test('an app that trickles its answer does not hold the probe past the attempt', async () => {
  const trickle = createServer((socket) => {
    socket.on('error', () => {})
    socket.write('HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n')
    const timer = setInterval(() => socket.write('x'), 200)
    socket.on('close', () => clearInterval(timer))
  })
  const port = await listen(trickle)
  const started = Date.now()
  const answer = await askApp({ host: '127.0.0.1', port, httpPath: '/' }, 1500)
  assert.equal(answer?.status, 200, 'the status decided it')
  assert.ok(Date.now() - started < 2500, `done within the attempt (${Date.now() - started} ms)`)
  trickle.close()
})
