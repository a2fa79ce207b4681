import assert from 'node:assert/strict'
import { createServer as createHttpServer } from 'node:http'
import { createServer, type AddressInfo, type Server } from 'node:net'
import { test } from 'node:test'
import { probeOnce, waitForAppAnswer } from '../../src/core/app-probe.js'

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
  await assert.rejects(waitForAppAnswer({ host: '127.0.0.1', port, httpPath: '/health' }, 300, () => undefined), /did not answer GET \/health on 127\.0\.0\.1:\d+ within 300 ms/)
})
