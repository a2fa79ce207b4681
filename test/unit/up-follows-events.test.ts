import assert from 'node:assert/strict'
import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import { createServer, type ServerResponse } from 'node:http'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { test, type TestContext } from 'node:test'
import { eventStreamParser, type ServerSentEvent } from '../../src/cli/api-client.js'
import type { ServiceStatus } from '../../src/core/service.js'
import { parseAppText } from '../../src/service/service-spec.js'
import { runCli } from '../helpers/fixtures.js'

test('the event-stream parser: events split across chunks, several data lines, CRLF, comments and keep-alives skipped', () => {
  const events: ServerSentEvent[] = []
  const feed = eventStreamParser((e) => events.push(e))
  for (const chunk of [': uigniter events\n\n', 'event: service.replica-ready\nda', 'ta: {"service":"web"}\n', '\n: keep-alive\n\n',
    'event: x\r\ndata: one\r\ndata: two\r\n\r\n', 'data: plain\n\n', 'event: empty\n\n', 'id: 7\nretry: 10\ndata:no-space\n\n']) feed(chunk)
  assert.deepEqual(events, [
    { type: 'service.replica-ready', data: '{"service":"web"}' },
    { type: 'x', data: 'one\ntwo' },
    { type: 'message', data: 'plain' },
    { type: 'message', data: 'no-space' }
  ])
})

const APP = `app: shop
services:
  - name: web
    image: hello
    ports: [{ port: 8080, protocol: http }]
`

/**
 * A stand-in for the daemon's API (named so: a fake), speaking the routes
 * `uigniter up` uses over a real unix socket: it lets the test choose when
 * events come and count every read of the services, which a real daemon
 * booting real replicas cannot do deterministically. The real `up` against
 * a real daemon is in test/daemon/services.test.ts.
 */
async function fakeDaemonApi (t: TestContext): Promise<{
  env: NodeJS.ProcessEnv
  reads: () => number
  setReady: (ready: boolean) => void
  send: (type: string, data: object) => void
  applied: Promise<void>
}> {
  const dir = await mkdtemp(join(tmpdir(), 'uig-up-'))
  const spec = parseAppText(APP, 'uigniter.yaml').services[0]!
  let ready = false
  let reads = 0
  const streams = new Set<ServerResponse>()
  let onApplied: () => void = () => {}
  const applied = new Promise<void>((resolve) => { onApplied = resolve })
  const status = (): ServiceStatus[] => [{
    spec, app: 'shop', generation: 1, desired: 1, ready: ready ? 1 : 0, template: null, inFlight: 0, message: null,
    endpoints: [{ id: 'vm1', vm: 'web-1', host: '10.0.0.2', generation: 1, health: ready ? 'healthy' : 'starting', weight: 1, priority: 0, since: new Date().toISOString() }]
  }]
  const json = (res: ServerResponse, body: unknown): void => {
    res.writeHead(200, { 'content-type': 'application/json' })
    res.end(JSON.stringify(body))
  }
  const server = createServer((req, res) => {
    req.resume()
    if (req.url === '/healthz') return json(res, { status: 'ok' })
    if (req.method === 'PUT' && req.url === '/v1/apps/shop') {
      req.on('end', () => { json(res, status()); onApplied() })
      return
    }
    if (req.method === 'GET' && req.url === '/v1/services?app=shop') {
      reads++
      return json(res, status())
    }
    if (req.url === '/v1/events') {
      res.writeHead(200, { 'content-type': 'text/event-stream' })
      res.write(': uigniter events\n\n')
      streams.add(res)
      res.on('close', () => streams.delete(res))
      return
    }
    res.writeHead(404).end()
  })
  const socket = join(dir, 'api.sock')
  await new Promise<void>((resolve) => server.listen(socket, resolve))
  t.after(async () => {
    for (const s of streams) s.destroy()
    await new Promise((resolve) => server.close(resolve))
    await rm(dir, { recursive: true, force: true })
  })
  await writeFile(join(dir, 'uigniter.yaml'), APP)
  await writeFile(join(dir, 'config.json'), '{}')
  return {
    env: { ...process.env, UIGNITER_SOCKET: socket, UIGNITER_DATA_DIR: dir, UIGNITER_CONFIG: join(dir, 'config.json'), CI: '1' },
    reads: () => reads,
    setReady: (r) => { ready = r },
    send: (type, data) => { for (const s of streams) s.write(`event: ${type}\ndata: ${JSON.stringify(data)}\n\n`) },
    applied
  }
}

const sleep = async (ms: number): Promise<void> => await new Promise((resolve) => setTimeout(resolve, ms))

test('uigniter up reads the services again only when one of them has an event, and returns when they are ready', { timeout: 60_000 }, async (t) => {
  const api = await fakeDaemonApi(t)
  const file = join(api.env.UIGNITER_DATA_DIR ?? '', 'uigniter.yaml')
  const up = runCli(['up', file, '--timeout', '30', '--json'], { env: api.env })
  await api.applied
  await sleep(1000)
  assert.equal(api.reads(), 0, 'no event: no read (nothing polls)')
  api.send('service.replica-started', { type: 'service.replica-started', service: 'web', message: 'replica web-1 runs' })
  api.send('vm.state', { id: 'vm1', state: 'running' })
  api.send('service.scaled', { type: 'service.scaled', service: 'another-app-s-service', message: '0 → 1' })
  await sleep(500)
  assert.equal(api.reads(), 1, 'one read for the one event of the app\'s service')
  api.setReady(true)
  api.send('service.replica-ready', { type: 'service.replica-ready', service: 'web', message: 'replica web-1 passed its health check' })
  const result = await up
  assert.equal(result.code, 0, result.stderr)
  assert.equal(api.reads(), 2)
  const services = JSON.parse(result.stdout) as ServiceStatus[]
  assert.deepEqual(services.map((s) => [s.spec.name, s.ready, s.desired]), [['web', 1, 1]])
})

test('uigniter up gives up at its deadline with the services as they were, having read nothing without an event', { timeout: 60_000 }, async (t) => {
  const api = await fakeDaemonApi(t)
  const file = join(api.env.UIGNITER_DATA_DIR ?? '', 'uigniter.yaml')
  const started = Date.now()
  const result = await runCli(['up', file, '--timeout', '2'], { env: api.env })
  const took = Date.now() - started
  assert.equal(result.code, 1)
  assert.match(result.stderr, /application shop was not ready within 2 s/)
  assert.match(result.stdout, /web\s+shop\s+hello\S*\s+1\s+0\/1/, 'the table of the last state')
  assert.equal(api.reads(), 0)
  assert.ok(took >= 2000 && took < 10_000, `the deadline, not a hang (${took} ms)`)
})
