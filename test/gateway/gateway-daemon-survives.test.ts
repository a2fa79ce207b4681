import assert from 'node:assert/strict'
import { once } from 'node:events'
import { createServer } from 'node:http'
import { test } from 'node:test'
import fc from 'fast-check'
import { DaemonProcess } from '../helpers/daemon-process.js'
import { tempDir } from '../helpers/assertions.js'
import { HostileUpstream, check, get, hostileCase, type HostileCase } from './hostile-http.js'

/**
 * Issue 10: a loopback server registered as an external endpoint answered
 * the gateway with malformed responses, and within ten requests the whole
 * daemon exited. Here the same, through a real daemon, with no VM: the
 * daemon's gateway must answer each request as the case allows, and the
 * daemon's API and another service must still answer afterwards.
 */
test('a whole daemon survives a hostile external endpoint: its gateway answers each generated response with a 502 or a clean close, its API and a healthy service still answer', { timeout: 240_000 }, async (t) => {
  const hostile = new HostileUpstream()
  const hostilePort = await hostile.listen('127.0.0.1')
  t.after(() => hostile.close())
  const healthy = createServer((req, res) => { req.resume(); res.end('healthy') })
  healthy.listen(0, '127.0.0.1')
  await once(healthy, 'listening')
  t.after(() => { healthy.close(); healthy.closeAllConnections() })
  const healthyPort = (healthy.address() as { port: number }).port

  const daemon = await DaemonProcess.create(await tempDir(t), { UIGNITER_SUBNET: `10.237.${Math.floor(Math.random() * 200)}.0/24` })
  await daemon.start()
  t.after(async () => { await daemon.removeEverything() })
  const api = daemon.api
  // External-only services: no image, no replicas; the gateway routes to the endpoints alone.
  for (const [name, port] of [['hostile', hostilePort], ['healthy', healthyPort]] as const) {
    await api.call('PUT', `/v1/services/${name}`, { name, replicas: { min: 0 }, ports: [{ port, protocol: 'http' }], endpoints: [{ host: '127.0.0.1' }] })
  }
  const gw = daemon.gatewayPort
  const deadline = Date.now() + 30_000
  for (;;) {
    const o = await get(gw, 'healthy', undefined, 2000)
    if (o.kind === 'response' && o.status === 200) break
    if (Date.now() > deadline) throw new Error(`the gateway never routed to the healthy service: ${JSON.stringify(o)}\n${daemon.output.slice(-2000)}`)
    await new Promise((resolve) => setTimeout(resolve, 100))
  }

  // The answer of the issue, ten times: it took the daemon down within ten requests.
  const issue: HostileCase = {
    label: 'issue 10: a control character in the reason phrase',
    pieces: [Buffer.from('HTTP/1.1 200 O\x01K\r\nContent-Length: 2\r\n\r\nok', 'latin1')],
    end: 'keep',
    expect: { kind: 'error', codes: ['UIG_ERR_GATEWAY_UPSTREAM_MALFORMED'] }
  }
  hostile.cases.set('issue-10', issue)
  for (let i = 0; i < 10; i++) check(issue, await get(gw, 'hostile', 'issue-10'))

  // Then generated answers of every kind, 20 at a time.
  const cases = fc.sample(hostileCase, { numRuns: 600, seed: Number(process.env.FC_SEED ?? 42) })
  for (let at = 0; at < cases.length; at += 20) {
    const batch = cases.slice(at, at + 20)
    const outcomes = await Promise.all(batch.map(async (c, i) => {
      hostile.cases.set(`d${at + i}`, c)
      return await get(gw, 'hostile', `d${at + i}`)
    }))
    batch.forEach((c, i) => check(c, outcomes[i]!))
  }

  assert.equal(daemon.pid !== undefined && isAlive(daemon.pid), true, `the daemon exited:\n${daemon.output.slice(-3000)}`)
  const info = await api.call<Record<string, unknown>>('GET', '/v1/info')
  assert.equal(typeof info, 'object')
  const services = await api.call<Array<{ spec: { name: string } }>>('GET', '/v1/services')
  assert.deepEqual(services.map((s) => s.spec.name).sort(), ['healthy', 'hostile'])
  const ok = await get(gw, 'healthy', undefined)
  assert.equal(ok.kind === 'response' && ok.body.toString(), 'healthy')
  assert.doesNotMatch(daemon.output, /uncaught|ERR_INVALID_CHAR/i)
})

function isAlive (pid: number): boolean {
  try {
    process.kill(pid, 0)
    return true
  } catch {
    return false
  }
}
