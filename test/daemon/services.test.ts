import assert from 'node:assert/strict'
import { readFile, writeFile } from 'node:fs/promises'
import { createServer } from 'node:net'
import { join } from 'node:path'
import { after, before, describe, test } from 'node:test'
import { setTimeout as sleep } from 'node:timers/promises'
import memjs from 'memjs'
import type { ServiceStatus } from '../../src/core/service.js'
import type { TemplateInfo } from '../../src/core/template.js'
import type { Vm } from '../../src/core/vm.js'
import { freePort } from '../../src/core/free-port.js'
import { rejectsWith } from '../helpers/assertions.js'
import { DaemonProcess } from '../helpers/daemon-process.js'
import { createTestContext, exampleSpec, packageRoot, runCli, type TestContext } from '../helpers/fixtures.js'
import { httpGet, startLoad } from '../helpers/http-load.js'

/**
 * Services through a real daemon: hello replicas cloned from templates, the
 * gateway in front of them, memcached behind a gateway TCP port.
 */
describe('services, the registry and the gateway', () => {
  let ctx: TestContext & { cleanup: () => Promise<void> }
  let daemon: DaemonProcess
  let gateway: string

  async function waitFor (name: string, check: (s: ServiceStatus) => boolean, timeoutMs = 60_000): Promise<ServiceStatus> {
    const deadline = Date.now() + timeoutMs
    for (;;) {
      const status = await daemon.api.call<ServiceStatus>('GET', `/v1/services/${name}`)
      if (check(status)) return status
      if (Date.now() > deadline) throw new Error(`service ${name} never got there: ${JSON.stringify({ ...status, spec: undefined })}`)
      await sleep(100)
    }
  }
  const HEALTH = { intervalMs: 300, timeoutMs: 2000, unhealthyThreshold: 4 }
  const healthy = (s: ServiceStatus): string[] => s.endpoints.filter((e) => e.health === 'healthy' && e.vm !== null).map((e) => e.id)

  before(async () => {
    ctx = await createTestContext()
    for (const example of ['hello', 'memcached']) {
      await ctx.builder.build(JSON.parse(await readFile(exampleSpec(example), 'utf8')), join(packageRoot, 'examples', example))
    }
    daemon = await DaemonProcess.create(ctx.dataDir, { UIGNITER_SUBNET: `10.241.${Math.floor(Math.random() * 200)}.0/24` })
    await daemon.start()
    gateway = `http://127.0.0.1:${daemon.gatewayPort}`
  })
  after(async () => {
    await daemon.removeEverything()
    await ctx.cleanup()
  })

  test('bad specs are refused with their codes, and nothing is kept', { timeout: 300_000 }, async () => {
    await rejectsWith(daemon.api.call('PUT', '/v1/services/bad', { image: 'hello', ports: [{ port: 8080 }], replicas: { min: 3, max: 1 } }),
      'UIG_ERR_SERVICE_SPEC_INVALID', 'replicas.max (1) is below replicas.min (3)')
    await rejectsWith(daemon.api.call('PUT', '/v1/services/bad', { image: 'hello', ports: [{ port: 11211, protocol: 'tcp' }] }),
      'UIG_ERR_SERVICE_SPEC_INVALID', 'needs a gatewayPort')
    await rejectsWith(daemon.api.call('PUT', '/v1/services/bad', { name: 'other', image: 'hello', ports: [{ port: 8080 }] }),
      'UIG_ERR_SERVICE_SPEC_INVALID', 'the path names "bad"')
    await rejectsWith(daemon.api.call('PUT', '/v1/services/bad', { image: 'nope', ports: [{ port: 8080 }] }), 'UIG_ERR_IMAGE_NOT_FOUND')
    await rejectsWith(daemon.api.call('PUT', '/v1/services/bad', { image: 'hello', ports: [{ port: 1, protocol: 'tcp', gatewayPort: daemon.gatewayPort }] }),
      'UIG_ERR_SERVICE_CONFLICT', 'the gateway\'s HTTP port')
    const taken = createServer()
    await new Promise<void>((resolve) => taken.listen(0, '0.0.0.0', resolve))
    const port = (taken.address() as { port: number }).port
    try {
      await rejectsWith(daemon.api.call('PUT', '/v1/services/bad', { image: 'hello', replicas: { min: 0 }, ports: [{ port: 1, protocol: 'tcp', gatewayPort: port }] }),
        'UIG_ERR_GATEWAY_PORT_IN_USE')
    } finally {
      taken.close()
    }
    await rejectsWith(daemon.api.call('GET', '/v1/services/bad'), 'UIG_ERR_SERVICE_NOT_FOUND')
    assert.deepEqual(await daemon.api.call('GET', '/v1/services'), [], 'no refused spec was kept')
    const unknown = await httpGet(`${gateway}/svc/bad/`)
    assert.equal(unknown.status, 404)
    assert.equal((JSON.parse(unknown.body) as { code: string }).code, 'UIG_ERR_GATEWAY_NO_SERVICE')
  })

  test('kill -9 of a replica under load: the service is back at its minimum and no GET fails', { timeout: 300_000 }, async () => {
    // Lenient checks: under TCG a fresh clone under this load can miss a 1 s check or two (see the issue 10 notes),
    // and replacing it would fail the requests it still answers; the frozen replica below is still found in seconds.
    const spec = { image: 'hello', replicas: { min: 2 }, ports: [{ port: 8080 }], healthCheck: HEALTH }
    await daemon.api.call('PUT', '/v1/services/web', spec)
    const before = await waitFor('web', (s) => healthy(s).length === 2)
    assert.match(before.template ?? '', /^svc-web-g1-[0-9a-f]{8}$/, 'replicas are clones of the service\'s template')

    const events: string[] = []
    const subscription = new AbortController()
    const streaming = daemon.api.stream('/v1/events', (text) => { events.push(text) }, subscription.signal).catch(() => {})
    const load = startLoad(`${gateway}/svc/web/`, 4)
    await sleep(1000)
    const victim = await daemon.api.call<Vm>('GET', `/v1/vms/${before.endpoints[0]?.id ?? ''}`)
    process.kill(victim.pid ?? 0, 'SIGKILL')
    const restored = await waitFor('web', (s) => healthy(s).length === 2 && !healthy(s).includes(victim.id), 30_000)
    await sleep(1000)
    const result = await load.stop()
    subscription.abort()
    await streaming
    assert.deepEqual(result.failures, [], 'every GET was answered 200, the ones in flight to the killed replica retried elsewhere')
    assert.ok(result.ok > 20, `requests flowed (${result.ok})`)
    const stream = events.join('')
    assert.match(stream, new RegExp(`event: service\\.replica-exited\ndata: .*replica ${victim.name} ended \\(killed.*replacing it`), 'the controller\'s decision is an event')
    assert.match(stream, /event: service\.replica-ready\n/)
    const registry = await daemon.api.call<Array<{ service: string, endpoints: Array<{ id: string, health: string }> }>>('GET', '/v1/registry?service=web')
    assert.deepEqual(registry[0]?.endpoints.filter((e) => e.health === 'healthy').map((e) => e.id).sort(), healthy(restored).sort(), 'the registry shows the live replicas')
  })

  test('a replica that stops answering its health check is taken out and replaced; the registry watch shows it', { timeout: 300_000 }, async () => {
    const before = await daemon.api.call<ServiceStatus>('GET', '/v1/services/web')
    const frozen = before.endpoints[0]?.id ?? ''
    const updates: string[] = []
    const subscription = new AbortController()
    const watching = daemon.api.stream('/v1/registry/watch?service=web', (text) => { updates.push(text) }, subscription.signal).catch(() => {})
    await daemon.api.call('POST', `/v1/vms/${frozen}/pause`)
    const after = await waitFor('web', (s) => healthy(s).length === 2 && !s.endpoints.some((e) => e.id === frozen), 30_000)
    subscription.abort()
    await watching
    const events = updates.join('').split('\n\n').filter((e) => e.startsWith('event: registry'))
      .map((e) => JSON.parse(e.slice(e.indexOf('data: ') + 6)) as { service: string, endpoints: Array<{ id: string, health: string }> })
    assert.ok(events.length >= 3, `an event at once, then at each change (${events.length})`)
    assert.deepEqual(events[0]?.endpoints.map((e) => e.id).sort(), before.endpoints.map((e) => e.id).sort(), 'the first event is the current state')
    assert.ok(events.some((e) => e.endpoints.some((p) => p.id === frozen && p.health === 'unhealthy')), 'the frozen replica was seen unhealthy')
    assert.deepEqual(events.at(-1)?.endpoints.filter((e) => e.health === 'healthy').map((e) => e.id).sort(), healthy(after).sort())
    await rejectsWith(daemon.api.call('GET', `/v1/vms/${frozen}`), 'UIG_ERR_VM_NOT_FOUND')
  })

  test('after a daemon restart, the replicas are adopted and keep serving', { timeout: 300_000 }, async () => {
    const ids = healthy(await daemon.api.call<ServiceStatus>('GET', '/v1/services/web')).sort()
    await daemon.stop()
    await daemon.start()
    const adopted = await waitFor('web', (s) => healthy(s).length === 2)
    assert.deepEqual(healthy(adopted).sort(), ids, 'the same VMs, not new ones')
    assert.equal((await httpGet(`${gateway}/svc/web/`)).status, 200)
  })

  test('a rolling update (new env) replaces every replica with no failed request', { timeout: 300_000 }, async () => {
    const oldIds = healthy(await daemon.api.call<ServiceStatus>('GET', '/v1/services/web'))
    const load = startLoad(`${gateway}/svc/web/`, 4)
    await sleep(500)
    const updated = await daemon.api.call<ServiceStatus>('PUT', '/v1/services/web', {
      image: 'hello', replicas: { min: 2 }, ports: [{ port: 8080 }], healthCheck: HEALTH, env: { RELEASE: '2' }
    })
    assert.equal(updated.generation, 2)
    const done = await waitFor('web', (s) => s.endpoints.length === 2 && s.endpoints.every((e) => e.generation === 2 && e.health === 'healthy'), 90_000)
    await sleep(500)
    const result = await load.stop()
    assert.deepEqual(result.failures, [], 'no request failed during the rollout')
    assert.ok(healthy(done).every((id) => !oldIds.includes(id)), 'every replica was replaced')
    const newNames = done.endpoints.map((e) => e.vm ?? '')
    const lastAnswers = await Promise.all([1, 2, 3, 4].map(async () => (await httpGet(`${gateway}/svc/web/`)).body))
    for (const body of lastAnswers) assert.ok(newNames.some((n) => body.includes(n)), `answered by a new replica: ${body.trim()}`)
    // The first generation's template goes once no replica runs it.
    const deadline = Date.now() + 10_000
    let templates: string[] = []
    while (Date.now() < deadline) {
      templates = (await daemon.api.call<TemplateInfo[]>('GET', '/v1/templates')).map((t) => t.name)
      if (!templates.some((t) => t.startsWith('svc-web-g1-'))) break
      await sleep(200)
    }
    assert.deepEqual(templates.filter((t) => t.startsWith('svc-web-')).map((t) => t.replace(/-[0-9a-f]{8}$/, '')), ['svc-web-g2'])
  })

  test('scale from zero: the first request is held while a clone starts; past the hold limit, 503 with Retry-After; idle, back to zero', { timeout: 300_000 }, async () => {
    await daemon.api.call('PUT', '/v1/services/lazy', {
      image: 'hello',
      replicas: { min: 0, max: 1 },
      ports: [{ port: 8080 }],
      hold: { maxRequests: 2, timeoutMs: 30_000 },
      autoscale: { idleToZeroMs: 1500, scaleDownCooldownMs: 1000, scaleUpCooldownMs: 0 }
    })
    const idle = await waitFor('lazy', (s) => s.template !== null)
    assert.equal(idle.desired, 0)
    assert.equal(idle.endpoints.length, 0, 'nothing runs before the first request')

    const answers = await Promise.all([0, 1, 2, 3].map(async () => await httpGet(`${gateway}/svc/lazy/`)))
    const served = answers.filter((a) => a.status === 200)
    const refused = answers.filter((a) => a.status === 503)
    assert.equal(served.length, 2, 'the two held requests were forwarded once the clone answered')
    assert.equal(refused.length, 2, 'requests past the hold limit were refused')
    for (const r of refused) {
      assert.equal((JSON.parse(r.body) as { code: string }).code, 'UIG_ERR_GATEWAY_HOLD_LIMIT')
      assert.ok(Number(r.headers['retry-after']) >= 1, 'with Retry-After')
    }
    await waitFor('lazy', (s) => s.desired === 0 && s.endpoints.length === 0, 30_000)
    const again = await httpGet(`${gateway}/svc/lazy/`)
    assert.equal(again.status, 200, 'it wakes again from zero')
    assert.match(again.body, /Hello from uigniter/)
  })

  test('autoscaling follows the requests in flight: up under load, back down when it ends', { timeout: 300_000 }, async () => {
    await daemon.api.call('PUT', '/v1/services/busy', {
      image: 'hello',
      replicas: { min: 1, max: 2 },
      ports: [{ port: 8080 }],
      autoscale: { targetInFlight: 2, scaleUpCooldownMs: 0, scaleDownCooldownMs: 2000 }
    })
    await waitFor('busy', (s) => healthy(s).length === 1)
    const load = startLoad(`${gateway}/svc/busy/`, 8)
    const scaled = await waitFor('busy', (s) => s.desired === 2 && healthy(s).length === 2, 30_000)
    const result = await load.stop()
    assert.deepEqual(result.failures, [])
    assert.equal(scaled.spec.replicas.max, 2, 'never past max, though 8 in flight over a target of 2 wants 4')
    await waitFor('busy', (s) => s.desired === 1 && s.endpoints.length === 1, 30_000)
    await daemon.api.call('DELETE', '/v1/services/busy')
  })

  test('start path pool: replicas are claimed from a clone pool that keeps a spare; deleting the service deletes both', { timeout: 300_000 }, async () => {
    await daemon.api.call('PUT', '/v1/services/pooled', { image: 'hello', replicas: { min: 1 }, ports: [{ port: 8080 }], startPath: 'pool' })
    const status = await waitFor('pooled', (s) => healthy(s).length === 1)
    const replica = await daemon.api.call<Vm>('GET', `/v1/vms/${status.endpoints[0]?.id ?? ''}`)
    assert.equal(replica.service?.name, 'pooled')
    assert.equal(replica.pool?.name, 'svc-pooled', 'claimed from the service\'s pool')
    const pool = await daemon.waitForPool('svc-pooled', (p) => p.ready === 1)
    assert.equal(pool.spec.template, status.template)
    assert.match(status.template ?? '', /^svc-pooled-g1-/)
    assert.equal((await httpGet(`${gateway}/svc/pooled/`)).status, 200)
    await daemon.api.call('DELETE', '/v1/services/pooled')
    await rejectsWith(daemon.api.call('GET', '/v1/pools/svc-pooled'), 'UIG_ERR_POOL_NOT_FOUND')
    assert.ok(!(await daemon.api.call<TemplateInfo[]>('GET', '/v1/templates')).some((t) => t.name.startsWith('svc-pooled')), 'its template is gone')
    const left = (await daemon.api.call<Vm[]>('GET', '/v1/vms')).filter((vm) => vm.service?.name === 'pooled' || vm.pool?.name === 'svc-pooled')
    assert.deepEqual(left, [], 'no replica or spare is left')
  })

  test('an application file: up starts memcached behind a gateway TCP port that an npm memcached client uses; down removes it', { timeout: 300_000 }, async () => {
    const kvPort = await freePort()
    const file = join(ctx.dataDir, 'uigniter.yaml')
    await writeFile(file, `app: cache
services:
  - name: kv
    image: memcached
    ports:
      - { port: 11211, protocol: tcp, gatewayPort: ${kvPort} }
  - name: front
    image: hello
    replicas: { min: 1, max: 2 }
    ports: [{ port: 8080, protocol: http }]
    startPath: cold
    loadBalancing: { strategy: least-connections }
`)
    const up = await runCli(['up', file, '--timeout', '120'], { env: daemon.env })
    assert.equal(up.code, 0, up.stderr)
    assert.match(up.stdout, /kv\s+cache\s+memcached/)
    assert.match(up.stdout, new RegExp(`${kvPort}→11211/tcp`))

    const client = memjs.Client.create(`127.0.0.1:${kvPort}`, { retries: 0, timeout: 5 })
    try {
      await client.set('task:1', JSON.stringify({ id: 1, status: 'queued' }), { expires: 0 })
      const { value } = await client.get('task:1')
      assert.deepEqual(JSON.parse(value?.toString() ?? 'null'), { id: 1, status: 'queued' })
    } finally {
      client.close()
    }
    const viaHost = await httpGet(`${gateway}/`, { headers: { host: 'front' } })
    assert.equal(viaHost.status, 200, 'the Host header routes too')
    const front = await daemon.api.call<ServiceStatus>('GET', '/v1/services/front')
    assert.equal(front.template, null, 'a cold service has no template')
    assert.equal((await daemon.api.call<Vm>('GET', `/v1/vms/${front.endpoints[0]?.id ?? ''}`)).startPath, 'cold')

    const ls = await runCli(['service', 'ls', '--app', 'cache'], { env: daemon.env })
    assert.match(ls.stdout, /front\s+cache\s+hello\S*\s+1\s+1\/1/)
    const down = await runCli(['down', file], { env: daemon.env })
    assert.equal(down.code, 0, down.stderr)
    assert.match(down.stdout, /took down cache: /)
    assert.deepEqual(await daemon.api.call('GET', '/v1/services?app=cache'), [])
    const vms = await daemon.api.call<Vm[]>('GET', '/v1/vms')
    assert.deepEqual(vms.filter((vm) => vm.service?.name === 'kv' || vm.service?.name === 'front'), [], 'its replicas are gone')
  })
})
